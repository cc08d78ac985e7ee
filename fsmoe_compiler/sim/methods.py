"""The simulator's methods, one name each: the tuple every simulator module uses, its aliases, the name reports print.

* ``fsmoe`` - ours: the degree / gradient-partition search with CP-SAT
  (:mod:`.search`); alias ``cpsat``. Reports (``fsmoe simulate``'s tables,
  ``--json``, traces) call it ``ours``, which is an alias too.
* ``sequential`` and ``tutel`` - the schedules :mod:`fsmoe_compiler.names`
  defines (:data:`~fsmoe_compiler.names.SEQUENTIAL`,
  :data:`~fsmoe_compiler.names.TUTEL`), here on the layer model
  (:mod:`.baselines` says where that model is coarser than a real task graph);
  ``deepspeed`` is an alias of ``sequential``.
* ``fsmoe_paper`` - FSMoE's own algorithm as its paper states it.
* ``lower_bound`` - a step time no method can beat.

Pure: names only, nothing imported but :mod:`fsmoe_compiler.names`.
"""

from __future__ import annotations

from fsmoe_compiler.names import SEQUENTIAL, TUTEL

FSMOE = "fsmoe"
FSMOE_PAPER = "fsmoe_paper"
LOWER_BOUND = "lower_bound"
#: The baselines ours is compared with, in print order.
BASELINES: tuple[str, ...] = (SEQUENTIAL, TUTEL, FSMOE_PAPER)
#: Every method the simulator runs, in print order: ours, the baselines, the bound.
METHODS: tuple[str, ...] = (FSMOE,) + BASELINES + (LOWER_BOUND,)
#: The name reports give ours (``fsmoe``).
OURS = "ours"
#: Other names accepted for a method.
ALIASES: dict[str, str] = {"cpsat": FSMOE, OURS: FSMOE, "deepspeed": SEQUENTIAL}


def canonical_method(name: str) -> str:
    """The method ``name`` or its alias stands for; ValueError naming the valid methods and aliases."""
    m = ALIASES.get(name, name)
    if m not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return m


def report_name(name: str) -> str:
    """The name a report prints for method ``name``: ``ours`` for ``fsmoe``, else the method's own."""
    m = canonical_method(name)
    return OURS if m == FSMOE else m


#: :data:`METHODS` by the names reports print (keys of ``PointResult.makespan_ms``).
REPORTED_METHODS: tuple[str, ...] = tuple(report_name(m) for m in METHODS)

"""The simulator's methods on a layer stack: one (``schedule_step``), or all on copies of a layer (``evaluate_layer``).

Methods are named in :mod:`.methods` (:data:`~.methods.METHODS`, aliases in
:data:`~.methods.ALIASES`).
"""

from __future__ import annotations

from typing import Sequence

from fsmoe_compiler.names import SEQUENTIAL, TUTEL
from fsmoe_compiler.sim.baselines import fsmoe_paper, sequential, step_lower_bound, tutel
from fsmoe_compiler.sim.costs import ClusterCosts, LayerSpec
from fsmoe_compiler.sim.methods import FSMOE, FSMOE_PAPER, LOWER_BOUND, METHODS, canonical_method
from fsmoe_compiler.sim.search import SearchOptions, SolveCache, fsmoe_step
from fsmoe_compiler.sim.step import StepSchedule

#: Layers in the stack :func:`evaluate_layer` schedules by default (so that one layer's
#: gradient all-reduce can overlap the next layer's backward).
DEFAULT_NUM_LAYERS = 2
#: The baselines (:data:`~.methods.BASELINES`) by name, each ``(specs, costs) -> StepSchedule``.
_BASELINE_FNS = {SEQUENTIAL: sequential, TUTEL: tutel, FSMOE_PAPER: fsmoe_paper}


def schedule_step(specs: Sequence[LayerSpec], costs: ClusterCosts, method: str = FSMOE, max_degree: int = 8,
                  time_limit_s: float = 0.02, cache: SolveCache | None = None,
                  seeds: Sequence[StepSchedule] | None = None, split_weight_grads: bool = False) -> StepSchedule:
    """Schedule one training step (forward + backward) of the layer stack ``specs`` with ``method``.

    ``max_degree`` bounds the pipeline degrees our method and the lower bound
    consider (the baselines use {1, 2, 4, 8} as those systems do);
    ``time_limit_s`` is CP-SAT's deterministic time per solve.
    ``split_weight_grads`` lets our method schedule weight gradients apart
    from input gradients (see :class:`SearchOptions`); the lower bound is then
    the one valid for that relaxation too.
    """
    m = canonical_method(method)
    specs = list(specs)
    if not specs:
        raise ValueError("schedule_step needs at least one LayerSpec")
    if not isinstance(max_degree, int) or max_degree < 1:
        raise ValueError(f"max_degree must be an integer >= 1, got {max_degree!r}")
    if m in _BASELINE_FNS:
        return _BASELINE_FNS[m](specs, costs)
    if m == LOWER_BOUND:
        return step_lower_bound(specs, costs, max_degree, split_weight_grads)
    return fsmoe_step(specs, costs, SearchOptions(max_degree=max_degree, time_limit_s=time_limit_s,
                                                  split_weight_grads=split_weight_grads), cache, seeds)


def evaluate_layer(spec: LayerSpec, costs: ClusterCosts, methods: Sequence[str] = METHODS,
                   num_layers: int = DEFAULT_NUM_LAYERS, max_degree: int = 8, time_limit_s: float = 0.02,
                   cache: SolveCache | None = None, split_weight_grads: bool = False) -> dict[str, StepSchedule]:
    """Every requested method on a stack of ``num_layers`` copies of ``spec``: ``{method: StepSchedule}``.

    The baselines are computed once and also seed our method (so it is never
    worse than any of them). ``StepSchedule.makespan`` is the step time in ms.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    ms = [canonical_method(m) for m in methods]
    specs = [spec] * num_layers
    out: dict[str, StepSchedule] = {}
    need_seeds = FSMOE in ms
    for name, fn in _BASELINE_FNS.items():
        if name in ms or need_seeds:
            out[name] = fn(specs, costs)
    if LOWER_BOUND in ms:
        out[LOWER_BOUND] = step_lower_bound(specs, costs, max_degree, split_weight_grads)
    if need_seeds:
        opts = SearchOptions(max_degree=max_degree, time_limit_s=time_limit_s, split_weight_grads=split_weight_grads)
        out[FSMOE] = fsmoe_step(specs, costs, opts, cache, seeds=[out[k] for k in _BASELINE_FNS])
    keep = set(ms)
    return {k: v for k, v in out.items() if k in keep} | {m: out[canonical_method(m)] for m in methods if m not in out}

"""The words every layer shares: collective kinds and stream names, one word per thing, everywhere.

A collective op is known by its ATen name (``all_to_all_single``,
``all_gather_into_tensor``, ...); everything that reasons about it by kind
(cost-model keys, scheduler task kinds, the simulator's cluster costs, the
report) uses the word in :data:`COLLECTIVE_KINDS`. Task ids abbreviate a kind
with :data:`SHORT`. Pure Python, so the scheduler and the simulator, which
never import torch, share it with the passes and the profiler
(``fsmoe_compiler.ops`` holds the torch side of the vocabulary). The stream
names are what ``passes.annotate`` writes in ``node.meta["fsmoe"]["stream"]``
and the runtime reads.
"""

from __future__ import annotations

ALL_TO_ALL = "all_to_all"
ALL_GATHER = "all_gather"
REDUCE_SCATTER = "reduce_scatter"
ALL_REDUCE = "all_reduce"

#: The collective kinds the cost models fit and the scheduler places on links.
COLLECTIVE_KINDS: tuple[str, ...] = (ALL_TO_ALL, ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE)

#: ATen op name (namespace and overload dropped) -> its kind.
KIND_OF_OP: dict[str, str] = {
    "all_to_all_single": ALL_TO_ALL,
    "all_to_all": ALL_TO_ALL,
    "all_gather_into_tensor": ALL_GATHER,
    "all_gather_into_tensor_coalesced": ALL_GATHER,
    "all_gather_into_tensor_out": ALL_GATHER,
    "reduce_scatter_tensor": REDUCE_SCATTER,
    "reduce_scatter_tensor_coalesced": REDUCE_SCATTER,
    "all_reduce": ALL_REDUCE,
    "all_reduce_": ALL_REDUCE,
    "all_reduce_coalesced": ALL_REDUCE,
    "all_reduce_coalesced_": ALL_REDUCE,
}

#: The one functional op of each kind that the task graph models as a single task with its wait.
MODELED_OPS: dict[str, str] = {
    "all_to_all_single": ALL_TO_ALL,
    "all_gather_into_tensor": ALL_GATHER,
    "reduce_scatter_tensor": REDUCE_SCATTER,
    "all_reduce": ALL_REDUCE,
}

#: Abbreviations used in task ids (``F.L0.c1.a2a0``, ``B.ar2``).
SHORT: dict[str, str] = {ALL_TO_ALL: "a2a", ALL_GATHER: "ag", REDUCE_SCATTER: "rs", ALL_REDUCE: "ar"}


#: The schedules this project compares itself with, by one name each, in the compiler and the simulator alike.
#: ``sequential``: DeepSpeed-MoE's way: no pipelining, every op in the order it was written, no overlap beyond
#: what that order allows. ``tutel``: Tutel's way: each MoE layer split into r chunks (r picked per layer by
#: trying the candidates), compute stage by stage and chunk by chunk in written order (every chunk's dispatch,
#: then each chunk's experts, then the combines), every collective issued as soon as its inputs are ready, one
#: communication queue per link. The compiler applies them to a real task graph (``passes.solve``), the
#: simulator to its layer model (``sim``); the definition is this one.
SEQUENTIAL = "sequential"
TUTEL = "tutel"

#: Streams a scheduled node runs on: collectives and their waits on the communication stream, the rest on compute.
COMPUTE_STREAM = "compute"
COMM_STREAM = "comm"
STREAMS: tuple[str, ...] = (COMPUTE_STREAM, COMM_STREAM)


def comm_key(kind: str, group_size: int) -> str:
    """The cost-model key of collective ``kind`` on a group of ``group_size`` ranks, e.g. ``all_to_all/2``."""
    return f"{kind}/{int(group_size)}"


def check_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`COLLECTIVE_KINDS`, else a ValueError naming the valid kinds."""
    if kind not in COLLECTIVE_KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; valid kinds: {', '.join(COLLECTIVE_KINDS)}")
    return kind

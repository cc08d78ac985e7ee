"""Lower bounds on the makespan: no schedule of the graph can be shorter.

``lower_bound(graph)`` is the larger of the critical path and, per resource, its
busy time sharpened by heads and tails: the tasks of a resource that cannot
start before ``h`` and leave at least ``q`` ms of dependent work after them take
at least ``h + their total duration + q`` (a one-machine relaxation; with h = 0
and q = 0 it is the plain busy time).
"""

from __future__ import annotations

from fsmoe_compiler.scheduler.heuristic import heads, tails
from fsmoe_compiler.scheduler.taskgraph import RESOURCES, TaskGraph


def resource_loads(graph: TaskGraph) -> dict[str, float]:
    """Total duration of the tasks on each resource."""
    return {r: graph.total(r) for r in RESOURCES}


def resource_bound(graph: TaskGraph) -> float:
    """Max over resources of ``h + load(S) + q`` for task sets S = {head >= h, tail-after >= q}.

    Every task of S starts no earlier than h, they run one at a time, and
    after the last of them at least q ms of dependent work remains: a
    one-machine relaxation with release times and delivery times.
    """
    arr = graph.arrays()
    hd = heads(arr)
    tl = tails(arr)
    best = 0.0
    for r in range(len(RESOURCES)):
        items = [(hd[i], arr.dur[i], tl[i] - arr.dur[i]) for i in range(len(arr.ids)) if arr.res[i] == r]
        if not items:
            continue
        items.sort(key=lambda x: -x[0])  # by head, latest first
        qs = sorted({q for _, _, q in items})
        for q in qs:
            load = 0.0
            for h, d, qq in items:  # growing prefix of heads >= h
                if qq >= q:
                    load += d
                    v = h + load + q
                    if v > best:
                        best = v
    return best


def lower_bound(graph: TaskGraph) -> float:
    """max(critical path, per-resource load bound) in ms; valid for every schedule of ``graph``."""
    arr = graph.arrays()
    cp = max(tails(arr), default=0.0)
    return max(cp, resource_bound(graph))

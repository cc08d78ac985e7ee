"""Lower bounds on the makespan: no schedule of the graph can be shorter.

``lower_bound(graph)`` is the larger of the critical path and, per resource, its
busy time sharpened by heads and tails: a resource's tasks that cannot start
before ``h`` take at least ``h + their total duration + the smallest remaining
tail after them`` (a one-machine relaxation; with h = 0 and no tail it is the
plain busy time).
"""

from __future__ import annotations

from fsmoe_compiler.scheduler.heuristic import heads, tails
from fsmoe_compiler.scheduler.taskgraph import RESOURCES, TaskGraph


def resource_loads(graph: TaskGraph) -> dict[str, float]:
    """Total duration of the tasks on each resource."""
    return {r: graph.total(r) for r in RESOURCES}


def resource_bound(graph: TaskGraph) -> float:
    """Max over resources and release times h of ``h + load(tasks with head >= h) + min tail after them``."""
    arr = graph.arrays()
    hd = heads(arr)
    tl = tails(arr)
    best = 0.0
    for r in range(len(RESOURCES)):
        items = sorted((hd[i], arr.dur[i], tl[i] - arr.dur[i]) for i in range(len(arr.ids)) if arr.res[i] == r)
        load = 0.0
        min_q = float("inf")
        for h, d, q in reversed(items):  # suffix of tasks released at >= h
            load += d
            if q < min_q:
                min_q = q
            v = h + load + min_q
            if v > best:
                best = v
    return best


def lower_bound(graph: TaskGraph) -> float:
    """max(critical path, per-resource load bound) in ms; valid for every schedule of ``graph``."""
    arr = graph.arrays()
    cp = max(tails(arr), default=0.0)
    return max(cp, resource_bound(graph))

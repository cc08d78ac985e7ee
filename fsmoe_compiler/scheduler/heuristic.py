"""List scheduling and fixed-order replay: fast schedules without a solver.

``list_schedule`` is a serial schedule-generation scheme with insertion: tasks
are taken in priority order (longest remaining path first, the critical-path
rule) and each is put in the earliest gap of its resource that is long enough
and after its predecessors end. ``parallel_starts`` is the parallel
(non-delay) scheme: whenever a resource idles it starts its most urgent ready
task. ``fixed_order_schedule`` runs tasks in a given
per-resource order, each as early as possible: that is how a system with one
FIFO stream per resource executes (the baselines), and how a solver's order is
turned back into exact float times.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_right
from typing import Callable

from fsmoe_compiler.scheduler.schedule import Schedule
from fsmoe_compiler.scheduler.taskgraph import RESOURCES, GraphArrays, TaskGraph


def tails(arr: GraphArrays) -> list[float]:
    """Longest path from each task to the end of the graph, the task's own duration included."""
    tail = [0.0] * len(arr.ids)
    dur, succs = arr.dur, arr.succs
    for i in reversed(arr.topo):
        best = 0.0
        for j in succs[i]:
            if tail[j] > best:
                best = tail[j]
        tail[i] = best + dur[i]
    return tail


def heads(arr: GraphArrays) -> list[float]:
    """Earliest start of each task if resources were unlimited."""
    head = [0.0] * len(arr.ids)
    dur, preds = arr.dur, arr.preds
    for i in arr.topo:
        best = 0.0
        for j in preds[i]:
            e = head[j] + dur[j]
            if e > best:
                best = e
        head[i] = best
    return head


def critical_path(graph: TaskGraph) -> float:
    """Length of the longest dependency chain (ms)."""
    arr = graph.arrays()
    return max(tails(arr), default=0.0)


def _to_schedule(graph: TaskGraph, arr: GraphArrays, start: list[float], method: str, status: str,
                 t0: float, meta: dict | None = None) -> Schedule:
    ids, dur, res = arr.ids, arr.dur, arr.res
    end = [s + d for s, d in zip(start, dur)]
    rank = [0] * len(ids)
    for k, i in enumerate(arr.topo):
        rank[i] = k
    order: dict[str, list[str]] = {r: [] for r in RESOURCES}
    for i in sorted(range(len(ids)), key=lambda i: (start[i], end[i], rank[i])):
        order[RESOURCES[res[i]]].append(ids[i])
    return Schedule(start=dict(zip(ids, start)), end=dict(zip(ids, end)), order=order,
                    makespan=max(end, default=0.0), method=method, status=status,
                    solve_time_s=time.perf_counter() - t0, meta=dict(meta or {}))


def _priority_keys(arr: GraphArrays, priority: Callable[[int, GraphArrays, list[float]], tuple] | None
                   ) -> list[tuple]:
    """Per task index, its list-scheduling priority (smaller first): longest tail to the end by default, ties
    broken by topological rank."""
    tail = tails(arr)
    rank = [0] * len(arr.ids)
    for k, i in enumerate(arr.topo):
        rank[i] = k
    if priority is None:
        return [(-tail[i], rank[i]) for i in range(len(arr.ids))]
    return [priority(i, arr, tail) + (rank[i],) for i in range(len(arr.ids))]


def list_starts(graph: TaskGraph, priority: Callable[[int, GraphArrays, list[float]], tuple] | None = None
                ) -> tuple[list[float], float]:
    """Core of :func:`list_schedule`: start times by task index and the makespan (no Schedule built)."""
    arr = graph.arrays()
    n = len(arr.ids)
    keys = _priority_keys(arr, priority)
    dur, res, preds, succs = arr.dur, arr.res, arr.preds, arr.succs
    indeg = [len(p) for p in preds]
    est = [0.0] * n
    start = [0.0] * n
    rs: list[list[float]] = [[] for _ in RESOURCES]  # busy interval starts, sorted
    re: list[list[float]] = [[] for _ in RESOURCES]  # matching ends (also sorted: intervals are disjoint)
    heap = [(keys[i], i) for i in range(n) if indeg[i] == 0]
    heapq.heapify(heap)
    makespan = 0.0
    while heap:
        _, i = heapq.heappop(heap)
        d = dur[i]
        t = est[i]
        S, E = rs[res[i]], re[res[i]]
        k = bisect_right(E, t)  # first interval ending after t
        m = len(S)
        while k < m:
            if S[k] >= t + d:
                break
            if E[k] > t:
                t = E[k]
            k += 1
        S.insert(k, t)
        e = t + d
        E.insert(k, e)
        start[i] = t
        if e > makespan:
            makespan = e
        for j in succs[i]:
            if e > est[j]:
                est[j] = e
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(heap, (keys[j], j))
    return start, makespan


def parallel_starts(graph: TaskGraph, priority: Callable[[int, GraphArrays, list[float]], tuple] | None = None
                    ) -> tuple[list[float], float]:
    """Parallel (non-delay) schedule generation: start times by task index and the makespan.

    Time advances from event to event; whenever a resource is idle, it starts
    the most urgent of the tasks that are ready on it (every predecessor has
    ended), so no resource idles while it has work. Complements the serial
    scheme of :func:`list_starts`, which appends low-priority fillers (split
    weight gradients) at the end when no gap is long enough for them: here
    they run as soon as the resource would otherwise idle.
    """
    arr = graph.arrays()
    n = len(arr.ids)
    keys = _priority_keys(arr, priority)
    dur, res, preds, succs = arr.dur, arr.res, arr.preds, arr.succs
    nres = len(RESOURCES)
    indeg = [len(p) for p in preds]
    ready: list[list] = [[] for _ in range(nres)]  # per resource: heap of (key, i)
    for i in range(n):
        if indeg[i] == 0:
            heapq.heappush(ready[res[i]], (keys[i], i))
    busy_until = [0.0] * nres
    running: list[tuple[float, int]] = []  # heap of (end, i)
    start = [0.0] * n
    t = 0.0
    makespan = 0.0
    done = 0
    while done < n:
        for r in range(nres):
            if busy_until[r] <= t and ready[r]:
                _, i = heapq.heappop(ready[r])
                start[i] = t
                e = t + dur[i]
                busy_until[r] = e
                heapq.heappush(running, (e, keys[i][-1], i))  # ties by topological rank
        if not running:  # pragma: no cover - a valid DAG always has something running or ready
            raise ValueError("parallel_starts: no task can run (dependency cycle?)")
        t = running[0][0]
        while running and running[0][0] <= t:
            e, _, i = heapq.heappop(running)
            done += 1
            if e > makespan:
                makespan = e
            for j in succs[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(ready[res[j]], (keys[j], j))
    return start, makespan


def _sgs(n: int, order: list[int], dur: list[float], res: list[int], preds: list[list[int]]) -> tuple[list[float], float]:
    """Serial schedule generation with insertion over a precedence-feasible activity list."""
    start = [0.0] * n
    end = [0.0] * n
    rs: list[list[float]] = [[] for _ in RESOURCES]
    re: list[list[float]] = [[] for _ in RESOURCES]
    makespan = 0.0
    for i in order:
        d = dur[i]
        t = 0.0
        for j in preds[i]:
            if end[j] > t:
                t = end[j]
        S, E = rs[res[i]], re[res[i]]
        k = bisect_right(E, t)
        m = len(S)
        while k < m:
            if S[k] >= t + d:
                break
            if E[k] > t:
                t = E[k]
            k += 1
        S.insert(k, t)
        E.insert(k, t + d)
        start[i] = t
        end[i] = t + d
        if end[i] > makespan:
            makespan = end[i]
    return start, makespan


def justify(graph: TaskGraph, start: list[float], rounds: int = 2) -> tuple[list[float], float]:
    """Forward-backward improvement: right-justify, then left-justify, ``rounds`` times; never worse.

    Pushing every task as late as possible (latest-ending first) and then as
    early as possible (earliest-starting first) closes gaps that a single
    list-scheduling pass leaves; a classic RCPSP improvement step.
    """
    arr = graph.arrays()
    n = len(arr.ids)
    rank = [0] * n
    for k, i in enumerate(arr.topo):
        rank[i] = k
    dur = arr.dur
    best = list(start)
    best_ms = max((s + d for s, d in zip(start, dur)), default=0.0)
    cur = best
    for _ in range(rounds):
        end = [s + d for s, d in zip(cur, dur)]
        order = sorted(range(n), key=lambda i: (-end[i], -rank[i]))
        mir, T = _sgs(n, order, dur, arr.res, arr.succs)
        back = [T - (mir[i] + dur[i]) for i in range(n)]
        order = sorted(range(n), key=lambda i: (back[i], rank[i]))
        cur, ms = _sgs(n, order, dur, arr.res, arr.preds)
        if ms < best_ms - 1e-12:
            best, best_ms = cur, ms
        else:
            break
    return best, best_ms


def list_schedule(graph: TaskGraph, priority: Callable[[int, GraphArrays, list[float]], tuple] | None = None,
                  method: str = "heuristic") -> Schedule:
    """Critical-path list scheduling with insertion into resource gaps.

    ``priority(i, arrays, tails)`` returns a sort key (smaller runs first);
    the default is ``-tail`` (longest remaining path first), ties by
    topological position.
    """
    t0 = time.perf_counter()
    start, _ = list_starts(graph, priority)
    return _to_schedule(graph, graph.arrays(), start, method, "HEURISTIC", t0)


def fill_last_priority(graph: TaskGraph) -> Callable[[int, GraphArrays, list[float]], tuple]:
    """Priority that schedules gradient all-reduce partitions last (they fill gaps), others by critical path."""
    arr = graph.arrays()
    low = [graph.tasks[t].role == "grad_sync" for t in arr.ids]
    return lambda i, a, tail: (1 if low[i] else 0, -tail[i])


def wgrad_last_priority(graph: TaskGraph) -> Callable[[int, GraphArrays, list[float]], tuple]:
    """Priority that runs split-off weight gradients after the input-gradient chain (they fill compute gaps)."""
    arr = graph.arrays()
    lvl = [1 if graph.tasks[t].role in ("expert_wgrad", "dense_wgrad") else 0 for t in arr.ids]
    return lambda i, a, tail: (lvl[i], -tail[i])


def attn_w_priority(graph: TaskGraph, before: bool) -> Callable[[int, GraphArrays, list[float]], tuple]:
    """Priority that runs each attention weight gradient right after (or right before) its input gradient.

    The weight gradient feeds the all-reduce: running it early lets the
    all-reduce overlap the layers below, which the plain critical-path rule
    (blind to the inter link's load) does not see.
    """
    arr = graph.arrays()
    partner = {}
    for t in arr.ids:
        if graph.tasks[t].role == "dense_wgrad" and t.endswith("_w") and t[:-2] in arr.index:
            partner[arr.index[t]] = arr.index[t[:-2]]
    eps = 1e-9

    def key(i: int, a: GraphArrays, tail: list[float]) -> tuple:
        j = partner.get(i)
        if j is None:
            return (-tail[i],)
        return (-(tail[j] + eps) if before else -(tail[j] - eps),)

    return key


#: With weight gradients split off: also try the attention-weight-gradient rules with all-reduce slices last.
SPLIT_AR_LAST_RULES = True
#: With weight gradients split off: also try parallel (non-delay) generation (:func:`parallel_starts`) with
#: the critical-path and weight-gradient rules.
SPLIT_PARALLEL_RULES = True


def heuristic_starts(graph: TaskGraph, improve: bool = False) -> tuple[list[float], float]:
    """Best start times (by task index) of the critical-path rule and the fill-last rules, and the makespan.

    On graphs with split weight gradients the rules also run through the
    parallel (non-delay) scheme (:data:`SPLIT_PARALLEL_RULES`).

    ``improve`` adds forward-backward justification (:func:`justify`)."""
    best = list_starts(graph)
    roles = {t.role for t in graph.tasks.values()}
    if "grad_sync" in roles:
        alt = list_starts(graph, priority=fill_last_priority(graph))
        if alt[1] < best[1] - 1e-9:
            best = alt
    if "expert_wgrad" in roles or "dense_wgrad" in roles:
        rules = [wgrad_last_priority(graph), attn_w_priority(graph, False), attn_w_priority(graph, True)]
        if "grad_sync" in roles and SPLIT_AR_LAST_RULES:  # the same with the all-reduce slices filling gaps last
            arr = graph.arrays()
            low = [graph.tasks[t].role == "grad_sync" for t in arr.ids]
            rules += [(lambda pr: (lambda i, a, tl: (1 if low[i] else 0,) + pr(i, a, tl)))(pr) for pr in rules[1:]]
        for pr in rules:
            alt = list_starts(graph, priority=pr)
            if alt[1] < best[1] - 1e-9:
                best = alt
        if SPLIT_PARALLEL_RULES:  # non-delay generation: fillers run whenever compute would idle
            for pr in [None] + rules[:3]:
                alt = parallel_starts(graph, priority=pr)
                if alt[1] < best[1] - 1e-9:
                    best = alt
    if improve:
        alt = justify(graph, best[0])
        if alt[1] < best[1] - 1e-9:
            best = alt
    return best


def heuristic_schedule(graph: TaskGraph, method: str = "heuristic") -> Schedule:
    """The best of :func:`heuristic_starts`' list-scheduling rules, as a Schedule (status ``HEURISTIC``)."""
    t0 = time.perf_counter()
    start, _ = heuristic_starts(graph)
    return _to_schedule(graph, graph.arrays(), start, method, "HEURISTIC", t0)


def schedule_from_starts(graph: TaskGraph, start: list[float], method: str = "heuristic",
                         status: str = "HEURISTIC") -> Schedule:
    """A Schedule from start times indexed like ``graph.arrays().ids``."""
    return _to_schedule(graph, graph.arrays(), start, method, status, time.perf_counter())


def fixed_order_schedule(graph: TaskGraph, order: dict[str, list[str]], method: str = "fixed_order",
                         status: str = "FIXED_ORDER", meta: dict | None = None) -> Schedule:
    """Run each resource's tasks in the given order, each as early as possible.

    ``order`` maps a resource to its task ids; together they must list every
    task once. Raises ValueError if the order contradicts the dependencies
    (a FIFO stream would deadlock).
    """
    t0 = time.perf_counter()
    arr = graph.arrays()
    n = len(arr.ids)
    index = arr.index
    seqs: list[list[int]] = []
    seen = 0
    for r in RESOURCES:
        seq = [index[t] for t in order.get(r, [])]
        for i in seq:
            if RESOURCES[arr.res[i]] != r:
                raise ValueError(f"task {arr.ids[i]!r} runs on {RESOURCES[arr.res[i]]!r}, listed under {r!r}")
        seqs.append(seq)
        seen += len(seq)
    bad = [r for r in order if r not in RESOURCES]
    if bad:
        raise ValueError(f"unknown resource {bad[0]!r} in order; valid resources: {', '.join(RESOURCES)}")
    if seen != n or len({i for s in seqs for i in s}) != n:
        raise ValueError(f"order must list each of the {n} tasks exactly once, got {seen} entries")
    dur, preds = arr.dur, arr.preds
    done = [False] * n
    end = [0.0] * n
    start = [0.0] * n
    ptr = [0] * len(RESOURCES)
    free = [0.0] * len(RESOURCES)
    left = n
    while left:
        progressed = False
        for r, seq in enumerate(seqs):
            while ptr[r] < len(seq):
                i = seq[ptr[r]]
                if not all(done[j] for j in preds[i]):
                    break
                s = free[r]
                for j in preds[i]:
                    if end[j] > s:
                        s = end[j]
                start[i] = s
                end[i] = free[r] = s + dur[i]
                done[i] = True
                ptr[r] += 1
                left -= 1
                progressed = True
        if not progressed:
            heads_ = [arr.ids[seq[ptr[r]]] for r, seq in enumerate(seqs) if ptr[r] < len(seq)]
            raise ValueError(f"order deadlocks: the next task of every resource waits on another ({heads_})")
    return _to_schedule(graph, arr, start, method, status, t0, meta)


def replay(graph: TaskGraph, schedule: Schedule, method: str | None = None, status: str | None = None) -> Schedule:
    """Left-justify ``schedule`` on ``graph``: keep each resource's order, start every task as early as possible.

    ``schedule`` may come from a graph with the same task ids but another
    resource mapping (e.g. Tutel's single comm stream); its start times then
    give the order on ``graph``'s resources. Never later than the input.
    """
    arr = graph.arrays()
    rank = {arr.ids[j]: k for k, j in enumerate(arr.topo)}
    order: dict[str, list[str]] = {r: [] for r in RESOURCES}
    for tid in sorted(graph.tasks, key=lambda t: (schedule.start[t], schedule.end[t], rank[t])):
        order[graph.tasks[tid].resource].append(tid)
    return fixed_order_schedule(graph, order, method=method or schedule.method, status=status or schedule.status,
                                meta=schedule.meta)

"""Exact scheduling with OR-Tools CP-SAT.

One interval variable per task, ``add_no_overlap`` per resource, a precedence
per dependency, the makespan as the max of the task ends; minimise it. Times
are integers (ms scaled to microseconds); the solver's per-resource order is
then replayed in float time so the returned schedule is exact. The model is
warm-started from the heuristic (or a given hint), bounded above by it, and
solved single-threaded with a fixed seed and a *deterministic* time limit, so
the result is reproducible. The returned schedule is never worse than the
heuristic's: if CP-SAT finds nothing in its limit, or something worse, the
heuristic's schedule comes back and ``status`` says so.
"""

from __future__ import annotations

import time

from ortools.sat.python import cp_model

from fsmoe_compiler.names import ALL_REDUCE
from fsmoe_compiler.scheduler.heuristic import heuristic_schedule, replay
from fsmoe_compiler.scheduler.schedule import Schedule
from fsmoe_compiler.scheduler.taskgraph import RESOURCES, TaskGraph

#: Integer time units per ms in the CP-SAT model (1 unit = 1 us), at least; graphs with tasks shorter
#: than ~20 us get a finer unit so that their durations do not round to zero.
SCALE = 1000
#: CP-SAT's LP relaxation level. 0 (no LP) finds better makespans within a short deterministic
#: limit on these graphs (measured on the FSMoE grid: like doubling the limit at level 1).
LINEARIZATION_LEVEL = 0
#: Fewest integer units the shortest task gets.
MIN_UNITS = 20.0


def _symmetric_chunk_pairs(graph: TaskGraph) -> list[tuple[str, str]]:
    """Pairs (a, b) where a may be required to start no later than b without losing optimality.

    Chunks i and i+1 of one pipelined op are interchangeable when their whole
    chains (same layer, phase; every role) have equal durations and their
    predecessors/successors outside the chain are the same: then any schedule
    can be relabelled so that chunk i's first task starts first. Gradient
    partitions of one layer with equal size and the same predecessors are
    interchangeable too.
    """
    groups: dict[tuple, dict[int, list]] = {}
    for t in graph.tasks.values():
        if t.chunk >= 0:
            groups.setdefault((t.layer, t.phase, t.kind == ALL_REDUCE), {}).setdefault(t.chunk, []).append(t)
    pairs: list[tuple[str, str]] = []
    for (layer, phase, is_ar), chunks in groups.items():
        keys = sorted(chunks)
        for a, b in zip(keys, keys[1:]):
            ca = sorted(chunks[a], key=lambda t: t.role)
            cb = sorted(chunks[b], key=lambda t: t.role)
            if [(t.role, t.resource, t.duration) for t in ca] != [(t.role, t.resource, t.duration) for t in cb]:
                continue
            ida = {t.id for t in ca}
            idb = {t.id for t in cb}
            ext_ok = True
            for x, y in zip(ca, cb):
                px = {p for p in graph.preds(x.id) if p not in ida}
                py = {p for p in graph.preds(y.id) if p not in idb}
                sx = {s for s in graph.succs(x.id) if s not in ida}
                sy = {s for s in graph.succs(y.id) if s not in idb}
                if px != py or sx != sy:
                    ext_ok = False
                    break
            if not ext_ok:
                continue
            # the chain's first task: one with no predecessor inside the chunk
            heads_a = [t for t in ca if not any(p in ida for p in graph.preds(t.id))]
            heads_b = [t for t in cb if not any(p in idb for p in graph.preds(t.id))]
            if len(heads_a) == 1 and len(heads_b) == 1:
                pairs.append((heads_a[0].id, heads_b[0].id))
    return pairs


def solve_cpsat(graph: TaskGraph, time_limit_s: float = 0.05, hint: Schedule | None = None,
                heuristic: Schedule | None = None, method: str = "cpsat", seed: int = 0,
                symmetry_breaking: bool = True, wall_limit_s: float | None = None,
                skip_if_tight: bool = True, bound: float | None = None) -> Schedule:
    """Minimise the makespan of ``graph`` with CP-SAT; never worse than the heuristic.

    ``time_limit_s`` is CP-SAT's deterministic time (reproducible across
    runs and machines); ``wall_limit_s`` (default 20x that plus 1 s) is only a
    safety net. ``hint`` warm-starts the solver (default: the heuristic's
    schedule, computed here unless ``heuristic`` is given). Status: ``OPTIMAL``
    or ``FEASIBLE`` when CP-SAT's schedule is returned, ``FALLBACK_NO_SOLUTION``
    / ``FALLBACK_WORSE`` when the heuristic's is. With ``skip_if_tight`` the
    solver is not called when the best known schedule already meets
    :func:`lower_bound` (it is optimal; status ``OPTIMAL``); ``bound`` is that
    bound when the caller already has it.
    """
    t0 = time.perf_counter()
    arr = graph.arrays()
    if heuristic is None:
        heuristic = heuristic_schedule(graph)
    best_known = heuristic if hint is None or heuristic.makespan <= hint.makespan else replay(graph, hint)
    if hint is None:
        hint = best_known
    n = len(arr.ids)
    if n == 0:
        return heuristic
    if skip_if_tight:
        from fsmoe_compiler.scheduler.bounds import lower_bound

        lb = lower_bound(graph) if bound is None else bound
        if best_known.makespan <= lb * (1 + 1e-9) + 1e-9:
            out = _copy(best_known, method, "OPTIMAL", t0)
            out.meta["proof"] = "meets lower bound"
            return out
    # ms -> integer units: microseconds, finer when some task is shorter than ~20 us (coarse units keep the
    # solver fast; the exact float times come from replaying its order below)
    pos = [d for d in arr.dur if d > 0]
    scale = max(float(SCALE), MIN_UNITS / min(pos)) if pos else float(SCALE)
    scale = min(scale, 1e12 / max(sum(arr.dur), 1e-300))
    dur = [int(round(d * scale)) for d in arr.dur]
    horizon = sum(dur) + 1
    m = cp_model.CpModel()
    starts, ends, ivs = [], [], []
    for i, tid in enumerate(arr.ids):
        s = m.new_int_var(0, horizon, f"s{i}")
        e = m.new_int_var(0, horizon, f"e{i}")
        ivs.append(m.new_interval_var(s, dur[i], e, f"iv{i}"))
        starts.append(s)
        ends.append(e)
    for r in range(len(RESOURCES)):
        members = [ivs[i] for i in range(n) if arr.res[i] == r and dur[i] > 0]
        if len(members) > 1:
            m.add_no_overlap(members)
    for i in range(n):
        for j in arr.succs[i]:
            m.add(starts[j] >= ends[i])
    hint_start = _integer_starts(arr, dur, hint) if set(hint.start) >= set(arr.ids) else None
    if symmetry_breaking:
        for a, b in _symmetric_chunk_pairs(graph):
            ia, ib = arr.index[a], arr.index[b]
            if hint_start is None or hint_start[ia] <= hint_start[ib]:  # never cut off the hint
                m.add(starts[ia] <= starts[ib])
    makespan = m.new_int_var(0, horizon, "makespan")
    m.add_max_equality(makespan, ends)
    # Integer rounding can move the hint's makespan by a few units; allow slack of n units.
    cap = int(round(best_known.makespan * scale)) + n + 1
    if hint_start is not None:  # a complete hint, feasible in integer time: CP-SAT starts from a solution
        hint_end = [hint_start[i] + dur[i] for i in range(n)]
        cap = max(cap, max(hint_end))
        for i in range(n):
            m.add_hint(starts[i], hint_start[i])
            m.add_hint(ends[i], hint_end[i])
        m.add_hint(makespan, max(hint_end))
    m.add(makespan <= cap)
    m.minimize(makespan)
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = 1
    p.random_seed = seed
    p.linearization_level = LINEARIZATION_LEVEL
    p.max_deterministic_time = float(time_limit_s)
    p.max_time_in_seconds = float(wall_limit_s if wall_limit_s is not None else 20 * time_limit_s + 1.0)
    st = solver.solve(m)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        out = _copy(best_known, method, "FALLBACK_NO_SOLUTION", t0)
        out.meta["cpsat_status"] = solver.status_name(st)
        return out
    # exact float times from the solver's order (integer rounding only picked the order); the order is
    # taken from the model's integer times, which respect every dependency, so replaying it cannot deadlock
    sol = {tid: solver.value(starts[i]) / scale for i, tid in enumerate(arr.ids)}
    end_t = {tid: solver.value(ends[i]) / scale for i, tid in enumerate(arr.ids)}
    ref = Schedule(start=sol, end=end_t, order={}, makespan=0.0)
    exact = replay(graph, ref, method=method, status="OPTIMAL" if st == cp_model.OPTIMAL else "FEASIBLE")
    exact.meta["cpsat_objective_ms"] = solver.objective_value / scale
    exact.meta["cpsat_bound_ms"] = solver.best_objective_bound / scale
    if exact.makespan > best_known.makespan + 1e-9:
        out = _copy(best_known, method, "FALLBACK_WORSE", t0)
        out.meta["cpsat_makespan"] = exact.makespan
        return out
    exact.solve_time_s = time.perf_counter() - t0
    return exact


def _integer_starts(arr, dur: list[int], hint: Schedule) -> list[int]:
    """``hint``'s per-resource order replayed in integer time units: a solution of the CP-SAT model.

    Rounding the hint's float times independently can make a task start one
    unit before its predecessor ends, and CP-SAT then drops the whole hint;
    replaying the order (each task as early as its predecessors and the
    previous task on its resource allow) keeps every constraint.
    """
    rank = {j: k for k, j in enumerate(arr.topo)}
    order = sorted(range(len(arr.ids)), key=lambda i: (hint.start[arr.ids[i]], hint.end[arr.ids[i]], rank[i]))
    start = [0] * len(arr.ids)
    end = [0] * len(arr.ids)
    free: dict[int, int] = {}
    for i in order:
        t = max([end[p] for p in arr.preds[i]], default=0)
        if dur[i] > 0:
            t = max(t, free.get(arr.res[i], 0))
            free[arr.res[i]] = t + dur[i]
        start[i], end[i] = t, t + dur[i]
    return start


def _copy(s: Schedule, method: str, status: str, t0: float) -> Schedule:
    return Schedule(start=dict(s.start), end=dict(s.end), order={k: list(v) for k, v in s.order.items()},
                    makespan=s.makespan, method=method, status=status, solve_time_s=time.perf_counter() - t0,
                    meta=dict(s.meta))

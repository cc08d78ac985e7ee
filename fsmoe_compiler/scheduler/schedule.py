"""Schedules and their checker.

A ``Schedule`` gives every task of a TaskGraph a start and an end, the order in
which each resource runs its tasks, the makespan, and how it was found (method,
solver status, solve time). ``validate_schedule`` is the single source of truth
for "this schedule can run": tests, solvers and the simulator all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsmoe_compiler.scheduler.taskgraph import RESOURCES, TaskGraph

#: Absolute tolerance (ms) when checking float start/end times.
EPS = 1e-6

#: Solver statuses a Schedule can carry.
STATUSES = ("OPTIMAL", "FEASIBLE", "HEURISTIC", "FIXED_ORDER", "CLOSED_FORM", "BOUND",
            "FALLBACK_NO_SOLUTION", "FALLBACK_WORSE")


class ScheduleError(ValueError):
    """A schedule that cannot run as stated (the message says which task and why)."""


@dataclass
class Schedule:
    """Start/end per task id, per-resource order, makespan, provenance.

    ``status`` is one of :data:`STATUSES`: ``OPTIMAL``/``FEASIBLE`` from CP-SAT,
    ``HEURISTIC`` from list scheduling, ``FIXED_ORDER`` from replaying a given
    per-resource order, ``FALLBACK_*`` when CP-SAT could not beat or find a
    schedule and the heuristic's was returned. ``meta`` carries extras such
    as the chosen pipeline degrees.
    """

    start: dict[str, float]
    end: dict[str, float]
    order: dict[str, list[str]]
    makespan: float
    method: str = ""
    status: str = "HEURISTIC"
    solve_time_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_times(cls, graph: TaskGraph, start: dict[str, float], method: str = "", status: str = "HEURISTIC",
                   solve_time_s: float = 0.0, meta: dict | None = None) -> "Schedule":
        """Build from start times: ends from durations, orders sorted by start."""
        end = {tid: start[tid] + graph.tasks[tid].duration for tid in start}
        arr = graph.arrays()
        topo = {arr.ids[j]: i for i, j in enumerate(arr.topo)}
        order: dict[str, list[str]] = {r: [] for r in RESOURCES}
        for tid in sorted(start, key=lambda t: (start[t], end[t], topo.get(t, 0))):
            order[graph.tasks[tid].resource].append(tid)
        return cls(start=dict(start), end=end, order=order, makespan=max(end.values(), default=0.0),
                   method=method, status=status, solve_time_s=solve_time_s, meta=dict(meta or {}))

    def __repr__(self) -> str:
        return (f"Schedule(method={self.method!r}, makespan={self.makespan:.4f} ms, status={self.status}, "
                f"{len(self.start)} tasks, solve {self.solve_time_s * 1e3:.1f} ms)")


def validate_schedule(graph: TaskGraph, schedule: Schedule, eps: float = EPS) -> Schedule:
    """Raise :class:`ScheduleError` unless ``schedule`` is a valid schedule of ``graph``.

    Checks: every task scheduled exactly once (and nothing else), end = start +
    duration, start >= 0, dependencies respected, per-resource orders list
    exactly that resource's tasks in start order, no two tasks overlap on one
    resource, and the makespan equals the latest end.
    """
    graph.validate()
    tasks = graph.tasks
    missing = [t for t in tasks if t not in schedule.start]
    if missing:
        raise ScheduleError(f"{len(missing)} task(s) not scheduled, e.g. {missing[:3]}")
    extra = [t for t in schedule.start if t not in tasks]
    if extra:
        raise ScheduleError(f"schedule has unknown task(s) {extra[:3]}; not in the graph")
    if set(schedule.end) != set(schedule.start):
        raise ScheduleError("schedule.start and schedule.end name different tasks")
    for tid, t in tasks.items():
        s, e = schedule.start[tid], schedule.end[tid]
        if not (s == s and e == e) or s < -eps:
            raise ScheduleError(f"task {tid!r} has invalid start {s!r} / end {e!r}")
        if abs((e - s) - t.duration) > eps * max(1.0, t.duration):
            raise ScheduleError(f"task {tid!r}: end - start = {e - s:.6f} ms but duration is {t.duration:.6f} ms")
    for u, v in graph.deps:
        if schedule.start[v] < schedule.end[u] - eps:
            raise ScheduleError(f"dependency {u!r} -> {v!r} violated: {v!r} starts at {schedule.start[v]:.6f} "
                                f"before {u!r} ends at {schedule.end[u]:.6f}")
    bad_res = [r for r in schedule.order if r not in RESOURCES]
    if bad_res:
        raise ScheduleError(f"schedule.order has unknown resource {bad_res[0]!r}; valid resources: {', '.join(RESOURCES)}")
    seen: set[str] = set()
    for r in RESOURCES:
        order = schedule.order.get(r, [])
        want = {tid for tid, t in tasks.items() if t.resource == r}
        if len(order) != len(set(order)):
            dup = next(t for t in order if order.count(t) > 1)
            raise ScheduleError(f"task {dup!r} appears more than once in the order of resource {r!r}")
        if set(order) != want:
            diff = sorted(set(order) ^ want)
            raise ScheduleError(f"order of resource {r!r} does not list exactly its tasks; mismatch: {diff[:3]}")
        seen.update(order)
        for a, b in zip(order, order[1:]):
            if schedule.start[b] < schedule.start[a] - eps:
                raise ScheduleError(f"order of resource {r!r} lists {a!r} before {b!r} but {b!r} starts earlier")
            if schedule.start[b] < schedule.end[a] - eps:
                raise ScheduleError(f"tasks {a!r} [{schedule.start[a]:.6f}, {schedule.end[a]:.6f}) and {b!r} "
                                    f"[{schedule.start[b]:.6f}, {schedule.end[b]:.6f}) overlap on resource {r!r}")
    latest = max(schedule.end.values(), default=0.0)
    if abs(schedule.makespan - latest) > eps * max(1.0, latest):
        raise ScheduleError(f"makespan {schedule.makespan:.6f} ms != latest end {latest:.6f} ms")
    return schedule

"""``StepSchedule``: the schedule of one training step (forward + backward of a stack) and how it was chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fsmoe_compiler.scheduler.schedule import Schedule
from fsmoe_compiler.scheduler.taskgraph import TaskGraph


@dataclass
class StepSchedule:
    """A method's plan for one step of a layer stack.

    ``makespan`` (ms) is the step time; ``forward_ms`` / ``backward_ms`` split
    it at the loss. ``r_fwd`` / ``r_bwd`` are the pipeline degrees per layer,
    ``grad_partitions`` the dense-gradient all-reduce slices per layer
    (elements; empty when the method all-reduces one bucket after the
    backward). ``graph`` is the step's TaskGraph and ``schedule`` a Schedule
    of it that :func:`validate_schedule` accepts; both are built on first
    access (cheap to skip in large sweeps). For ``lower_bound`` both are None.
    """

    method: str
    makespan: float
    forward_ms: float
    backward_ms: float
    r_fwd: list[int]
    r_bwd: list[int]
    grad_partitions: list[list[float]]
    status: str = "HEURISTIC"
    solve_time_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    _graph_fn: Callable[[], TaskGraph] | None = field(default=None, repr=False)
    _schedule_fn: Callable[[TaskGraph], Schedule] | None = field(default=None, repr=False)
    _graph: TaskGraph | None = field(default=None, repr=False)
    _schedule: Schedule | None = field(default=None, repr=False)

    @property
    def graph(self) -> TaskGraph | None:
        if self._graph is None and self._graph_fn is not None:
            self._graph = self._graph_fn()
        return self._graph

    @property
    def schedule(self) -> Schedule | None:
        if self._schedule is None and self._schedule_fn is not None:
            g = self.graph
            self._schedule = self._schedule_fn(g)
            self._schedule.method = self.method
        return self._schedule

    def __repr__(self) -> str:
        return (f"StepSchedule({self.method!r}, makespan={self.makespan:.4f} ms (fwd {self.forward_ms:.4f} + bwd "
                f"{self.backward_ms:.4f}), r_fwd={self.r_fwd}, r_bwd={self.r_bwd}, status={self.status})")


def rename_layer(sched: Schedule, phase_prefix: str, src: int, dst: int) -> Schedule:
    """Copy of a one-layer schedule built as layer ``src`` with ids moved to layer ``dst``."""
    if src == dst:
        return sched
    a, b = f"{phase_prefix}{src}.", f"{phase_prefix}{dst}."
    f = (lambda t: b + t[len(a):] if t.startswith(a) else t)
    return Schedule(start={f(k): v for k, v in sched.start.items()}, end={f(k): v for k, v in sched.end.items()},
                    order={r: [f(t) for t in ts] for r, ts in sched.order.items()}, makespan=sched.makespan,
                    method=sched.method, status=sched.status, solve_time_s=sched.solve_time_s, meta=dict(sched.meta))


def concat(parts: list[Schedule], method: str = "", status: str = "") -> Schedule:
    """Schedules of barrier-separated pieces placed one after another (each shifted by the ends before it)."""
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    order: dict[str, list[str]] = {}
    t = 0.0
    for p in parts:
        for k, v in p.start.items():
            start[k] = v + t
            end[k] = p.end[k] + t
        for r, ts in p.order.items():
            order.setdefault(r, []).extend(ts)
        t += p.makespan
    return Schedule(start=start, end=end, order=order, makespan=max(end.values(), default=0.0), method=method,
                    status=status or (parts[-1].status if parts else "HEURISTIC"))

"""fsmoe_compiler.scheduler: the solver core the compiler uses: task graphs, schedules, CP-SAT, heuristics, bounds.

Pure: imports the standard library, networkx, ortools and
``fsmoe_compiler.names``, never torch. It knows tasks and resources, not FX
nodes or MoE layers: the compiler's ``passes.taskgraph`` and the simulator's
layer model (``fsmoe_compiler.sim``) both build :class:`TaskGraph` s and hand
them here.

Records (:mod:`.taskgraph`, :mod:`.schedule`)
    :class:`Task` (id, kind, resource in :data:`RESOURCES` = compute / inter /
    intra, duration ms, size, layer, chunk, role, phase in :data:`PHASES`),
    :class:`TaskGraph` (``add_task``, ``add``, ``add_dep``, ``validate``;
    ``.g`` is a networkx DiGraph view), :class:`Schedule` (start/end per task,
    per-resource order, makespan, method, status, solve time, meta).
    ``validate_schedule(graph, schedule)`` raises :class:`ScheduleError` (a
    ValueError) unless the schedule can run. Malformed graphs raise ValueError
    naming the bad value.

Solvers (any TaskGraph)
    ``heuristic_schedule(g)`` (:mod:`.heuristic`): the best of several
    list-scheduling rules (critical path first; gradient syncs filling gaps
    last; with split weight gradients, rules that run them late, and the
    parallel scheme too); ``list_schedule(g, priority)`` one rule, serial
    scheme with insertion; ``fixed_order_schedule(g, order)`` runs given
    per-resource FIFO orders; ``replay(g, schedule)`` re-times a schedule's
    order; ``critical_path(g)``. ``solve_cpsat(g, time_limit_s, hint=None)``
    (:mod:`.cpsat`): CP-SAT (interval per task, no-overlap per resource,
    deterministic time limit, one worker, fixed seed), never worse than the
    heuristic or the hint. ``lower_bound(g)`` (:mod:`.bounds`): the larger of
    the critical path and the per-resource load bound.

Costs (:mod:`.costs`)
    :class:`LinearCost`: ``t(n) = alpha + beta * n`` ms, and
    ``LinearCost.fit(ns, ts)``, its least-squares fit (the profiler's link
    models and the simulator's ``local`` preset both use it).
"""

from fsmoe_compiler.scheduler.bounds import lower_bound, resource_bound, resource_loads
from fsmoe_compiler.scheduler.costs import LinearCost
from fsmoe_compiler.scheduler.cpsat import solve_cpsat
from fsmoe_compiler.scheduler.heuristic import (critical_path, fixed_order_schedule, heuristic_schedule, list_schedule,
                                                replay)
from fsmoe_compiler.scheduler.schedule import Schedule, ScheduleError, validate_schedule
from fsmoe_compiler.scheduler.taskgraph import PHASES, RESOURCES, Task, TaskGraph

__all__ = [
    "Task", "TaskGraph", "RESOURCES", "PHASES", "Schedule", "ScheduleError", "validate_schedule",
    "LinearCost",
    "list_schedule", "heuristic_schedule", "fixed_order_schedule", "replay", "critical_path", "solve_cpsat",
    "lower_bound", "resource_bound", "resource_loads",
]

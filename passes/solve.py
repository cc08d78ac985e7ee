"""``solve``: hand the graph's task graph to the scheduler the options name and keep the schedule.

``scheduler="cpsat"`` minimises the makespan with CP-SAT (warm-started from
the best of list scheduling and the two baseline orders below, deterministic
time limit, never worse than any of them); ``"heuristic"`` is that best start
alone; ``"tutel"`` replays a fixed
Tutel-style pipeline (compute in graph order, collectives issued as soon as
their inputs are ready); ``"sequential"`` replays the graph as traced. The
schedule is deterministic for given costs, so ranks that agree on costs agree
on the schedule.
"""

from __future__ import annotations

import torch.fx as fx

from fsmoe_compiler.config import SCHEDULERS
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.taskgraph import sequential_order, tutel_order
from fsmoe_compiler.scheduler import (Schedule, TaskGraph, fixed_order_schedule, heuristic_schedule, lower_bound,
                                      replay, solve_cpsat)

#: The schedulers :func:`solve_taskgraph` runs: every ``scheduler`` option but "none" (which never plans).
SOLVERS = tuple(s for s in SCHEDULERS if s != "none")


def baseline_schedules(graph: TaskGraph, taskmap: object) -> dict[str, Schedule]:
    """The ``tutel`` and ``sequential`` fixed-order schedules of ``graph`` (baselines, and starts for ours)."""
    return {"tutel": fixed_order_schedule(graph, tutel_order(graph, taskmap), method="tutel"),
            "sequential": fixed_order_schedule(graph, sequential_order(graph, taskmap), method="sequential")}


def solve_taskgraph(graph: TaskGraph, taskmap: object, scheduler: str, time_limit_s: float) -> Schedule:
    """The schedule of ``graph`` under ``scheduler`` (see the module docstring).

    Its ``meta["reference_ms"]`` prices the same graph under the ``tutel`` and
    ``sequential`` orders and gives a lower bound no order beats (for the report).
    """
    if scheduler not in SOLVERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(map(repr, SOLVERS))}")
    base = baseline_schedules(graph, taskmap)
    bound = lower_bound(graph)
    if scheduler in base:
        schedule = base[scheduler]
    else:
        heuristic = heuristic_schedule(graph)
        start = min([heuristic, *base.values()], key=lambda s: s.makespan)
        if scheduler == "heuristic":
            schedule = replay(graph, start, method="heuristic", status=start.status)
        else:
            schedule = solve_cpsat(graph, time_limit_s=time_limit_s, hint=start, heuristic=heuristic, bound=bound)
    schedule.meta["reference_ms"] = {**{k: s.makespan for k, s in base.items()}, "lower_bound": bound}
    return schedule


@graph_pass(reads=("taskgraph", "taskmap"), writes=("schedule",))
def solve(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Set ``ctx.schedule`` for ``ctx.taskgraph`` with the config's scheduler and time limit; the graph is unchanged."""
    ctx.schedule = solve_taskgraph(ctx.taskgraph, ctx.taskmap, ctx.config.scheduler, ctx.config.time_limit_s)
    return gm

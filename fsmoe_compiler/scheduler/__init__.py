"""fsmoe_compiler.scheduler: task graphs, schedules, CP-SAT and heuristics (pure: never imports torch).

Records: :class:`Task`, :class:`TaskGraph`, :class:`Schedule`; :func:`validate_schedule` checks one.
Solvers: :func:`heuristic_schedule` / :func:`list_schedule` (critical-path list scheduling),
:func:`solve_cpsat` (CP-SAT, never worse than the heuristic), :func:`fixed_order_schedule`.
Builders: :func:`build_layer_forward`, :func:`build_layer_backward`, :func:`build_stack_forward`,
:func:`build_stack_backward`, :func:`build_step`. Bounds: :func:`lower_bound`.
"""

from fsmoe_compiler.scheduler.api import DEFAULT_NUM_LAYERS, METHODS, evaluate_layer, schedule_step
from fsmoe_compiler.scheduler.baselines import (fsmoe_paper, paper_degree, paper_T, sequential, step_lower_bound, tutel,
                                                tutel_degree)
from fsmoe_compiler.scheduler.bounds import lower_bound, resource_bound, resource_loads
from fsmoe_compiler.scheduler.builders import (attention_cost, build_layer_backward, build_layer_forward, build_stack_backward,
                                               build_stack_forward, build_step, chunk_costs, equal_partitions)
from fsmoe_compiler.scheduler.costs import ClusterCosts, LayerSpec, LinearCost
from fsmoe_compiler.scheduler.cpsat import solve_cpsat
from fsmoe_compiler.scheduler.heuristic import (critical_path, fixed_order_schedule, heuristic_schedule, list_schedule,
                                                replay)
from fsmoe_compiler.scheduler.search import CACHE, SearchOptions, SolveCache, best_backward, best_forward, fsmoe_step
from fsmoe_compiler.scheduler.step import StepSchedule
from fsmoe_compiler.scheduler.schedule import Schedule, ScheduleError, validate_schedule
from fsmoe_compiler.scheduler.taskgraph import PHASES, RESOURCES, Task, TaskGraph

__all__ = [
    "Task", "TaskGraph", "RESOURCES", "PHASES", "Schedule", "ScheduleError", "validate_schedule",
    "LinearCost", "ClusterCosts", "LayerSpec",
    "list_schedule", "heuristic_schedule", "fixed_order_schedule", "replay", "critical_path", "solve_cpsat",
    "build_layer_forward", "build_layer_backward", "build_stack_forward", "build_stack_backward", "build_step",
    "chunk_costs", "attention_cost", "equal_partitions",
    "lower_bound", "resource_bound", "resource_loads",
    "StepSchedule", "schedule_step", "evaluate_layer", "METHODS", "DEFAULT_NUM_LAYERS",
    "sequential", "tutel", "fsmoe_paper", "step_lower_bound", "paper_T", "paper_degree", "tutel_degree",
    "fsmoe_step", "best_forward", "best_backward", "SearchOptions", "SolveCache", "CACHE",
]

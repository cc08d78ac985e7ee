"""fsmoe_compiler.scheduler: task graphs, schedules, CP-SAT, heuristics, baselines (pure: never imports torch).

Records
    :class:`Task` (id, kind, resource in :data:`RESOURCES` = compute / inter /
    intra, duration ms, size, layer, chunk, role, phase), :class:`TaskGraph`
    (``add_task``, ``add``, ``add_dep``, ``validate``; ``.g`` is a networkx
    DiGraph view), :class:`Schedule` (start/end per task, per-resource order,
    makespan, method, status, solve time, meta). ``validate_schedule(graph,
    schedule)`` raises :class:`ScheduleError` (a ValueError) unless the
    schedule can run. Malformed graphs raise ValueError naming the bad value.

Solvers (any TaskGraph)
    ``heuristic_schedule(g)`` critical-path list scheduling with insertion;
    ``solve_cpsat(g, time_limit_s, hint=None)`` CP-SAT (interval per task,
    no-overlap per resource, deterministic time limit, one worker, fixed
    seed), never worse than the heuristic; ``fixed_order_schedule(g, order)``
    runs given per-resource FIFO orders; ``lower_bound(g)``.

Builders (from ``LayerSpec`` + ``ClusterCosts``)
    ``build_layer_forward(spec, costs, r)``, ``build_layer_backward(spec,
    costs, r, grad_partitions)``, ``build_stack_forward(specs, costs, r_fwd)``,
    ``build_stack_backward(specs, costs, r_bwd, grad_partitions, grad_sync=)``,
    ``build_step(specs, costs, r_fwd, r_bwd, grad_partitions, comm=,
    grad_sync=)``. Chunk i of an MoE layer is ``A2A_dispatch_i -> AG_i ->
    Expert_i -> RS_i -> A2A_combine_i``; ids like ``F0.a2a_d1``, ``B1.exp0``,
    ``B1.ar2``, ``loss``, ``B.bucket``.

Whole steps (what the simulator calls)
    ``schedule_step(specs, costs, method="fsmoe", max_degree=8,
    time_limit_s=0.02, cache=None, split_weight_grads=False) -> StepSchedule``
    for one method on a layer stack, and ``evaluate_layer(spec, costs,
    methods=METHODS, num_layers=2, max_degree=8, time_limit_s=0.02,
    cache=None, split_weight_grads=False) -> dict[str, StepSchedule]`` for all
    methods on a stack of ``num_layers`` copies of one layer (baselines
    computed once and used to seed ours). Methods (:data:`METHODS`):
    ``sequential`` (DeepSpeed-MoE), ``tutel``, ``fsmoe_paper`` (FSMoE's own
    algorithm), ``fsmoe`` (ours; alias ``cpsat``) and ``lower_bound``; see
    :mod:`.baselines` and :mod:`.search` for what each models.

    A :class:`StepSchedule` has ``makespan`` (ms), ``forward_ms``,
    ``backward_ms``, ``r_fwd`` / ``r_bwd`` (degree per layer),
    ``grad_partitions`` (all-reduce slice sizes per layer, elements),
    ``status``, ``solve_time_s``, ``meta``, and lazily built ``graph`` (the
    step's TaskGraph) and ``schedule`` (valid for that graph; both None for
    ``lower_bound``). ``status`` ``OPTIMAL`` means every piece was proved
    optimal *for the chosen degrees and slices* (by CP-SAT or by meeting the
    graph's lower bound), not over all configurations.

Caching
    Identical layers are solved once: results are keyed by
    ``LayerSpec.signature()`` and the costs (:class:`SolveCache`, default
    :data:`CACHE`; per-layer graphs and bounds in :mod:`.layercache`).
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

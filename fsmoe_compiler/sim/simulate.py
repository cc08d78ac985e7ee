"""Replay the scheduler on layer stacks and grids under a cost preset.

Each grid point is a model: a stack of ``layers`` identical blocks (attention /
dense block, then an MoE FFN), one training step (forward then backward, dense
gradients produced layer by layer in the backward and all-reduced over the
inter-node link). Every method plans that step with the same task graph
builders and costs:

* ``ours`` - the scheduler's search (pipeline degrees per layer and direction,
  gradient partitions, CP-SAT over the task graph);
* ``sequential`` (DeepSpeed-MoE), ``tutel``, ``fsmoe_paper`` - the baselines;
* ``lower_bound`` - a makespan no schedule can beat.

The makespans are simulated time (ms) of the cost model, not measurements.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

from fsmoe_compiler.scheduler.schedule import validate_schedule
from fsmoe_compiler.sim.costs import ClusterCosts, LayerSpec
from fsmoe_compiler.sim.evaluate import evaluate_layer
from fsmoe_compiler.sim.methods import LOWER_BOUND, METHODS, OURS, report_name
from fsmoe_compiler.sim.presets import LocalSamples, get_preset
from fsmoe_compiler.sim.step import StepSchedule
from fsmoe_compiler.sim.summary import PointResult


#: Blocks per simulated model in grid runs. One block is not a model: the
#: dense gradients of the last block to finish its backward (layer 0) have
#: nothing left to overlap with, so a 1-block "model" mostly measures that
#: exposed all-reduce. Four blocks give every layer but the first a backward
#: below it to hide its all-reduce in, as a real (deeper) model does, at
#: a cost that still fits the grid in the time budget.
DEFAULT_GRID_LAYERS = 4


def _is_optimal(step: StepSchedule) -> bool:
    """True when CP-SAT proved every solve behind ``step`` optimal (the step's status says so)."""
    return step.status == "OPTIMAL"


def plan_step(
    spec: LayerSpec,
    costs: ClusterCosts,
    layers: int = 1,
    time_limit_s: float | None = None,
    split_weight_grads: bool = True,
) -> dict[str, StepSchedule]:
    """Every method's :class:`StepSchedule` for a stack of ``layers`` copies of ``spec``.

    Goes through ``evaluate_layer`` (baselines computed once, they also seed
    our search); keys are the reported names of :data:`~.methods.METHODS`
    (``ours`` for ``fsmoe``: :data:`~.methods.REPORTED_METHODS`). ``split_weight_grads`` lets our schedule run each
    backward's weight-gradient GEMMs apart from its input-gradient chain, as a
    compiler can reorder the separate dW / dX matmuls of the backward graph;
    the baselines keep autograd's order, as those systems run.
    """
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    kw = {} if time_limit_s is None else {"time_limit_s": time_limit_s}
    plans = evaluate_layer(spec, costs, methods=METHODS, num_layers=layers, split_weight_grads=split_weight_grads, **kw)
    return {report_name(k): v for k, v in plans.items()}


def validate_plans(plans: dict[str, StepSchedule]) -> None:
    """Check every method's schedule with the scheduler's ``validate_schedule`` (raises ScheduleError)."""
    for name, step in plans.items():
        if name == LOWER_BOUND:
            continue
        sched = step.schedule
        validate_schedule(step.graph, sched)
        if abs(sched.makespan - step.makespan) > 1e-6 * max(1.0, step.makespan):
            raise ValueError(f"{name}: reported makespan {step.makespan} != its schedule's {sched.makespan}")


def simulate_point(
    spec: LayerSpec,
    costs: ClusterCosts,
    *,
    layers: int = 1,
    time_limit_s: float | None = None,
    validate: bool = False,
    keep_schedules: bool = False,
    split_weight_grads: bool = True,
) -> Any:
    """Simulate one point: a :class:`PointResult` (and the plans, with ``keep_schedules``).

    ``validate`` checks every schedule with ``validate_schedule`` (slower: it
    builds each method's full schedule).
    """
    t0 = time.perf_counter()
    plans = plan_step(spec, costs, layers, time_limit_s, split_weight_grads)
    ours = plans[OURS]
    if validate:
        validate_plans(plans)
    res = PointResult(
        preset=costs.name,
        config=asdict(spec),
        makespan_ms={m: p.makespan for m, p in plans.items()},
        solver_s=ours.solve_time_s,
        optimal=_is_optimal(ours),
        detail={"r_fwd": list(ours.r_fwd), "r_bwd": list(ours.r_bwd), "status": ours.status,
                "point_s": round(time.perf_counter() - t0, 6)},
    )
    res.config.pop("signature_extra", None)
    if keep_schedules:
        return res, plans
    return res


# ---------------------------------------------------------------------------
# grids, optionally over worker processes
# ---------------------------------------------------------------------------

_W_COSTS: dict[int, ClusterCosts] = {}
_W_OPTS: dict[str, Any] = {}


def _init_worker(costs_by_gpus: dict[int, ClusterCosts], opts: dict[str, Any]) -> None:
    _W_COSTS.clear()
    _W_COSTS.update(costs_by_gpus)
    _W_OPTS.clear()
    _W_OPTS.update(opts)


def _run_chunk(specs: list[LayerSpec]) -> list[PointResult]:
    return [simulate_point(s, _W_COSTS[s.gpus], **_W_OPTS) for s in specs]


def _problem_key(spec: LayerSpec, costs: ClusterCosts) -> tuple:
    """What the scheduler's answer depends on: the spec and cost models, minus the GPU count labels.

    ``LayerSpec.gpus`` and ``ClusterCosts.gpus`` only label a point; the GPU
    count acts through the cost models (e.g. the A2A beta). Under a preset
    whose models do not change with it (``local``), points that differ only
    in ``gpus`` are the same scheduling problem and are solved once.
    """
    d = asdict(spec)
    d.pop("gpus")
    models = (costs.name, costs.all_to_all, costs.all_gather, costs.reduce_scatter, costs.all_reduce,
              tuple(sorted(costs.gemm.items())), costs.dense, costs.gpus_per_node)
    return tuple(sorted(d.items())), models


def simulate_grid(
    specs: Sequence[LayerSpec],
    preset: str | Callable[[int], ClusterCosts],
    *,
    layers: int = 1,
    workers: int = 1,
    time_limit_s: float | None = None,
    validate: bool = False,
    refit: bool = False,
    split_weight_grads: bool = True,
    measure: Callable[[], LocalSamples] | None = None,
) -> list[PointResult]:
    """Simulate every spec under ``preset`` (a name or ``gpus -> ClusterCosts``), in order.

    Costs are resolved once per GPU count in this process (the ``local`` preset
    reads its cache here, or measures with ``measure``: see
    :func:`~.presets.get_preset`); points that are the same scheduling
    problem (see :func:`_problem_key`) are solved once and the copy says so in
    ``detail["same_problem_as"]`` (it keeps the solver time of the solve it
    reuses); then ``workers`` processes share the unique points in contiguous
    chunks.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    make = (lambda g: get_preset(preset, g, refit=refit, measure=measure)) if isinstance(preset, str) else preset
    costs_by_gpus: dict[int, ClusterCosts] = {}
    for s in specs:
        if s.gpus not in costs_by_gpus:
            costs_by_gpus[s.gpus] = make(s.gpus)
            refit = False  # measure at most once per call
    opts = {"layers": layers, "time_limit_s": time_limit_s, "validate": validate,
            "split_weight_grads": split_weight_grads}
    specs = list(specs)
    first: dict[tuple, int] = {}  # problem key -> index into uniq
    uniq: list[LayerSpec] = []
    which: list[int] = []
    for s in specs:
        k = _problem_key(s, costs_by_gpus[s.gpus])
        if k not in first:
            first[k] = len(uniq)
            uniq.append(s)
        which.append(first[k])
    if workers == 1 or len(uniq) < 2 * workers:
        _init_worker(costs_by_gpus, opts)
        solved = _run_chunk(uniq)
    else:
        n_chunks = min(len(uniq), workers * 8)
        bounds = [len(uniq) * i // n_chunks for i in range(n_chunks + 1)]
        chunks = [uniq[a:b] for a, b in zip(bounds, bounds[1:])]
        import multiprocessing as mp

        ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(costs_by_gpus, opts)) as ex:
            solved = [r for part in ex.map(_run_chunk, chunks) for r in part]
    out: list[PointResult] = []
    for s, j in zip(specs, which):
        r = solved[j]
        if s is not uniq[j]:
            cfg = asdict(s)
            cfg.pop("signature_extra", None)
            r = replace(r, config=cfg, makespan_ms=dict(r.makespan_ms),
                        detail={**r.detail, "same_problem_as": dict(r.config)})
        out.append(r)
    return out


__all__ = ["plan_step", "simulate_grid", "simulate_point", "validate_plans"]

"""``ScheduledGraph``: what aot_autograd calls for one graph: warm up, profile, then run the planned graph.

A small state machine over the calls of one compiled graph; the planning
itself is ``fsmoe_compiler.planner``'s.

* **warm-up** (call 0): the recognised graph runs as traced.
* **profiling** (the next ``profile_steps`` calls): each call runs one chunked
  variant (degree 1, 2, 4, ... in turn) under the profiler; they compute the
  same results, so they are ordinary training steps.
* **planned** (every later call): costs are measured and agreed, a plan is
  made and its graph swapped in: no recompile of the model. A profile-cache
  hit on every rank goes straight here.

Any failure while planning falls back, on every rank together, to the graph
as traced and says why in the report (``strict=True`` raises).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch.fx as fx

from fsmoe_compiler import records
from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.gc_pause import gc_paused
from fsmoe_compiler.ops import is_collective
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.planner import (Pipelines, Plan, PlanError, Variants, cached_costs, make_plan, measure_costs,
                                    store_costs)
from fsmoe_compiler.profiler import CostModel, ProfileCache, StepProfiler
from fsmoe_compiler.runtime.executor import GraphExecutor

#: Keep at most this many wall times of scheduled calls for the report's median.
_KEEP_CALLS = 64


class ScheduledGraph:
    """A boxed callable for aot_autograd that profiles, plans, then runs the planned graph."""

    _boxed_call = True

    def __init__(self, base: fx.GraphModule, ctx: PassContext, config: FSMoEConfig, report: records.GraphReport,
                 pipelines: Pipelines, dump: Callable[[str, fx.GraphModule], None] | None = None) -> None:
        self.base, self.config, self.report, self.pipelines = base, config, report, pipelines
        self.dump = dump  # writes the scheduled graph where ``dump_dir`` asks
        self.tag = f"graph/{ctx.graph_kind}"  # names this graph's control exchanges with the other ranks
        self.variants = Variants(base, ctx, config, pipelines.chunk, self.tag, notes=report.notes)
        self.profiles: dict[int, StepProfiler] = {}
        self.calls = 0
        self.runner: GraphExecutor | None = None
        self.timed_left = config.measure_steps
        self.cache = ProfileCache(config.cache_dir) if config.cache_dir else None
        self.cache_checked = False
        reason = self._nothing_to_schedule()
        if reason is not None:
            self.report.notes.append(f"not scheduled: {reason}")
            self._run_as_traced()

    # -- the call ---------------------------------------------------------
    def __call__(self, args: list[Any]) -> Any:
        if self.runner is not None:
            return self._run_planned(args)
        if not self.cache_checked:
            self.cache_checked = True
            costs = cached_costs(self.variants, self.cache) if self.cache is not None else None
            if costs is not None:
                self._plan(costs, cache_hit=True)
                return self._run_planned(args)
        if self.calls == 0:  # warm-up: allocations, first-use costs of the collectives
            self.calls += 1
            return self.base(*args)
        if not self.variants.built:
            self.variants.build()
        step = self.calls - 1
        degree = self.variants.degrees[step % len(self.variants.degrees)]
        profile = self.profiles.setdefault(degree, StepProfiler(self.variants.get(degree)[0]))
        out = profile(list(args))
        self.calls += 1
        if step + 1 >= self.config.profile_steps:
            costs = measure_costs(self.profiles, self.variants.degrees, self.tag)
            if self.cache is not None:
                store_costs(self.variants, self.cache, costs)
            self._plan(costs, cache_hit=False)
        return out

    def _run_planned(self, args: list[Any]) -> Any:
        assert self.runner is not None
        sched = self.report.schedule
        if self.timed_left > 0 and sched is not None:
            self.timed_left -= 1
            out = self.runner.run(list(args), timed=True)
            timing = self.runner.last_timing
            for row in sched.tasks:
                if row.task in timing:
                    row.measured_start_ms, row.measured_end_ms = timing[row.task]
            return out
        t0 = time.perf_counter()
        out = self.runner(list(args))
        if sched is not None:
            sched.measured_calls_ms.append((time.perf_counter() - t0) * 1e3)
            del sched.measured_calls_ms[:-_KEEP_CALLS]
        return out

    # -- transitions ------------------------------------------------------
    def _nothing_to_schedule(self) -> str | None:
        if self.config.scheduler == "none":
            return "scheduler='none'"
        if not any(is_collective(n) for n in self.base.graph.nodes):
            return "no collective in this graph, nothing to overlap"
        return None

    def _run_as_traced(self) -> None:
        self.runner = GraphExecutor(self.base)
        self.timed_left = 0

    @gc_paused()
    def _plan(self, costs: dict[int, CostModel], cache_hit: bool) -> None:
        """Plan on ``costs`` and swap the plan's graph in, or (every rank alike) fall back to the graph as traced."""
        try:
            plan = make_plan(self.variants, costs, self.pipelines)
        except PlanError as exc:
            kind = self.variants.ctx.graph_kind
            if self.config.strict:
                raise PlanError(f"fsmoe could not schedule the {kind} graph: {exc}") from exc
            warnings.warn(f"fsmoe: {kind} graph runs as traced, scheduling failed ({exc})", stacklevel=2)
            self.report.fallback = f"scheduling failed, graph runs as traced: {exc}"
            self._run_as_traced()
        else:
            self._swap_in(plan, cache_hit)
        finally:
            self.variants.clear()  # the chosen graph lives in the runner; drop the other variants

    def _swap_in(self, plan: Plan, cache_hit: bool) -> None:
        self.runner = GraphExecutor(plan.gm, plan.ctx.taskmap.task_of)
        if self.dump is not None:
            self.dump("scheduled", plan.gm)
        report = records.schedule_report(self.config.scheduler, plan, profile_calls=self.calls, cache_hit=cache_hit)
        report.notes[:0] = [n for n in self.variants.chunk_notes if n not in report.notes]
        self.report.schedule = report
        self.report.num_nodes = len(plan.gm.graph.nodes)

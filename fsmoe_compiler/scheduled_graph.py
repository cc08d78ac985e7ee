"""``ScheduledGraph``: what aot_autograd calls for one graph: profile first, then swap in the scheduled graph.

The first call runs the recognised graph as traced (warm-up). The next
``profile_steps`` calls each run one chunked variant (degree 1, 2, 4, ... in
turn) under the profiler's timing interpreter; they compute the same results,
so they are ordinary training steps. Then the costs are agreed over ranks, each
variant is scheduled, the variant with the smallest predicted makespan is kept,
and every later call runs it: no recompile of the model. A profile cache hit
skips the profiling calls. Any failure while planning falls back to the graph
as traced and says why in the report (``strict=True`` raises).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.distributed.distributed_c10d import _resolve_process_group

from fsmoe_compiler import records
from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.gc_pause import gc_paused
from fsmoe_compiler.names import COLLECTIVE_KINDS
from fsmoe_compiler.ops import is_collective
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.verify import collective_order
from fsmoe_compiler.profiler import (CostModel, ProfileCache, agree, fit_collectives, microbenchmark_collectives,
                                     profile_call, profile_key)
from fsmoe_compiler.runtime.control import OwnClock, exchange
from fsmoe_compiler.runtime.executor import GraphExecutor

Pipeline = Callable[[fx.GraphModule, PassContext], fx.GraphModule]

#: Keep at most this many wall times of scheduled calls for the report's median.
_KEEP_CALLS = 64


class PlanError(RuntimeError):
    """Planning failed and ``strict=True`` asked for an error instead of a fallback."""


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph passes may edit while ``gm`` stays intact (node names and meta kept).

    The copy is a ``_LazyGraphModule`` (as Inductor's passes use): its Python
    code is generated when first needed, not on every copy and every pass's
    ``recompile()``; variants are profiled through an interpreter and most are
    thrown away, so for them it never is.
    """
    graph = fx.Graph()
    graph._codegen = copy.copy(gm.graph._codegen)
    out_value = graph.graph_copy(gm.graph, {})
    old_output = gm.graph.output_node()
    graph.output(out_value, type_expr=old_output.type).meta = copy.copy(old_output.meta)
    out = _LazyGraphModule(gm, graph)
    out.meta = dict(getattr(gm, "meta", {}))
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@functools.lru_cache(maxsize=1)
def _sources_digest() -> str:
    """sha256 of the passes' and the profiler's sources: a cost table is keyed by node names these produce."""
    from fsmoe_compiler import passes, profiler

    h = hashlib.sha256()
    for pkg in (passes, profiler):
        for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _gather_errors(tag: str, error: str | None) -> dict[int, str]:
    """Every rank's error (rank -> message), so all ranks see the same failures."""
    return {r: e for r, e in enumerate(exchange(tag, error)) if e is not None}


def _all_ranks_true(tag: str, flag: bool) -> bool:
    """True only if ``flag`` holds on every rank (so all ranks take the same path)."""
    return all(exchange(tag, bool(flag)))


class ScheduledGraph:
    """A boxed callable for aot_autograd that profiles, schedules, then runs the scheduled graph."""

    _boxed_call = True

    def __init__(self, base: fx.GraphModule, ctx: PassContext, config: FSMoEConfig, report: records.GraphReport,
                 chunk_passes: Pipeline, screen_passes: Pipeline, schedule_passes: Pipeline,
                 dump: Callable[[str, fx.GraphModule], None] | None = None) -> None:
        self.base = base
        self.dump = dump  # writes the scheduled graph where ``dump_dir`` asks
        self.ctx = ctx
        self.config = config
        self.report = report
        self.chunk_passes = chunk_passes
        self.screen_passes = screen_passes
        self.schedule_passes = schedule_passes
        self.calls = 0
        self.variants: dict[int, tuple[fx.GraphModule, PassContext]] = {}
        self.measured: dict[int, list[dict[str, float]]] = {}
        self.samples: list[dict] = []
        self.chunk_notes: list[str] = []  # why a layer stayed at r = 1 in some variant
        self.chunk_s = 0.0  # compile overhead of chunking the variants (part of the report's plan_s)
        self.chunk_wait_s = 0.0  # of which spent waiting for the other ranks at exchanges (taken out of chunk_s)
        self.built = False  # variants chunked (on the first profiling call, or before a cache lookup)
        self.runner: GraphExecutor | None = None
        self.timed_left = config.measure_steps
        self.degrees = config.degrees()
        reason = self._nothing_to_schedule()
        if reason is not None:
            self.report.notes.append(f"not scheduled: {reason}")
            self.runner = GraphExecutor(base)
            self.timed_left = 0
        self.tag = f"graph/{ctx.graph_kind}"  # names this graph's control exchanges with the other ranks
        self.cache = ProfileCache(config.cache_dir) if config.cache_dir else None
        self.cache_checked = False

    # -- the call ---------------------------------------------------------
    def __call__(self, args: list[Any]) -> Any:
        if self.runner is not None:
            return self._run_scheduled(args)
        if not self.cache_checked:
            self.cache_checked = True
            if self._try_cache():
                return self._run_scheduled(args)
        if self.calls == 0:  # warm-up: allocations, first-use costs of the collectives
            self.calls += 1
            return self.base(*args)
        if not self.built:
            self._build_variants()
        step = self.calls - 1
        degree = self.degrees[step % len(self.degrees)]
        gm, _ = self._variant(degree)
        out, node_ms, samples = profile_call(gm, list(args))
        self.measured.setdefault(degree, []).append(node_ms)
        self.samples.extend(samples)
        self.calls += 1
        if step + 1 >= self.config.profile_steps:
            self._finish_profiling()
        return out

    def _run_scheduled(self, args: list[Any]) -> Any:
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

    # -- planning ---------------------------------------------------------
    def _nothing_to_schedule(self) -> str | None:
        if self.config.scheduler == "none":
            return "scheduler='none'"
        if not any(is_collective(n) for n in self.base.graph.nodes):
            return "no collective in this graph, nothing to overlap"
        return None

    def _build_variants(self) -> None:
        """Chunk the graph to every candidate degree; a degree whose chunking fails is dropped with the reason.

        Ranks agree on the outcome before anyone acts on it: a degree dropped
        on one rank is dropped on all, and an error raised on one rank is
        raised on all, so no rank waits alone in a collective.
        """
        self.built = True
        clock = OwnClock()
        try:
            with gc_paused():
                self._chunk_every_degree()
        finally:
            self.chunk_wait_s += clock.waited()
            self.chunk_s += clock.own()

    def _chunk_every_degree(self) -> None:
        for degree in list(self.degrees):
            error = None
            try:
                self._variant(degree)
            except Exception as exc:  # noqa: BLE001 - reported below, on every rank alike
                error = f"{type(exc).__name__}: {exc}"
            errors = _gather_errors(f"{self.tag}/chunk{degree}", error)
            if not errors:
                if degree > 1:
                    self._keep_if_chunked(degree)
                continue
            self.variants.pop(degree, None)
            why = "; ".join(f"rank {r}: {e}" for r, e in errors.items())
            if (self.config.strict and self._explicit_degree()) or degree == 1:
                raise PlanError(f"fsmoe could not chunk the {self.ctx.graph_kind} graph to degree {degree}: {why}")
            self.degrees.remove(degree)
            self.report.notes.append(f"degree {degree} dropped, chunking failed: {why}")

    def _keep_if_chunked(self, degree: int) -> None:
        """Keep the refusal notes of a degree; drop the degree if no layer took it (it would equal degree 1)."""
        _, ctx = self.variants[degree]
        self.chunk_notes.extend(n for n in ctx.notes if "not applied" in n and n not in self.chunk_notes)
        applied = any(getattr(info, "degree", 1) > 1 for info in ctx.chunking.values())
        if not _all_ranks_true(f"{self.tag}/unchunked{degree}", not applied) or 1 not in self.degrees:
            return
        self.variants.pop(degree)
        self.degrees.remove(degree)
        self.report.notes.append(f"degree {degree} not profiled: no MoE layer of the {self.ctx.graph_kind} graph "
                                 f"can be split into {degree} chunks")

    def _explicit_degree(self) -> bool:
        return self.config.pipeline_degree != "auto"

    def _variant(self, degree: int) -> tuple[fx.GraphModule, PassContext]:
        """The graph chunked to ``degree`` per MoE region (memoised; degree 1 is the graph as recognised)."""
        if degree not in self.variants:
            regions = copy.deepcopy(self.ctx.regions)  # the chunk pass renames a region's nodes in its variant
            # "auto" tries what fits: a layer a degree does not fit stays at r = 1 with a note, never an error
            ctx = replace(self.ctx, notes=[], regions=regions, degrees={r.layer: degree for r in self._regions()},
                          chunking={}, strict=self.ctx.strict and self._explicit_degree())
            # degree 1 changes only node meta: the recognised graph itself, no copy (copies cost a recompile)
            gm = self.base if degree == 1 else copy_graph_module(self.base)
            self.variants[degree] = (self.chunk_passes(gm, ctx), ctx)
        return self.variants[degree]

    def _regions(self) -> list:
        return list(self.ctx.regions.get(self.ctx.graph_kind, []))

    def _link_samples(self) -> list[dict]:
        """Microbenchmarks of each collective kind and process group the graph uses, at its message sizes.

        Timed after a barrier, so a rank that arrives late does not bill its
        lateness to the link (the in-graph samples include that skew). The
        sizes are merged over ranks first (a dropless layer sends different
        sizes on each rank), so every rank runs the same list in the same
        order. Kinds the microbenchmark does not know keep their in-graph samples.
        """
        if not _distributed():
            return list(self.samples)
        sizes: dict[tuple[str, str], set[int]] = {}
        for s in self.samples:
            if s.get("kind") in COLLECTIVE_KINDS and s.get("group") is not None and s.get("bytes"):
                sizes.setdefault((s["kind"], s["group"]), set()).add(int(s["bytes"]))
        everyone = exchange(f"{self.tag}/sizes", sizes)
        merged: dict[tuple[str, str], set[int]] = {}
        for theirs in everyone:
            for key, nbytes in theirs.items():
                merged.setdefault(key, set()).update(nbytes)
        out = [s for s in self.samples if s.get("kind") not in COLLECTIVE_KINDS]
        for (kind, group_name), nbytes in sorted(merged.items()):
            group = _resolve_process_group(group_name)
            picked = sorted(nbytes)
            picked = sorted({picked[0], picked[len(picked) // 2], picked[-1]})
            out.extend(microbenchmark_collectives(group, (kind,), picked, repeats=3))
        return out

    def _costs(self) -> dict[int, CostModel]:
        comm = fit_collectives(self._link_samples())
        out = {}
        for degree in self.degrees:
            runs = self.measured.get(degree)
            if runs:  # per node, the fastest of this degree's calls: a first call's new shapes (allocator,
                # GEMM set-up) and a call another process interrupted only ever add time
                node_ms = {n: min(r[n] for r in runs if n in r) for n in set().union(*runs)}
            else:  # not profiled: the unchunked graph's times (node_cost divides a copy's origin by the degree)
                node_ms = dict(out.get(1, CostModel(node_ms={}, comm=comm, samples=[])).node_ms)
            out[degree] = agree(CostModel(node_ms=node_ms, comm=comm, samples=list(self.samples)))
        return out

    def _cache_key(self, degree: int) -> str:
        """The key of this graph chunked to ``degree``: hardware, world layout, shapes, pass sources, solver settings.

        Never process-group names or ranks, so every rank and every run of the
        same job on the same machines finds the same file.
        """
        base = profile_key(self.base, _world_size())
        c = self.config
        solver = f"{c.scheduler}/{c.pipeline_degree}/{c.max_degree}/{c.time_limit_s}"
        return hashlib.sha256(f"{base}/{_sources_digest()}/{solver}/{self.ctx.graph_kind}/degree{degree}"
                              .encode()).hexdigest()

    def _try_cache(self) -> bool:
        if self.cache is None:
            return False
        self._build_variants()  # the degrees worth looking up: those some layer takes
        stored = {d: self.cache.load(self._cache_key(d)) for d in self.degrees}
        hit = all(c is not None for c in stored.values())
        if not _all_ranks_true(f"{self.tag}/cache", hit):
            return False
        self._plan(stored, cache_hit=True)  # type: ignore[arg-type]
        return True

    def _finish_profiling(self) -> None:
        costs = self._costs()
        if self.cache is not None:  # every rank: a node-local cache directory must hit on every node
            for degree, c in costs.items():
                self.cache.store(self._cache_key(degree), c)
        self._plan(costs, cache_hit=False)

    @gc_paused()
    def _plan(self, costs: dict[int, CostModel], cache_hit: bool) -> None:
        """Schedule every variant, keep the one with the smallest predicted makespan; all ranks agree or fall back."""
        clock = OwnClock()
        error, best, predicted = None, None, {}
        try:
            if len(self.degrees) > 1:  # rank the degrees cheaply: task graph + a list schedule, no graph copy
                quick = replace(self.config, scheduler="heuristic") if self.config.scheduler == "cpsat" else self.config
                for degree in self.degrees:
                    gm, ctx = self._variant(degree)
                    ctx = replace(ctx, costs=costs[degree], notes=[], config=quick)
                    self.screen_passes(gm, ctx)
                    predicted[degree] = ctx.schedule.makespan
            t_screen = clock.own()
            degree = min(self.degrees, key=lambda d: (predicted.get(d, 0.0), d))
            gm, ctx = self._variant(degree)
            ctx = replace(ctx, costs=costs[degree], notes=list(ctx.notes))
            # the scheduling passes reorder the graph in place: a copy only where the variant is the traced graph
            # itself (degree 1), which stays the fallback; a chunked variant is dropped right after
            best = (degree, self.schedule_passes(copy_graph_module(gm) if gm is self.base else gm, ctx), ctx)
            predicted[degree] = ctx.schedule.makespan
        except Exception as exc:  # noqa: BLE001 - agreed over ranks below
            error = f"{type(exc).__name__}: {exc}"
        # one gather, reached by every rank: failures anywhere and the collective issue order of each plan
        order = collective_order(best[1]) if error is None and best is not None else None
        errors, orders = _gather_plans(f"{self.tag}/plan", error, order)
        if not errors and any(o != order for o in orders.values()):
            errors = {r: f"would issue collectives in the order {o}, rank {_rank()} in {order}"
                      for r, o in orders.items() if o != order}
        if errors:
            reason = "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
            if self.config.strict:
                raise PlanError(f"fsmoe could not schedule the {self.ctx.graph_kind} graph: {reason}")
            warnings.warn(f"fsmoe: {self.ctx.graph_kind} graph runs as traced, scheduling failed ({reason})",
                          stacklevel=2)
            self.report.fallback = f"scheduling failed, graph runs as traced: {reason}"
            self.runner = GraphExecutor(self.base)
            self.timed_left = 0
        else:
            degree, gm, ctx = best
            self.runner = GraphExecutor(gm, ctx.taskmap.task_of)
            if self.dump is not None:
                self.dump("scheduled", gm)
            self.report.schedule = _schedule_report(self.config.scheduler, ctx, predicted, len(self.measured),
                                                    cache_hit, self.calls)
            self.report.schedule.notes[:0] = [n for n in self.chunk_notes if n not in self.report.schedule.notes]
            t_end = clock.own()
            self.report.schedule.plan_s = t_end + self.chunk_s
            self.report.schedule.plan_split_s = {"chunk": self.chunk_s, "rank degrees": t_screen,
                                                 "schedule": t_end - t_screen}
            self.report.schedule.wait_s = clock.waited() + self.chunk_wait_s
            self.report.num_nodes = len(gm.graph.nodes)
        self.variants.clear()  # the chosen graph lives in the runner; drop the other variants


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _gather_plans(tag: str, error: str | None, order: Any) -> tuple[dict[int, str], dict[int, Any]]:
    """Every rank's planning error and collective issue order (a plan must issue them alike on every rank)."""
    everyone = exchange(tag, (error, order))
    errors = {r: e for r, (e, _) in enumerate(everyone) if e is not None}
    return errors, {r: o for r, (_, o) in enumerate(everyone)}


def _schedule_report(scheduler: str, ctx: PassContext, predicted: dict[int, float], profiled: int,
                     cache_hit: bool, calls: int) -> records.ScheduleReport:
    sched, graph = ctx.schedule, ctx.taskgraph
    rows = []
    for resource, ids in sched.order.items():
        for tid in ids:
            t = graph.tasks[tid]
            rows.append(records.TaskRow(task=tid, resource=resource, layer=t.layer, chunk=t.chunk, role=t.role,
                                        start_ms=sched.start[tid], end_ms=sched.end[tid]))
    rows.sort(key=lambda r: (r.start_ms, r.resource, r.task))
    degrees = {layer: getattr(info, "degree", 1) for layer, info in ctx.chunking.items()}
    notes = [n for n in ctx.notes]
    return records.ScheduleReport(scheduler=scheduler, degrees=degrees, candidates=predicted,
                                  predicted_ms=sched.makespan, tasks=rows, notes=notes, profile_calls=calls,
                                  cache_hit=cache_hit, status=sched.status,
                                  reference_ms=dict(sched.meta.get("reference_ms", {})),
                                  schedule=sched, taskgraph=graph)

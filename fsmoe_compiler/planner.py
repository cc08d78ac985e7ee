"""The planner: from a recognised graph and its profiling calls to a ``Plan`` (variants → costs → screening → choice).

1. **Variants** (:class:`Variants`): the graph chunked to every candidate
   pipeline degree by the chunk pipeline. A degree whose chunking fails on
   any rank is dropped on every rank (an explicit degree under ``strict``
   raises); a degree no layer takes is dropped (it would equal degree 1).
2. **Costs** (:func:`measure_costs`): per degree, each node's fastest
   profiled call; link models fitted from microbenchmarks at the graph's own
   message sizes (merged over ranks); then agreed over ranks (maximum per
   node). Or the profile cache (:func:`cached_costs`), when every rank has
   every degree.
3. **Screening and choice** (:func:`make_plan`): each degree's task graph
   priced by a quick schedule (the list scheduler where the options say
   cpsat), the best degree scheduled by the scheduler the options name, its
   collective issue order compared across ranks.

Every step that decides which collectives run is agreed over ranks through
``runtime.control.meet`` before any rank acts on it, so all ranks take the
same path or fail together; a failure is a :class:`PlanError` naming every
rank's reason. Each agreement is keyed by what it is about: ``tag`` (the
graph's agreement key and planning epoch, from ``ScheduledGraph``) and the
phase, never by how many agreements came before; the planner runs only
inside calls every rank agreed to run (``scheduled_graph``), so every rank
that takes part reaches the same agreements.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch.distributed as dist
import torch.fx as fx
from torch.distributed.distributed_c10d import _resolve_process_group

from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.gc_pause import gc_paused
from fsmoe_compiler.memory import peak_bytes
from fsmoe_compiler.reporting.tables import fmt_bytes
from fsmoe_compiler.names import COLLECTIVE_KINDS
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.graph_utils import copy_graph_module
from fsmoe_compiler.passes.verify import collective_order
from fsmoe_compiler.passes.whole import unchunkable_layers
from fsmoe_compiler.profiler import (CostModel, ProfileCache, StepProfiler, agree, cpu_shares, fit_collectives,
                                     last_arrivals, microbenchmark_collectives, microbenchmark_contention, plan_key)
from fsmoe_compiler.runtime.control import OwnClock, meet

Pipeline = Callable[[fx.GraphModule, PassContext], fx.GraphModule]

#: Repetitions of each link microbenchmark (after a barrier each; the ``typical_ms`` of their last-arrival times is
#: fitted): messages under ``SMALL_MESSAGE_BYTES`` take well under a millisecond where a shared host adds
#: millisecond stalls to some of them, so they get more (5 repetitions of a 5 KiB loopback all-to-all once read
#: 2.6 ms for 0.4 ms), enough for a mean without the slowest to settle.
LINK_REPEATS = 5
SMALL_LINK_REPEATS = 30
SMALL_MESSAGE_BYTES = 1 << 20
#: The link model's slope needs a message whose transfer stands clear of the per-message latency's noise: a graph
#: that sends only smaller ones (a tiny layer's all-to-alls of a few KiB) has one of this size timed as well (fitted
#: on loopback from 4-16 KiB messages alone, the slope came out anywhere from 0 to 6 ms/MiB over six runs).
SLOPE_ANCHOR_BYTES = 1 << 20
#: Collectives each link repetition issues back to back (``microbenchmark_collectives``' ``stream``): a scheduled
#: graph queues its all-to-alls and all-reduces on the link, and what bounds it is what a message costs there
#: (on the emulated link, where an idle spell lets the next message through faster, pricing messages timed alone
#: after a barrier put the forward of a link-bound graph 17 % under its measured time).
LINK_STREAM = 4


def link_repeats(nbytes: int) -> int:
    """How many times the link microbenchmarks repeat a message of ``nbytes`` (the same on every rank)."""
    return SMALL_LINK_REPEATS if nbytes < SMALL_MESSAGE_BYTES else LINK_REPEATS


class PlanError(RuntimeError):
    """Planning failed and ``strict=True`` asked for an error instead of a fallback."""


@dataclass(frozen=True)
class Pipelines:
    """The backend's pass pipelines the planner runs: chunk a variant, screen a degree, schedule the choice."""

    chunk: Pipeline
    screen: Pipeline
    schedule: Pipeline


@dataclass
class Plan:
    """What planning chose for one graph.

    ``gm`` is the scheduled graph and ``ctx`` its pass context (task graph,
    task map, schedule, chunking); ``predicted`` maps each degree screened to
    its predicted makespan (ms); ``split_s`` the planning time by phase and
    ``wait_s`` the time spent waiting for the other ranks (not in ``split_s``);
    ``peak_bytes`` and ``traced_peak_bytes`` the most tensor bytes alive at once in ``gm``'s order and in the
    graph as traced (``memory.peak_bytes``).
    """

    degree: int
    gm: fx.GraphModule
    ctx: PassContext
    predicted: dict[int, float]
    split_s: dict[str, float] = field(default_factory=dict)
    wait_s: float = 0.0
    peak_bytes: int | None = None
    traced_peak_bytes: int | None = None

    @property
    def plan_s(self) -> float:
        """The planner's own time (chunking, ranking degrees, scheduling)."""
        return sum(self.split_s.values())


def distributed() -> bool:
    """torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if distributed() else 0


def _gather_errors(tag: str, error: str | None) -> dict[int, str]:
    """Every rank's error (rank -> message), so all ranks see the same failures."""
    return {r: e for r, e in enumerate(meet(tag, error, what="chunking")) if e is not None}


def _all_ranks_true(tag: str, flag: bool) -> bool:
    """True only if ``flag`` holds on every rank (so all ranks take the same path)."""
    return all(meet(tag, bool(flag)))


class Variants:
    """The recognised graph chunked to each candidate degree (degree 1 is the recognised graph itself).

    ``degrees`` shrinks as degrees are dropped; ``notes`` (the report's, when
    given) says why, and ``chunk_notes`` why some layer stayed at r = 1 in a
    degree that was kept. ``tag`` names this graph's exchanges with the other ranks.
    """

    def __init__(self, base: fx.GraphModule, ctx: PassContext, config: FSMoEConfig, chunk: Pipeline,
                 tag: str, notes: list[str] | None = None) -> None:
        self.base, self.ctx, self.config, self.chunk, self.tag = base, ctx, config, chunk, tag
        self.degrees = config.degrees()
        self.notes: list[str] = notes if notes is not None else []
        self.chunk_notes: list[str] = []
        self.built = False
        self.chunk_s = 0.0  # own time spent chunking (a part of the plan's time)
        self.wait_s = 0.0  # time spent waiting for the other ranks while chunking
        self._graphs: dict[int, tuple[fx.GraphModule, PassContext]] = {}
        self.chunked: dict[int, dict] = {}  # degree -> layer -> ChunkInfo, for the strict check under "auto"

    def build(self) -> None:
        """Chunk the graph to every candidate degree; every rank keeps and drops the same degrees."""
        self.built = True
        clock = OwnClock()
        try:
            with gc_paused():
                for degree in list(self.degrees):
                    self._build_one(degree)
                if self.config.strict and not self.explicit:
                    self._check_whole()
        finally:
            self.wait_s += clock.waited()
            self.chunk_s += clock.own()

    def get(self, degree: int) -> tuple[fx.GraphModule, PassContext]:
        """The graph chunked to ``degree`` and its pass context (memoised)."""
        if degree not in self._graphs:
            regions = copy.deepcopy(self.ctx.regions)  # the chunk pass renames a region's nodes in its variant
            # "auto" tries what fits: a layer a degree does not fit stays at r = 1 with a note, never an error
            ctx = replace(self.ctx, notes=[], regions=regions, degrees={r.layer: degree for r in self.ctx.regions_here},
                          chunking={}, strict=self.ctx.strict and self.explicit)
            # degree 1 changes only node meta: the recognised graph itself, no copy (copies cost a recompile)
            gm = self.base if degree == 1 else copy_graph_module(self.base)
            self._graphs[degree] = (self.chunk(gm, ctx), ctx)
        return self._graphs[degree]

    def clear(self) -> None:
        """Drop the variants (the chosen graph lives on in the plan)."""
        self._graphs.clear()

    @property
    def explicit(self) -> bool:
        """The options name one degree (not "auto")."""
        return self.config.pipeline_degree != "auto"

    def _build_one(self, degree: int) -> None:
        error = None
        try:
            self.get(degree)
        except Exception as exc:  # noqa: BLE001 - reported below, on every rank alike
            error = f"{type(exc).__name__}: {exc}"
        errors = _gather_errors(f"{self.tag}/chunk{degree}", error)
        if not errors:
            if degree > 1:
                self._keep_if_chunked(degree)
            return
        self._graphs.pop(degree, None)
        why = "; ".join(f"rank {r}: {e}" for r, e in errors.items())
        if (self.config.strict and self.explicit) or degree == 1:
            raise PlanError(f"fsmoe could not chunk the {self.ctx.graph_kind} graph to degree {degree}: {why}")
        self.degrees.remove(degree)
        self.notes.append(f"degree {degree} dropped, chunking failed: {why}")

    def _check_whole(self) -> None:
        """strict under "auto": every rank raises when some expert-parallel layer has no chunking rule at all."""
        problems = unchunkable_layers(self.chunked, self.ctx.regions_here)
        errors = _gather_errors(f"{self.tag}/whole", "; ".join(problems) or None)
        if errors:
            raise PlanError(f"fsmoe could not handle every MoE layer of the {self.ctx.graph_kind} graph whole: "
                            + "; ".join(f"rank {r}: {e}" for r, e in errors.items()))

    def _keep_if_chunked(self, degree: int) -> None:
        """Keep the refusal notes of a degree; drop the degree if no layer took it (it would equal degree 1)."""
        _, ctx = self._graphs[degree]
        self.chunked[degree] = dict(ctx.chunking)
        self.chunk_notes.extend(n for n in ctx.notes if "not applied" in n and n not in self.chunk_notes)
        applied = any(info.degree > 1 for info in ctx.chunking.values())
        if not _all_ranks_true(f"{self.tag}/unchunked{degree}", not applied) or 1 not in self.degrees:
            return
        self._graphs.pop(degree)
        self.degrees.remove(degree)
        self.notes.append(f"degree {degree} not profiled: no MoE layer of the {self.ctx.graph_kind} graph "
                          f"can be split into {degree} chunks")


# ---------------------------------------------------------------------------------------------------
# costs


def link_sizes(sent: set[int] | list[int]) -> list[int]:
    """The message sizes the link microbenchmarks time for one kind and group: the least, the median and the
    largest the graph sent, and ``SLOPE_ANCHOR_BYTES`` where all of them are smaller."""
    if not sent:
        raise ValueError("link_sizes needs at least one message size")
    ordered = sorted(sent)
    picked = {ordered[0], ordered[len(ordered) // 2], ordered[-1]}
    if ordered[-1] < SLOPE_ANCHOR_BYTES:
        picked.add(SLOPE_ANCHOR_BYTES)
    return sorted(picked)


def link_samples(samples: list[dict], tag: str) -> list[dict]:
    """Microbenchmarks of each collective kind and process group the graph uses, at its message sizes.

    Each repetition is ``LINK_STREAM`` collectives back to back after a barrier
    (what a message costs on a busy link), read on the rank that came out
    of it last (``last_arrivals``: the others' times include their wait for
    it, as the in-graph samples include the skew between ranks); every rank
    then fits the same samples. The sizes
    are merged over ranks first (a dropless layer sends different sizes on
    each rank), so every rank runs the same list in the same order. Kinds the
    microbenchmark does not know keep their in-graph samples. Where every
    message is under ``SLOPE_ANCHOR_BYTES``, one of that size is timed too, so
    the fitted slope is the link's bandwidth and not the latency's noise.
    """
    if not distributed():
        return list(samples)
    sizes: dict[tuple[str, str], set[int]] = {}
    for s in samples:
        if s.get("kind") in COLLECTIVE_KINDS and s.get("group") is not None and s.get("bytes"):
            sizes.setdefault((s["kind"], s["group"]), set()).add(int(s["bytes"]))
    merged: dict[tuple[str, str], set[int]] = {}
    for theirs in meet(f"{tag}/sizes", sizes, what="message sizes"):
        for key, nbytes in theirs.items():
            merged.setdefault(key, set()).update(nbytes)
    out = [s for s in samples if s.get("kind") not in COLLECTIVE_KINDS]
    timed: list[dict] = []
    for (kind, group_name), sent in sorted(merged.items()):
        group = _resolve_process_group(group_name)
        for nbytes in link_sizes(sent):
            reps = link_repeats(nbytes)
            timed.extend(microbenchmark_collectives(group, (kind,), (nbytes,), repeats=reps, stream=LINK_STREAM))
            if _host_side(group) and nbytes in sent:  # the shares are of the graph's own sizes, not the anchor
                timed.extend(microbenchmark_contention(group, kind, (nbytes,), repeats=reps))
    return out + last_arrivals(meet(f"{tag}/links", timed, what="the link microbenchmarks"))


def _host_side(group: Any) -> bool:
    """Whether ``group``'s collectives run on the host's cores beside the compute (gloo; not NCCL's kernels)."""
    return "nccl" not in str(dist.get_backend(group))


def measure_costs(profiles: dict[int, StepProfiler], degrees: list[int], tag: str) -> dict[int, CostModel]:
    """One agreed cost model per degree from its profiling calls; a degree never profiled costs degree 1's times.

    Link models are shared by every degree: fitted from microbenchmarks at the
    sizes every degree sent (``link_samples``). Where the ranks profiled graphs
    that differ in a few nodes (one rank recompiled the graph with dynamic
    shapes: size asserts, other names), the nodes every rank has are agreed and
    the others keep this rank's own times; the plans' collective orders are
    compared before any rank runs one (:func:`make_plan`).
    """
    samples = [s for d in degrees if d in profiles for s in profiles[d].samples]
    links = link_samples(samples, tag)
    comm, shares = fit_collectives(links), cpu_shares(links)
    out: dict[int, CostModel] = {}
    for degree in degrees:
        profile = profiles.get(degree)
        if profile is not None and profile.calls:
            node_ms = profile.node_ms()
        else:  # node_cost divides a chunk copy's origin by the degree
            node_ms = dict(out[1].node_ms) if 1 in out else {}
        everyone = meet(f"{tag}/nodes{degree}", sorted(node_ms), what="the profiled nodes")
        common = set(everyone[0]).intersection(*everyone[1:])
        own = {k: v for k, v in node_ms.items() if k not in common}
        agreed = agree(CostModel(node_ms={k: v for k, v in node_ms.items() if k in common}, comm=comm,
                                 samples=list(samples), cpu_share=dict(shares)), f"{tag}/costs{degree}")
        agreed.node_ms.update(own)
        out[degree] = agreed
    return out


def _settings(config: FSMoEConfig) -> str:
    return f"{config.scheduler}/{config.pipeline_degree}/{config.max_degree}/{config.time_limit_s}"


def cache_keys(variants: Variants) -> dict[int, str]:
    """The profile-cache key of each candidate degree of ``variants``."""
    return {d: plan_key(variants.base, world_size(), variants.ctx.graph_kind, d, _settings(variants.config))
            for d in variants.degrees}


def calibration_key(variants: Variants, codegen: str) -> str:
    """The cache key of the calibration factor of ``variants``' graph under ``codegen`` (one per graph)."""
    return plan_key(variants.base, world_size(), variants.ctx.graph_kind, 0, f"{_settings(variants.config)}/{codegen}")


def cached_costs(variants: Variants, cache: ProfileCache) -> dict[int, CostModel] | None:
    """Every degree's cost model from the cache, if every rank has a usable one for every degree (one that prices
    every node of that degree's graph); else None on every rank, which then profiles."""
    if not variants.built:
        variants.build()  # the degrees worth looking up: those some layer takes
    stored = {d: cache.load(key, variants.get(d)[0].graph) for d, key in cache_keys(variants).items()}
    hit = all(c is not None for c in stored.values())
    if not _all_ranks_true(f"{variants.tag}/cache", hit):
        return None
    return stored  # type: ignore[return-value]


def store_costs(variants: Variants, cache: ProfileCache, costs: dict[int, CostModel]) -> None:
    """Write every degree's cost model to the cache (every rank: a node-local directory must hit on every node)."""
    keys = cache_keys(variants)
    for degree, c in costs.items():
        cache.store(keys[degree], c)


# ---------------------------------------------------------------------------------------------------
# screening and choice


def _screen(variants: Variants, costs: dict[int, CostModel], screen: Pipeline) -> dict[int, float]:
    """Each degree's predicted makespan under a quick schedule (no graph copy)."""
    config = variants.config
    quick = replace(config, scheduler="heuristic") if config.scheduler == "cpsat" else config
    predicted: dict[int, float] = {}
    for degree in variants.degrees:
        gm, ctx = variants.get(degree)
        ctx = replace(ctx, costs=costs[degree], notes=[], config=quick)
        screen(gm, ctx)
        predicted[degree] = ctx.schedule.makespan
    return predicted


def _choose(variants: Variants, costs: dict[int, CostModel], pipelines: Pipelines
            ) -> tuple[int, fx.GraphModule, PassContext, dict[int, float], float, tuple[int | None, int | None]]:
    clock = OwnClock()
    predicted = _screen(variants, costs, pipelines.screen) if len(variants.degrees) > 1 else {}
    t_screen = clock.own()
    degree = min(variants.degrees, key=lambda d: (predicted.get(d, 0.0), d))
    gm, ctx = variants.get(degree)
    ctx = replace(ctx, costs=costs[degree], notes=list(ctx.notes))
    # the scheduling passes reorder the graph in place: a copy only where the variant is the traced graph
    # itself (degree 1), which stays the fallback; a chunked variant is dropped right after
    bound = variants.config.max_peak_growth
    traced = peak_bytes(variants.base.graph)
    if bound is None:
        gm = pipelines.schedule(copy_graph_module(gm) if gm is variants.base else gm, ctx)
        peak = peak_bytes(gm.graph)
    else:  # keep the chunks in traced order too, in case the schedule keeps too much alive
        unordered = copy_graph_module(gm) if gm is variants.base else gm
        gm = pipelines.schedule(copy_graph_module(unordered), ctx)
        gm, ctx, peak = _within_memory(gm, ctx, unordered, traced, bound, pipelines)
    predicted[degree] = ctx.schedule.makespan
    return degree, gm, ctx, predicted, t_screen, (peak, traced)


def _within_memory(gm: fx.GraphModule, ctx: PassContext, unordered: fx.GraphModule, traced: int | None,
                   bound: float, pipelines: Pipelines) -> tuple[fx.GraphModule, PassContext, int | None]:
    """``gm`` and its peak of live tensor bytes if that is at most ``1 + bound`` times ``traced`` (the graph as
    traced); else ``unordered`` (the same chunks) scheduled in traced order and its peak, with a note
    (``strict``: ``PlanError``). Collectives keep their issue order either way, so ranks that decide
    differently still pair up."""
    peak = peak_bytes(gm.graph)
    if not peak or not traced or peak <= traced * (1 + bound):
        return gm, ctx, peak
    why = (f"the {ctx.config.scheduler} schedule keeps {fmt_bytes(peak)} of tensors alive at once against "
           f"{fmt_bytes(traced)} as traced ({100.0 * (peak - traced) / traced:+.0f} %, over "
           f"max_peak_growth={bound})")
    if ctx.strict:
        raise PlanError(f"{why}; raise max_peak_growth (or None) to allow it")
    sequential = replace(ctx, config=replace(ctx.config, scheduler="sequential"), notes=list(ctx.notes))
    gm = pipelines.schedule(unordered, sequential)
    sequential.notes.append(f"memory: {why}: the chunks run in traced order instead")
    return gm, sequential, peak_bytes(gm.graph)


def same_order(a: dict[str, list[str]] | None, b: dict[str, list[str]] | None) -> bool:
    """Two ranks' collective issue orders (``verify.collective_order``) match: per group the same ops in the
    same order. Input sizes are compared only for collectives whose sizes must be equal on every rank (not
    all-to-alls: with dropless dispatch each rank sends what its tokens need) and only where both ranks
    know them (a graph recompiled with dynamic shapes on one rank has ``?`` where the other has a number)."""
    if a is None or b is None or a.keys() != b.keys():
        return a == b
    for group in a:
        if len(a[group]) != len(b[group]):
            return False
        for x, y in zip(a[group], b[group]):
            op_x, _, dims_x = x.partition("[")
            op_y, _, dims_y = y.partition("[")
            if op_x != op_y:
                return False
            if op_x.startswith("all_to_all"):
                continue
            dx, dy = dims_x.rstrip("]").split(", "), dims_y.rstrip("]").split(", ")
            if "?" in (dims_x.rstrip("]"), dims_y.rstrip("]")):
                continue
            if len(dx) != len(dy) or any(p != q and "?" not in (p, q) for p, q in zip(dx, dy)):
                return False
    return True


def make_plan(variants: Variants, costs: dict[int, CostModel], pipelines: Pipelines) -> Plan:
    """Screen the degrees, schedule the best; every rank gets the same plan, or a ``PlanError`` with every reason."""
    clock = OwnClock()
    error, chosen = None, None
    try:
        chosen = _choose(variants, costs, pipelines)
    except Exception as exc:  # noqa: BLE001 - agreed over ranks below
        error = f"{type(exc).__name__}: {exc}"
    # one exchange, reached by every rank: failures anywhere and the collective issue order of each plan
    order = collective_order(chosen[1]) if chosen is not None else None
    everyone = meet(f"{variants.tag}/plan", (error, order), what="the plan")
    errors = {r: e for r, (e, _) in enumerate(everyone) if e is not None}
    if not errors:
        errors = {r: f"would issue collectives in the order {o}, rank {_rank()} in {order}"
                  for r, (_, o) in enumerate(everyone) if not same_order(o, order)}
    if errors:
        raise PlanError("; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items())))
    degree, gm, ctx, predicted, t_screen, (peak, traced) = chosen
    total = clock.own()
    return Plan(degree, gm, ctx, predicted,
                split_s={"chunk": variants.chunk_s, "rank degrees": t_screen, "schedule": total - t_screen},
                wait_s=clock.waited() + variants.wait_s, peak_bytes=peak, traced_peak_bytes=traced)

"""Our method: search pipeline degrees and gradient slices, solve the step with CP-SAT.

The step of a layer stack is forward, loss, backward. The loss is a barrier
and so is every forward layer boundary (layer l+1's attention needs all of
layer l), so minimising the step's makespan splits *exactly* into one problem
per forward layer plus one problem for the whole backward stack, where the
gradient all-reduce slices of layer l may run anywhere during the backward of
the layers below. We therefore:

1. forward, per layer (cached by ``LayerSpec.signature()``): try every
   r in 1..max_degree with the heuristic (``heuristic_starts``, the best of
   its list-scheduling rules), then CP-SAT (free order, hinted) on the most
   promising degrees whose lower bound still leaves room;
2. backward, jointly over the stack: candidate degree vectors (the best
   and second-best isolated backward degree of each layer, chosen apart from
   the forward degree, plus every baseline's vector) times candidate
   gradient slicings (one slice per layer, slices cut to the idle inter-link
   windows of the layers below, equal slices up to ``max_parts``, or one
   bucket after the backward), each scored by the heuristic on the whole
   backward stack; CP-SAT then refines the best (``cpsat_top``), placing the
   slices in idle link windows and ordering everything freely.

Every baseline's configuration and schedule (FSMoE's, Tutel's, sequential)
is also a candidate (their schedules are replayed on our graph), so with
``max_degree >= 8`` the result is never worse than any baseline on the same
cost model. ``SearchOptions.split_weight_grads`` additionally lets weight
gradients leave the backward's critical chain (see :func:`_split_backward`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from fsmoe_compiler.scheduler.bounds import lower_bound
from fsmoe_compiler.scheduler.cpsat import solve_cpsat
from fsmoe_compiler.scheduler.heuristic import (fixed_order_schedule, heuristic_starts, justify, replay,
                                                schedule_from_starts)
from fsmoe_compiler.scheduler.schedule import Schedule
from fsmoe_compiler.scheduler.taskgraph import TaskGraph
from fsmoe_compiler.sim.baselines import fsmoe_paper, paper_degree, sequential, tutel, tutel_degree
from fsmoe_compiler.sim.builders import build_layer_forward, build_stack_backward, build_step
from fsmoe_compiler.sim.costs import ClusterCosts, LayerSpec
from fsmoe_compiler.sim.layercache import costs_key, layer_eval
from fsmoe_compiler.sim.methods import FSMOE
from fsmoe_compiler.sim.step import StepSchedule, concat, rename_layer

EPS = 1e-9


@dataclass
class SearchOptions:
    """Knobs of the search; the defaults fit a 1458-layer sweep in seconds per preset.

    ``time_limit_s`` is CP-SAT's deterministic time per solve; ``cpsat_top``
    how many of the heuristic's best candidates CP-SAT refines;
    ``degree_top`` how many degrees per layer (by isolated backward time)
    enter the joint backward search; ``max_parts`` the largest equal slicing
    tried for gradients. ``split_weight_grads`` (off by default: it changes
    the layer model's task graph, FSMoE's) lets the backward run weight
    gradients apart from input gradients, as a compiler can reorder them: the
    weight-gradient halves of the expert and attention backward leave the
    critical chain and fill later compute gaps, and the all-reduce slices
    wait only for the attention's weight gradient. ``split_cpsat_top``: how
    many of the best split candidates CP-SAT refines (split graphs are
    harder, but on the FSMoE grid a second solve bought 0.1 % of gap for
    50 % more time).
    """

    max_degree: int = 8
    time_limit_s: float = 0.02
    cpsat_top: int = 1
    degree_top: int = 2
    max_parts: int = 1
    use_cpsat: bool = True
    seed_baselines: bool = True
    split_weight_grads: bool = False
    split_cpsat_top: int = 1


class SolveCache:
    """Results keyed by (layer signature, costs, options): identical layers are solved once.

    Least-recently-used entries beyond ``max_entries`` are dropped, so a long
    sweep over distinct layers does not grow without bound.
    """

    def __init__(self, max_entries: int = 2048) -> None:
        self.store: OrderedDict[tuple, object] = OrderedDict()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple):
        v = self.store.get(key)
        if v is None:
            self.misses += 1
        else:
            self.hits += 1
            self.store.move_to_end(key)
        return v

    def put(self, key: tuple, value) -> None:
        self.store[key] = value
        self.store.move_to_end(key)
        while len(self.store) > self.max_entries:
            self.store.popitem(last=False)

    def clear(self) -> None:
        self.store.clear()
        self.hits = self.misses = 0


#: The process-wide cache used when none is passed.
CACHE = SolveCache()


def _okey(o: SearchOptions) -> tuple:
    return (o.max_degree, o.time_limit_s, o.cpsat_top, o.degree_top, o.max_parts, o.use_cpsat, o.seed_baselines,
            o.split_weight_grads, o.split_cpsat_top)


# ---------------------------------------------------------------------------
# forward: one layer at a time
# ---------------------------------------------------------------------------

def _paper_forward_order(g: TaskGraph, r: int) -> dict[str, list[str]]:
    esp = "F0.ag0" in g.tasks
    ids = lambda s: [f"F0.{s}{i}" for i in range(r)]
    return {"compute": ["F0.attn"] + ids("exp"), "inter": ids("a2a_d") + ids("a2a_c"),
            "intra": (ids("ag") + ids("rs")) if esp else []}


def best_forward(spec: LayerSpec, costs: ClusterCosts, opts: SearchOptions | None = None,
                 cache: SolveCache | None = None) -> tuple[int, Schedule]:
    """Best forward degree of one layer and its schedule (ids of layer 0), cached by signature."""
    opts = opts or SearchOptions()
    cache = CACHE if cache is None else cache
    key = ("fwd", spec.signature(), costs_key(costs),
           (opts.max_degree, opts.time_limit_s, opts.cpsat_top, opts.use_cpsat, opts.seed_baselines))
    hit = cache.get(key)
    if hit is not None:
        return hit  # type: ignore[return-value]
    seeds: dict[int, list] = {}
    if opts.seed_baselines:
        rp = paper_degree(spec, costs, "forward")[0]
        seeds.setdefault(rp, []).append("paper")
        rt = tutel_degree(spec, costs)[0]
        seeds.setdefault(rt, []).append("tutel")
    cands = []
    for r in range(1, opts.max_degree + 1):
        ev = layer_eval(spec, costs, r, "forward")
        g = ev.graph
        h: Schedule | None = None
        ms = ev.makespan
        for sd in seeds.get(r, ()):
            if sd == "paper":
                alt = fixed_order_schedule(g, _paper_forward_order(g, r))
            else:  # Tutel's single-stream schedule, replayed with AG/RS on the intra link
                gt = build_layer_forward(spec, costs, r, comm="single")
                order = _paper_forward_order(gt, r)
                esp = "F0.ag0" in gt.tasks
                comm = [x for i in range(r) for x in ((f"F0.a2a_d{i}", f"F0.ag{i}") if esp else (f"F0.a2a_d{i}",))]
                comm += [x for i in range(r) for x in ((f"F0.rs{i}", f"F0.a2a_c{i}") if esp else (f"F0.a2a_c{i}",))]
                alt = replay(g, fixed_order_schedule(gt, {"compute": order["compute"], "inter": comm, "intra": []}))
            if alt.makespan < ms - EPS:
                h, ms = alt, alt.makespan
        cands.append((ms, r, ev, h))
    cands.sort(key=lambda c: (c[0], c[1]))
    best_ms, best_r, best_ev, best_h = cands[0]
    best_s = best_h if best_h is not None else best_ev.schedule
    if opts.use_cpsat:
        for ms, r, ev, h in cands[: opts.cpsat_top + 1]:
            if ev.lb >= best_ms - EPS or ms <= ev.lb + EPS:
                continue
            s = solve_cpsat(ev.graph, opts.time_limit_s, heuristic=h if h is not None else ev.schedule,
                            skip_if_tight=False)
            if s.makespan < best_ms - EPS:
                best_ms, best_r, best_s = s.makespan, r, s
    status, meta = best_s.status, dict(best_s.meta)
    if status == "HEURISTIC" and best_ms <= layer_eval(spec, costs, best_r, "forward").lb + EPS:
        status, meta["proof"] = "OPTIMAL", "meets lower bound"
    best_s = Schedule(start=best_s.start, end=best_s.end, order=best_s.order, makespan=best_s.makespan,
                      method=FSMOE, status=status, solve_time_s=best_s.solve_time_s, meta=meta)
    best_s.meta["r"] = best_r
    out = (best_r, best_s)
    cache.put(key, out)
    return out


# ---------------------------------------------------------------------------
# backward: the whole stack jointly
# ---------------------------------------------------------------------------

def _isolated_backward(spec: LayerSpec, costs: ClusterCosts, opts: SearchOptions, cache: SolveCache):
    """Per degree: heuristic schedule of one layer's backward without gradient slices (memoised)."""
    return {r: layer_eval(spec, costs, r, "backward") for r in range(1, opts.max_degree + 1)}


def _idle_windows(s: Schedule, resource: str = "inter") -> list[float]:
    """Lengths of the gaps of ``resource`` inside ``s`` (from 0 to the makespan)."""
    t = 0.0
    gaps = []
    for tid in s.order.get(resource, []):
        if s.start[tid] > t + EPS:
            gaps.append(s.start[tid] - t)
        t = max(t, s.end[tid])
    if s.makespan > t + EPS:
        gaps.append(s.makespan - t)
    return gaps


def window_slices(specs: Sequence[LayerSpec], costs: ClusterCosts, isos: Sequence) -> list[list[float]]:
    """Slice each layer's gradient to the idle inter-link gaps of the layers whose backward runs after it.

    Greedy in backward order with a stack of leftovers (FSMoE's idea), but on
    the gaps of actual schedules; where the slices then run is the solver's
    choice. Whatever does not fit stays one slice.
    """
    n = len(specs)
    ar = costs.all_reduce
    parts: list[list[float]] = [[] for _ in specs]
    stack: list[list] = []
    for l in reversed(range(n)):
        if l + 1 < n:
            stack.append([l + 1, specs[l + 1].dense_grad_elems])
        for gap in _idle_windows(isos[l].schedule):
            left = gap
            while stack and left > ar.alpha:
                it = stack[-1]
                take = min((left - ar.alpha) / ar.beta if ar.beta > 0 else float("inf"), it[1])
                parts[it[0]].append(take)
                it[1] -= take
                left -= ar(take)
                if it[1] <= 1e-9 * specs[it[0]].dense_grad_elems:
                    stack.pop()
                else:
                    break
    for src, el in stack:
        if el > 0:
            parts[src].append(el)
    parts[0] = [specs[0].dense_grad_elems]
    # tiny slices cost a full alpha each; merge anything under 5 % of the layer's gradient into its neighbour
    for l, p in enumerate(parts):
        if not p:
            p.append(specs[l].dense_grad_elems)
        merged: list[float] = []
        for x in p:
            if merged and (x < 0.05 * specs[l].dense_grad_elems or merged[-1] < 0.05 * specs[l].dense_grad_elems):
                merged[-1] += x
            else:
                merged.append(x)
        merged[-1] += specs[l].dense_grad_elems - sum(merged)
        parts[l] = merged
    return parts


def _equal(specs: Sequence[LayerSpec], k: int) -> list[list[float]]:
    return [[s.dense_grad_elems / k] * k for s in specs]


def best_backward(specs: Sequence[LayerSpec], costs: ClusterCosts, opts: SearchOptions | None = None,
                  cache: SolveCache | None = None, seeds: Sequence[StepSchedule] = ()):
    """Jointly choose r_bwd per layer and gradient slices for the backward stack; returns
    ``(r_bwd, parts, grad_sync, graph, schedule)``. ``seeds``: baseline step schedules whose backward
    configuration and schedule are candidates too."""
    opts = opts or SearchOptions()
    cache = CACHE if cache is None else cache
    n = len(specs)
    sigs = tuple(s.signature() for s in specs)
    key = ("bwd", sigs, costs_key(costs), _okey(opts))
    hit = cache.get(key)
    if hit is not None:
        return hit
    isos = [_isolated_backward(s, costs, opts, cache) for s in specs]
    ranked = [sorted(iso, key=lambda r: (iso[r].makespan, r)) for iso in isos]
    # candidate degree vectors: the k-th best isolated degree of every layer, plus the seeds' vectors
    vecs: list[tuple[int, ...]] = []
    for k in range(opts.degree_top):
        v = tuple(rk[min(k, len(rk) - 1)] for rk in ranked)
        if v not in vecs:
            vecs.append(v)
    for sd in seeds:
        v = tuple(sd.r_bwd)
        if v not in vecs and max(v) <= opts.max_degree:
            vecs.append(v)
    cands = []  # (makespan, tie, r_bwd, parts, grad_sync, graph, starts or Schedule)

    def consider(rv, parts, grad_sync, seed_sched: Schedule | None = None):
        g = build_stack_backward(specs, costs, list(rv), parts, grad_sync=grad_sync)
        starts, ms = heuristic_starts(g)
        sol: object = starts
        if seed_sched is not None:
            alt = _safe_replay(g, seed_sched)
            if alt is not None and alt.makespan < ms - EPS:
                sol, ms = alt, alt.makespan
        cands.append((ms, len(cands), rv, parts, grad_sync, g, sol))

    slicings: list[tuple[str, object]] = [("p1", None)]
    for k in (2, 4, 8):
        if k <= opts.max_parts:
            slicings.append((f"eq{k}", k))
    slicings.append(("win", "win"))
    for v_i, rv in enumerate(vecs):
        for name, how in slicings:
            if how is None:
                parts = None
            elif how == "win":
                parts = window_slices(specs, costs, [isos[l][rv[l]] for l in range(n)])
                if all(len(p) == 1 for p in parts):
                    continue  # same as p1
            else:
                parts = _equal(specs, how)  # type: ignore[arg-type]
            consider(rv, parts, "partitions")
            if n == 1:
                break  # a single layer has nowhere to hide its gradient: slicing only adds intercepts
        if v_i == 0:
            consider(rv, None, "bucket")
    for sd in seeds:  # the baselines' own backward, replayed on our (two-link) graph
        if max(sd.r_bwd) > opts.max_degree:
            continue
        bw = _backward_part(sd)
        if bw is not None:
            consider(tuple(sd.r_bwd), [p if p else None for p in sd.grad_partitions] if any(sd.grad_partitions) else None,
                     "partitions" if any(sd.grad_partitions) else "bucket", bw)
    cands.sort(key=lambda c: (c[0], c[1]))

    def as_sched(c) -> Schedule:
        return c[6] if isinstance(c[6], Schedule) else schedule_from_starts(c[5], c[6])

    best = cands[0]
    best_s = as_sched(best)
    if opts.use_cpsat and not opts.split_weight_grads:  # with the split, CP-SAT runs on the split graph instead
        for c in cands[: opts.cpsat_top]:
            g = c[5]
            lb = lower_bound(g)
            if lb >= best[0] - EPS or c[0] <= lb + EPS:
                if c is best and c[0] <= lb + EPS:
                    best_s.status = "OPTIMAL"
                    best_s.meta["proof"] = "meets lower bound"
                continue
            s = solve_cpsat(g, opts.time_limit_s, heuristic=as_sched(c), skip_if_tight=False)
            if s.makespan < best[0] - EPS or (c is best and s.status == "OPTIMAL"):
                best, best_s = c, s
    out = (list(best[2]), best[3], best[4], best[5], best_s)
    if opts.split_weight_grads:
        out = _split_backward(specs, costs, opts, cands, best, best_s, as_sched)
    cache.put(key, out)
    return out


def split_times(sched: Schedule, graph: TaskGraph) -> Schedule:
    """An unsplit backward schedule as a schedule of the weight-gradient-split ``graph``.

    Each expert / attention backward slot [s, e) becomes its input gradient in
    [s, m) and its weight gradient in [m, e), m the midpoint: feasible, so the
    split search never loses to the unsplit one.
    """
    start = dict(sched.start)
    for tid, t in graph.tasks.items():
        if t.role in ("expert_wgrad", "dense_wgrad"):
            src = tid.replace(".expw", ".exp") if t.role == "expert_wgrad" else tid[: -len("_w")]
            s0, e0 = sched.start[src], sched.end[src]
            mid = s0 + (e0 - s0) / 2
            start[tid] = mid
    return Schedule(start=start, end={t: start[t] + graph.tasks[t].duration for t in start}, order={},
                    makespan=sched.makespan)


def _split_backward(specs, costs, opts, cands, best, best_s, as_sched):
    """Re-solve the best backward configurations with weight gradients split off the chain.

    Candidates: the few best unsplit configurations and every seed's, each
    scored by the heuristic on its split graph and by its unsplit schedule
    converted (:func:`split_times`), plus finer equal slices and the best
    configuration one degree lower (:data:`_SPLIT_DEGREE_STEPS`); the best
    few are justified (:data:`SPLIT_JUSTIFY`) and CP-SAT refines the best. The
    unsplit winner's conversion is always among them, so splitting never
    loses.
    """
    pool = [best] + cands[: opts.degree_top + 1] + [c for c in cands if isinstance(c[6], Schedule)]
    seen = set()
    scored = []
    for c in pool:
        conf = (tuple(c[2]), repr(c[3]), c[4])
        if conf in seen:
            continue
        seen.add(conf)
        gs = build_stack_backward(specs, costs, list(c[2]), c[3], grad_sync=c[4], wgrad=True)
        conv = _safe_replay(gs, split_times(best_s if c is best else as_sched(c), gs))
        starts, ms = heuristic_starts(gs)
        hint = conv if conv is not None and conv.makespan <= ms + EPS else schedule_from_starts(gs, starts)
        scored.append((hint.makespan, len(scored), c, gs, hint))
    # finer slices fit the short idle windows that the split leaves on the inter link
    if len(specs) > 1:
        rv = tuple(best[2])
        for k in _SPLIT_EXTRA_PARTS:
            parts = _equal(specs, k)
            gs = build_stack_backward(specs, costs, list(rv), parts, grad_sync="partitions", wgrad=True)
            starts, ms = heuristic_starts(gs)
            scored.append((ms, len(scored), (ms, 0, rv, parts, "partitions"), gs, schedule_from_starts(gs, starts)))
    # a lower degree: with weight gradients filling the compute gaps, fewer chunks (fewer intercepts) often win
    seen_rv = {(tuple(x[2][2]), repr(x[2][3]), x[2][4]) for x in scored}
    rv0 = tuple(best[2])
    for delta in _SPLIT_DEGREE_STEPS:
        rv = tuple(min(opts.max_degree, max(1, r + delta)) for r in rv0)
        for parts, sync in ((best[3], best[4]), (None, "partitions")):
            conf = (rv, repr(parts), sync)
            if conf in seen_rv:
                continue
            seen_rv.add(conf)
            gs = build_stack_backward(specs, costs, list(rv), parts, grad_sync=sync, wgrad=True)
            starts, ms = heuristic_starts(gs)
            scored.append((ms, len(scored), (ms, 0, rv, parts, sync), gs, schedule_from_starts(gs, starts)))
    scored.sort(key=lambda x: (x[0], x[1]))
    if SPLIT_JUSTIFY:  # forward-backward improvement of the best few, then re-rank
        for k, (ms, tie, c, gs, h) in enumerate(scored[:SPLIT_JUSTIFY]):
            st, jms = justify(gs, [h.start[t] for t in gs.arrays().ids])
            if jms < ms - EPS:
                scored[k] = (jms, tie, c, gs, schedule_from_starts(gs, st))
        scored.sort(key=lambda x: (x[0], x[1]))
    _, _, c, gs, s = scored[0]
    out = (list(c[2]), c[3], c[4], gs, s)
    if opts.use_cpsat:
        for _, _, c, gs, h in scored[: opts.split_cpsat_top]:
            s = solve_cpsat(gs, opts.time_limit_s, heuristic=h)
            if s.makespan < out[4].makespan - EPS or out[4] is h:
                out = (list(c[2]), c[3], c[4], gs, s)
    return out


_SPLIT_EXTRA_PARTS: tuple[int, ...] = (2, 4)
#: Split mode: forward-backward justification (:func:`~.heuristic.justify`) of this many of the best
#: heuristic candidates before they are re-ranked and CP-SAT starts from the best (0: none).
SPLIT_JUSTIFY = 3
#: Degree offsets (applied to every layer of the best unsplit vector) also tried on the split graph
#: (on the FSMoE grid, +1 and -2 bought nothing more).
_SPLIT_DEGREE_STEPS: tuple[int, ...] = (-1,)


def _safe_replay(g: TaskGraph, sched: Schedule) -> Schedule | None:
    """:func:`replay`, or None if float ties made the order inconsistent (then the candidate is skipped)."""
    try:
        return replay(g, sched)
    except (ValueError, KeyError):
        return None


def _backward_part(sd: StepSchedule) -> Schedule | None:
    """The backward half of a baseline's step schedule, shifted to start at 0."""
    s = sd.schedule
    g = sd.graph
    if s is None or g is None:
        return None
    t0 = s.end["loss"]
    start = {t: v - t0 for t, v in s.start.items() if g.tasks[t].phase == "backward"}
    end = {t: s.end[t] - t0 for t in start}
    return Schedule(start=start, end=end, order={}, makespan=max(end.values(), default=0.0), method=sd.method)


# ---------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------

def fsmoe_step(specs: Sequence[LayerSpec], costs: ClusterCosts, opts: SearchOptions | None = None,
               cache: SolveCache | None = None, seeds: Sequence[StepSchedule] | None = None) -> StepSchedule:
    """Our method on a layer stack: per-layer forward degrees, joint backward search, CP-SAT."""
    t0 = time.perf_counter()
    opts = opts or SearchOptions()
    cache = CACHE if cache is None else cache
    specs = list(specs)
    n = len(specs)
    if n == 0:
        raise ValueError("fsmoe_step needs at least one LayerSpec")
    if seeds is None and opts.seed_baselines:
        seeds = [fsmoe_paper(specs, costs), tutel(specs, costs), sequential(specs, costs)]
    fw = [best_forward(s, costs, opts, cache) for s in specs]
    r_f = [r for r, _ in fw]
    fwd_ms = sum(s.makespan for _, s in fw)
    r_b, parts, grad_sync, bg, bs = best_backward(specs, costs, opts, cache, seeds or ())
    statuses = [s.status for _, s in fw] + [bs.status]
    status = "OPTIMAL" if all(st == "OPTIMAL" for st in statuses) else (
        "FEASIBLE" if any(st in ("OPTIMAL", "FEASIBLE") for st in statuses) else "HEURISTIC")
    part_list = [list(p) if p else ([] if grad_sync == "bucket" else [s.dense_grad_elems]) for p, s in
                 zip(parts or [None] * n, specs)]

    def graph_fn() -> TaskGraph:
        return build_step(specs, costs, r_f, r_b, [p or None for p in part_list] if grad_sync != "bucket" else None,
                          grad_sync=grad_sync, wgrad=opts.split_weight_grads)

    def sched_fn(g: TaskGraph) -> Schedule:
        loss = Schedule(start={"loss": 0.0}, end={"loss": 0.0}, order={"compute": ["loss"]}, makespan=0.0)
        pieces = [rename_layer(s, "F", 0, l) for l, (_, s) in enumerate(fw)] + [loss, bs]
        return concat(pieces, method=FSMOE, status=status)

    return StepSchedule(method=FSMOE, makespan=fwd_ms + bs.makespan, forward_ms=fwd_ms, backward_ms=bs.makespan,
                        r_fwd=r_f, r_bwd=list(r_b), grad_partitions=part_list if grad_sync != "bucket" else [[] for _ in specs],
                        status=status, solve_time_s=time.perf_counter() - t0,
                        meta={"grad_sync": grad_sync, "bwd_status": bs.status,
                              "split_weight_grads": opts.split_weight_grads,
                              "fwd_status": [s.status for _, s in fw]},
                        _graph_fn=graph_fn, _schedule_fn=sched_fn)

"""The simulator's baselines and lower bound, on the same layer model and cost model as ours.

* ``sequential`` (:data:`fsmoe_compiler.names.SEQUENTIAL`: DeepSpeed-MoE's
  way) on the layer model: no pipelining (r = 1), so dispatch A2A,
  all-gather, experts, reduce-scatter and combine A2A run one after another;
  the dense gradients are all-reduced in one bucket after the backward (all
  dense gradients of a layer stack fit in DeepSpeed's default 5e8-element
  reduce bucket). The step time is the sum of all task durations. The
  compiler's ``sequential`` replays a real graph as traced, so its gradient
  all-reduces sit wherever that graph has them, not in one bucket.
* ``tutel`` (:data:`fsmoe_compiler.names.TUTEL`: Tutel's way) on the layer
  model: one pipeline degree per layer from {1, 2, 4, 8}, picked by trying
  each (forward + backward time of that layer) and used for both
  directions; all dispatch transfers, then per chunk the experts and the
  combine transfers, as a fixed-order schedule; the all-reduce in one bucket
  after the backward, no partitioning. Coarser than the compiler's ``tutel``
  order on a real task graph in one respect: here AG/RS share the ``inter``
  resource with the A2As (one communication stream, as Tutel issues them),
  where the compiler keeps one queue per link.
* ``fsmoe_paper`` — FSMoE's algorithm as ``shared/FSMOE.md`` states it:
  closed-form per-layer time T(r) (inter- or intra-node dominant, chosen as
  FSMoE's code does by comparing one A2A chunk with one AG chunk) minimised
  over r in {1, 2, 4, 8}, separately for forward (g = 0) and backward;
  gradient all-reduce slices fitted greedily into the idle inter-link windows
  (inside each MoE backward: T_b(r) - 2rA; the whole attention backward) in
  backward order with a stack of leftovers; FSMoE's launch order (dispatch
  A2As, then (Expert_i, RS_i), then combine A2As; slices between the dispatch
  and combine A2As, or during the attention backward) executed as a
  fixed-order schedule. Simplifications, said plainly: the differential-
  evolution spread of the leftover is replaced by a two-way choice (leave it
  after the backward, or spread it evenly over the MoE layers that may host
  it, re-choosing their r_bwd) using the same T(r) objective; FSMoE code's
  "A2A under 1 ms -> r = 1" shortcut is not applied (it is tuned to their
  testbed and would only make this baseline slower).
* ``lower_bound`` — see :func:`step_lower_bound`: no schedule of any method
  (any r in 1..max_degree, any gradient partitioning, bucketed or not) can be
  shorter.
"""

from __future__ import annotations

import time
from typing import Sequence

from fsmoe_compiler.names import SEQUENTIAL, TUTEL
from fsmoe_compiler.scheduler.bounds import lower_bound
from fsmoe_compiler.scheduler.heuristic import fixed_order_schedule
from fsmoe_compiler.scheduler.schedule import Schedule
from fsmoe_compiler.scheduler.taskgraph import RESOURCES, TaskGraph
from fsmoe_compiler.sim.builders import (attention_cost, build_layer_backward, build_layer_forward, build_step,
                                         chunk_costs)
from fsmoe_compiler.sim.costs import ClusterCosts, LayerSpec
from fsmoe_compiler.sim.layercache import costs_key, layer_eval
from fsmoe_compiler.sim.methods import FSMOE_PAPER, LOWER_BOUND
from fsmoe_compiler.sim.step import StepSchedule

#: Pipeline degrees Tutel and FSMoE choose from.
POW2_DEGREES: tuple[int, ...] = (1, 2, 4, 8)


# ---------------------------------------------------------------------------
# fixed launch orders
# ---------------------------------------------------------------------------

def _ids(p: str, l: int, short: str, r: int) -> list[str]:
    return [f"{p}{l}.{short}{i}" for i in range(r)]


def _moe_order(g: TaskGraph, p: str, l: int, r: int, style: str, mid: Sequence[str] = ()) -> dict[str, list[str]]:
    """Per-resource launch order of one MoE layer (``style`` :data:`TUTEL`, else FSMoE's order)."""
    esp = f"{p}{l}.ag0" in g.tasks
    d, c, e = _ids(p, l, "a2a_d", r), _ids(p, l, "a2a_c", r), _ids(p, l, "exp", r)
    ag, rs = (_ids(p, l, "ag", r), _ids(p, l, "rs", r)) if esp else ([], [])
    if style == TUTEL:  # one stream: dispatch (+AG) of every chunk, then per chunk RS + combine
        comm = [x for i in range(r) for x in ([d[i], ag[i]] if esp else [d[i]])]
        comm += [x for i in range(r) for x in ([rs[i], c[i]] if esp else [c[i]])]
        return {"inter": comm + list(mid), "intra": [], "compute": e}
    return {"inter": d + list(mid) + c, "intra": ag + rs, "compute": e}


def _step_order(g: TaskGraph, n: int, r_fwd: Sequence[int], r_bwd: Sequence[int], style: str,
                moe_slices: dict[int, list[str]] | None = None, attn_slices: dict[int, list[str]] | None = None,
                tail: Sequence[str] = ()) -> dict[str, list[str]]:
    order: dict[str, list[str]] = {r: [] for r in RESOURCES}
    moe_slices = moe_slices or {}
    attn_slices = attn_slices or {}
    for l in range(n):
        order["compute"].append(f"F{l}.attn")
        for res, ts in _moe_order(g, "F", l, r_fwd[l], style).items():
            order[res].extend(ts)
    order["compute"].append("loss")
    for l in reversed(range(n)):
        for res, ts in _moe_order(g, "B", l, r_bwd[l], style, moe_slices.get(l, ())).items():
            order[res].extend(ts)
        order["compute"].append(f"B{l}.attn")
        order["inter"].extend(attn_slices.get(l, ()))
    order["inter"].extend(tail)
    return order


def _finish(method: str, g: TaskGraph, sched: Schedule, n: int, r_fwd, r_bwd, parts, t0: float, status: str,
            meta: dict | None = None) -> StepSchedule:
    fwd = sched.end["loss"]
    return StepSchedule(method=method, makespan=sched.makespan, forward_ms=fwd, backward_ms=sched.makespan - fwd,
                        r_fwd=list(r_fwd), r_bwd=list(r_bwd), grad_partitions=parts, status=status,
                        solve_time_s=time.perf_counter() - t0, meta=dict(meta or {}), _graph=g, _schedule=sched)


# ---------------------------------------------------------------------------
# sequential (names.SEQUENTIAL, DeepSpeed-MoE)
# ---------------------------------------------------------------------------

def sequential(specs: Sequence[LayerSpec], costs: ClusterCosts) -> StepSchedule:
    """The ``sequential`` schedule on the layer model: r = 1, no overlap, one all-reduce bucket after the backward."""
    t0 = time.perf_counter()
    n = len(specs)
    g = build_step(specs, costs, 1, 1, comm="split", grad_sync="bucket")
    arr = g.arrays()
    order: dict[str, list[str]] = {r: [] for r in RESOURCES}
    for i in arr.topo:  # a chain: topological order is the only order
        order[RESOURCES[arr.res[i]]].append(arr.ids[i])
    sched = fixed_order_schedule(g, order, method=SEQUENTIAL, status="FIXED_ORDER")
    return _finish(SEQUENTIAL, g, sched, n, [1] * n, [1] * n, [[] for _ in specs], t0, "FIXED_ORDER")


# ---------------------------------------------------------------------------
# tutel (names.TUTEL)
# ---------------------------------------------------------------------------

_TUTEL_CACHE: dict[tuple, tuple[int, float]] = {}


def tutel_degree(spec: LayerSpec, costs: ClusterCosts, candidates: Sequence[int] = POW2_DEGREES) -> tuple[int, float]:
    """Tutel's adaptive degree: the r whose layer (forward + backward, one comm stream) runs fastest."""
    key = (spec.signature(), costs_key(costs), tuple(candidates))
    hit = _TUTEL_CACHE.get(key)
    if hit is not None:
        return hit
    best = (0, float("inf"))
    for r in candidates:
        tot = 0.0
        for phase, build in (("F", build_layer_forward), ("B", build_layer_backward)):
            g = build(spec, costs, r, comm="single") if phase == "F" else build(spec, costs, r, [], comm="single")
            order = _moe_order(g, phase, 0, r, TUTEL)
            order["compute"] = (["F0.attn"] + order["compute"]) if phase == "F" else (order["compute"] + ["B0.attn"])
            tot += fixed_order_schedule(g, order).makespan
        if tot < best[1] - 1e-12:
            best = (r, tot)
    _TUTEL_CACHE[key] = best
    return best


def tutel(specs: Sequence[LayerSpec], costs: ClusterCosts, candidates: Sequence[int] = POW2_DEGREES) -> StepSchedule:
    """The ``tutel`` schedule on the layer model: per-layer degree from {1,2,4,8} by trial, same for forward and
    backward, one comm stream."""
    t0 = time.perf_counter()
    n = len(specs)
    rs = [tutel_degree(s, costs, candidates)[0] for s in specs]
    g = build_step(specs, costs, rs, rs, comm="single", grad_sync="bucket")
    order = _step_order(g, n, rs, rs, TUTEL, tail=["B.bucket"])
    sched = fixed_order_schedule(g, order, method=TUTEL)
    return _finish(TUTEL, g, sched, n, rs, rs, [[] for _ in specs], t0, "FIXED_ORDER")


# ---------------------------------------------------------------------------
# fsmoe_paper
# ---------------------------------------------------------------------------

def paper_terms(spec: LayerSpec, costs: ClusterCosts, r: int, phase: str = "forward") -> tuple[float, float, float, float]:
    """FSMoE's (A, G, R, E): one A2A chunk, one AG chunk, one RS chunk, all expert work at degree r."""
    cc = chunk_costs(spec, costs, r, phase)
    A = cc["dispatch"][0]
    G = cc["gather"][0] if "gather" in cc else 0.0
    R = cc["scatter"][0] if "scatter" in cc else 0.0
    E = r * cc["expert"][0]
    return A, G, R, E


def paper_T(spec: LayerSpec, costs: ClusterCosts, r: int, phase: str = "forward", g: float = 0.0) -> float:
    """FSMoE's closed-form MoE layer time at degree r with g ms of gradient all-reduce to hide.

    inter-node dominant (A >= G): ``max(2rA + max(G+R, g), 2A+G+R+E)``;
    intra-node dominant: ``max(2A + r(G+R), 2A+G+R+E, 2rA + g)``.
    """
    A, G, R, E = paper_terms(spec, costs, r, phase)
    if A >= G:
        return max(2 * r * A + max(G + R, g), 2 * A + G + R + E)
    return max(2 * A + r * (G + R), 2 * A + G + R + E, 2 * r * A + g)


def paper_degree(spec: LayerSpec, costs: ClusterCosts, phase: str = "forward", g: float = 0.0,
                 candidates: Sequence[int] = POW2_DEGREES) -> tuple[int, float]:
    """argmin over r of :func:`paper_T` (smallest r on ties) and its T."""
    best = (candidates[0], paper_T(spec, costs, candidates[0], phase, g))
    for r in candidates[1:]:
        t = paper_T(spec, costs, r, phase, g)
        if t < best[1] - 1e-12:
            best = (r, t)
    return best


def paper_moe_window(spec: LayerSpec, costs: ClusterCosts, r: int) -> float:
    """Idle inter-link time inside one MoE backward at degree r, by FSMoE's model: T_b(r) - 2rA."""
    A = paper_terms(spec, costs, r, "backward")[0]
    return max(0.0, paper_T(spec, costs, r, "backward", 0.0) - 2 * r * A)


def paper_grad_plan(specs: Sequence[LayerSpec], costs: ClusterCosts, candidates: Sequence[int] = POW2_DEGREES):
    """FSMoE's greedy gradient windows with a stack; returns (r_bwd, slices).

    ``slices`` is a list of ``(src_layer, elements, where)`` with ``where`` in
    ``("moe", l)``, ``("attn", l)`` or ``("tail", -1)`` (after the backward).
    """
    n = len(specs)
    ar = costs.all_reduce
    r_b = [paper_degree(s, costs, "backward", 0.0, candidates)[0] for s in specs]
    windows = []  # in backward order: (kind, layer, capacity ms, new gradient source or None)
    for l in reversed(range(n)):
        windows.append(("moe", l, paper_moe_window(specs[l], costs, r_b[l]), l + 1 if l + 1 < n else None))
        windows.append(("attn", l, attention_cost(specs[l], costs, "backward"), None))
    slices: list[tuple[int, float, tuple[str, int]]] = []
    stack: list[list] = []  # [src layer, remaining elements], LIFO

    def fill(it: list, left: float, where: tuple[str, int]) -> float:
        if left <= ar.alpha or it[1] <= 0:
            return left
        take = min((left - ar.alpha) / ar.beta if ar.beta > 0 else float("inf"), it[1])
        slices.append((it[0], take, where))
        it[1] -= take
        return left - ar(take)

    for kind, l, cap, new in windows:
        left = cap
        if new is not None:  # the gradient produced just before this window goes first
            it = [new, specs[new].dense_grad_elems]
            left = fill(it, left, (kind, l))
            if it[1] > 1e-9 * specs[new].dense_grad_elems:
                stack.append(it)
                continue
        while stack and left > ar.alpha:
            it = stack[-1]
            left = fill(it, left, (kind, l))
            if it[1] <= 1e-9 * specs[it[0]].dense_grad_elems:
                stack.pop()
            else:
                break
    leftovers = stack + [[0, specs[0].dense_grad_elems]]  # layer 0's gradient is produced last
    # Leftover: after the backward, or spread evenly over the MoE layers below its source (re-choosing r_bwd).
    load_moe = {l: 0.0 for l in range(n)}
    for src, el, (kind, l) in slices:
        if kind == "moe":
            load_moe[l] += ar(el)
    for src, el in leftovers:
        hosts = list(range(src))  # MoE layers whose backward runs after src's gradient exists
        if not hosts or el <= 0:
            slices.append((src, el, ("tail", -1)))
            continue
        share = el / len(hosts)
        before = sum(paper_T(specs[h], costs, r_b[h], "backward", load_moe[h]) for h in hosts) + ar(el)
        after_rs = [paper_degree(specs[h], costs, "backward", load_moe[h] + ar(share), candidates) for h in hosts]
        after = sum(t for _, t in after_rs)
        if after < before - 1e-9:
            for h, (rr, _) in zip(hosts, after_rs):
                r_b[h] = rr
                load_moe[h] += ar(share)
                slices.append((src, share, ("moe", h)))
        else:
            slices.append((src, el, ("tail", -1)))
    return r_b, slices


def fsmoe_paper(specs: Sequence[LayerSpec], costs: ClusterCosts, candidates: Sequence[int] = POW2_DEGREES) -> StepSchedule:
    """FSMoE's own algorithm (closed-form degrees, greedy gradient windows, its launch order), fixed-order run."""
    t0 = time.perf_counter()
    n = len(specs)
    r_f = [paper_degree(s, costs, "forward", 0.0, candidates)[0] for s in specs]
    r_b, slices = paper_grad_plan(specs, costs, candidates)
    parts: list[list[float]] = [[] for _ in specs]
    moe_slices: dict[int, list[str]] = {}
    attn_slices: dict[int, list[str]] = {}
    tail: list[str] = []
    for src, el, (kind, l) in slices:
        tid = f"B{src}.ar{len(parts[src])}"
        parts[src].append(el)
        {"moe": moe_slices, "attn": attn_slices}.get(kind, {}).setdefault(l, []).append(tid)
        if kind == "tail":
            tail.append(tid)
    # fix float drift so the slices sum exactly to the layer's gradient
    for l, p in enumerate(parts):
        p[-1] += specs[l].dense_grad_elems - sum(p)
    g = build_step(specs, costs, r_f, r_b, parts, comm="split", grad_sync="partitions")
    order = _step_order(g, n, r_f, r_b, FSMOE_PAPER, moe_slices, attn_slices, tail)
    sched = fixed_order_schedule(g, order, method=FSMOE_PAPER)
    return _finish(FSMOE_PAPER, g, sched, n, r_f, r_b, parts, t0, "FIXED_ORDER",
                   meta={"slices": slices, "T_fwd": [paper_T(s, costs, r, "forward") for s, r in zip(specs, r_f)]})


# ---------------------------------------------------------------------------
# lower bound
# ---------------------------------------------------------------------------

_LB_CACHE: dict[tuple, tuple[float, float, float]] = {}


def layer_bounds(spec: LayerSpec, costs: ClusterCosts, max_degree: int = 8) -> tuple[float, float, float]:
    """(forward bound, backward-segment bound, backward inter-link load), each minimised over r in 1..max_degree."""
    key = (spec.signature(), costs_key(costs), max_degree)
    hit = _LB_CACHE.get(key)
    if hit is not None:
        return hit
    f = min(layer_eval(spec, costs, r, "forward").lb for r in range(1, max_degree + 1))
    b_seg, b_inter = float("inf"), float("inf")
    for r in range(1, max_degree + 1):
        ev = layer_eval(spec, costs, r, "backward")
        b_seg = min(b_seg, ev.lb)
        b_inter = min(b_inter, ev.graph.total("inter"))
    _LB_CACHE[key] = (f, b_seg, b_inter)
    return f, b_seg, b_inter


def _split_layer_bounds(spec: LayerSpec, costs: ClusterCosts, max_degree: int) -> float:
    """Min over r of the bound of one layer's backward *input-gradient chain* (weight gradients removed)."""
    key = ("split", spec.signature(), costs_key(costs), max_degree)
    hit = _LB_CACHE.get(key)
    if hit is not None:
        return hit[0]
    best = float("inf")
    for r in range(1, max_degree + 1):
        full = build_layer_backward(spec, costs, r, [], wgrad=True)
        keep = [t for t in full if t.role not in ("expert_wgrad", "dense_wgrad")]
        g = TaskGraph(keep, [(u, v) for u, v in full.deps if u in full.tasks and v in {t.id for t in keep}
                             and u in {t.id for t in keep}])
        best = min(best, lower_bound(g))
    _LB_CACHE[key] = (best, 0.0, 0.0)
    return best


def step_lower_bound(specs: Sequence[LayerSpec], costs: ClusterCosts, max_degree: int = 8,
                     split_weight_grads: bool = False) -> StepSchedule:
    """A bound no method's step can beat (any r in 1..max(max_degree, 8), any slicing, bucketed or not).

    Forward layers are separated by barriers (layer l+1's attention needs all
    of layer l), so forward >= sum of each layer's min over r of
    max(critical path, resource bounds). Backward segments (MoE backward +
    attention backward of a layer) are barrier-separated too; only gradient
    all-reduces cross them, and layer l's gradient exists only after segment
    l. So for every l: backward >= (segments L-1..l) + (inter work of the
    segments below l) + the all-reduce of the gradients of layers <= l,
    priced as one merged all-reduce (the cheapest possible).

    ``split_weight_grads``: also valid for schedules that run weight gradients
    apart (``SearchOptions.split_weight_grads``). Then only the input-gradient
    chains are barrier-separated and a layer's all-reduce may start once its
    attention weight gradient is done, so the bound is the minimum of the
    plain bound and a relaxed one: for every l, (input-gradient chains above
    l) + (all inter-link work of layers <= l) + merged all-reduce of layers <= l;
    (chains above l and l) + inter work below l + that all-reduce (a layer's
    attention weight gradient takes as long as its input gradient); (chains
    above l) + first dispatch and gather of l + all compute of layers <= l;
    the chain alone; the total compute.
    """
    t0 = time.perf_counter()
    n = len(specs)
    max_degree = max(max_degree, max(POW2_DEGREES))  # the baselines may use r = 8 whatever our search is limited to
    lb = [layer_bounds(s, costs, max_degree) for s in specs]
    fwd = sum(x[0] for x in lb)
    ar = costs.all_reduce
    best = 0.0
    for l in range(n + 1):
        seg = sum(lb[k][1] for k in range(l, n))
        inter_below = sum(lb[k][2] for k in range(l))
        el = sum(specs[k].dense_grad_elems for k in range(min(l, n - 1) + 1)) if l < n else \
            sum(s.dense_grad_elems for s in specs)
        best = max(best, seg + inter_below + ar(el))
    if split_weight_grads:
        seg = [_split_layer_bounds(s, costs, max_degree) for s in specs]
        # least compute a layer's backward needs, and least time before its first expert chunk can start
        comp = [attention_cost(s, costs, "backward") + min(
            r * chunk_costs(s, costs, r, "backward")["expert"][0] for r in range(1, max_degree + 1)) for s in specs]
        head = []
        for s in specs:
            h = float("inf")
            for r in range(1, max_degree + 1):
                cc = chunk_costs(s, costs, r, "backward")
                h = min(h, cc["dispatch"][0] + (cc["gather"][0] if "gather" in cc else 0.0))
            head.append(h)
        relaxed = max(sum(seg), sum(comp))
        for l in range(n):
            above = sum(seg[k] for k in range(l + 1, n))
            inter = sum(lb[k][2] for k in range(l + 1))
            inter_below = sum(lb[k][2] for k in range(l))
            el = sum(specs[k].dense_grad_elems for k in range(l + 1))
            # everything of layers <= l starts after the chains above l
            relaxed = max(relaxed, above + inter + ar(el))
            # the A2As below l and every all-reduce of layers <= l start after layer l's chain
            # (its attention weight gradient takes as long as its input gradient)
            relaxed = max(relaxed, above + seg[l] + inter_below + ar(el))
            # all compute of layers <= l runs after the chains above l and layer l's first dispatch + gather
            relaxed = max(relaxed, above + head[l] + sum(comp[k] for k in range(l + 1)))
        # the last layer's attention halves both run after its MoE, one after the other, at the very end
        relaxed = max(relaxed, sum(seg) + attention_cost(specs[0], costs, "backward") / 2)
        best = min(best, relaxed)
    return StepSchedule(method=LOWER_BOUND, makespan=fwd + best, forward_ms=fwd, backward_ms=best,
                        r_fwd=[], r_bwd=[], grad_partitions=[], status="BOUND",
                        solve_time_s=time.perf_counter() - t0)

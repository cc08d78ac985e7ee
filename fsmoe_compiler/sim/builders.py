"""The layer model's task graphs: MoE layers, layer stacks and whole training steps, as the simulator plans them.

One layer = an attention / dense block (compute) followed by an MoE FFN. The
MoE part is pipelined into ``r`` chunks along the capacity dimension; chunk i
is the chain ``A2A_dispatch_i (inter) -> AG_i (intra) -> Expert_i (compute) ->
RS_i (intra) -> A2A_combine_i (inter)`` (AG/RS only with expert sharding,
``esp > 1``). A chunk of op j costs ``alpha_j + beta_j * a_j / r`` (FSMoE's
model). The backward has the same shape on gradients: the entering A2A is the
gradient of the forward combine, the all-gather the gradient of the
reduce-scatter and vice versa, and expert work is twice the forward's (dX and
dW GEMMs, each paying its intercept); the attention block's backward is twice
its forward. The dense (attention) gradients are all-reduced over the
inter-node link in partitions that depend only on that layer's attention
backward, so they may run in any idle window of the link while earlier layers
still compute their backward.

Task ids are stable and readable: ``F{l}.a2a_d{i}``, ``B{l}.exp{i}``,
``B{l}.ar{p}``, ``loss``, ``B.bucket``. ``comm="single"`` puts AG/RS on the
``inter`` resource too (one communication stream, as Tutel runs).
"""

from __future__ import annotations

from typing import Sequence

from fsmoe_compiler.names import ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, REDUCE_SCATTER
from fsmoe_compiler.scheduler.taskgraph import TaskGraph
from fsmoe_compiler.sim.costs import ClusterCosts, LayerSpec

COMM_MODES = ("split", "single")
GRAD_SYNC_MODES = ("partitions", "bucket", "none")


def _check_r(r: int, what: str = "pipeline degree") -> int:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {r!r}")
    return r


def chunk_costs(spec: LayerSpec, costs: ClusterCosts, r: int, phase: str = "forward") -> dict[str, tuple[float, float]]:
    """Per-chunk ``role -> (duration ms, size)`` of one MoE layer at degree ``r``.

    Roles: dispatch, gather, expert, scatter, combine (gather/scatter only when
    ``spec.esp > 1``). Backward: AG and RS swap (same sizes here), expert x2.
    """
    _check_r(r)
    if spec.ffn not in costs.gemm:
        raise ValueError(f"costs {costs.name!r} have no GEMM model for ffn {spec.ffn!r}; have {sorted(costs.gemm)}")
    a0, a1, a2, a3 = spec.a2a_elems / r, spec.ag_elems / r, spec.expert_macs / r, spec.rs_elems / r
    gemm = costs.gemm[spec.ffn]
    out = {"dispatch": (costs.all_to_all(a0), a0)}
    if spec.esp > 1:
        if phase == "forward":
            out["gather"] = (costs.all_gather(a1), a1)
            out["scatter"] = (costs.reduce_scatter(a3), a3)
        else:  # gradient of RS is an AG, gradient of AG is an RS
            out["gather"] = (costs.all_gather(a3), a3)
            out["scatter"] = (costs.reduce_scatter(a1), a1)
    out["expert"] = (gemm(a2) if phase == "forward" else 2.0 * gemm(a2), a2 if phase == "forward" else 2 * a2)
    out["combine"] = (costs.all_to_all(a0), a0)
    return out


def attention_cost(spec: LayerSpec, costs: ClusterCosts, phase: str = "forward") -> float:
    """The attention / dense block's compute time (backward = 2x forward)."""
    t = costs.dense(spec.attention_macs)
    return t if phase == "forward" else 2.0 * t


def all_reduce_cost(costs: ClusterCosts, elems: float) -> float:
    """The dense-gradient all-reduce of ``elems`` elements."""
    return costs.all_reduce(elems)


_KIND = {"dispatch": ALL_TO_ALL, "gather": ALL_GATHER, "expert": "expert", "scatter": REDUCE_SCATTER, "combine": ALL_TO_ALL}
_SHORT = {"dispatch": "a2a_d", "gather": "ag", "expert": "exp", "scatter": "rs", "combine": "a2a_c"}
_CHAIN = ("dispatch", "gather", "expert", "scatter", "combine")


def add_moe(g: TaskGraph, spec: LayerSpec, costs: ClusterCosts, r: int, layer: int, phase: str,
            after: Sequence[str], comm: str = "split", wgrad: bool = False) -> list[str]:
    """Add the r chunk chains of one MoE layer after tasks ``after``; return the exit task ids.

    ``wgrad`` (backward only): split each expert backward into its input
    gradient (on the chain) and its weight gradient ``B{l}.expw{i}`` (half the
    work each; the weight gradient only needs the gathered input and feeds
    nothing, so it can run in any later compute gap).
    """
    if comm not in COMM_MODES:
        raise ValueError(f"comm must be one of {COMM_MODES}, got {comm!r}")
    cc = chunk_costs(spec, costs, r, phase)
    p = "F" if phase == "forward" else "B"
    exits = []
    for i in range(r):
        prev = list(after)
        for role in _CHAIN:
            if role not in cc:
                continue
            dur, size = cc[role]
            kind = _KIND[role]
            res = "compute" if role == "expert" else ("intra" if role in ("gather", "scatter") and comm == "split"
                                                      else "inter")
            tid = f"{p}{layer}.{_SHORT[role]}{i}"
            if wgrad and role == "expert" and phase == "backward":
                dur, size = dur / 2, size / 2
                wid = f"B{layer}.expw{i}"
                g.add(wid, kind, res, dur, size=size, layer=layer, chunk=i, role="expert_wgrad", phase=phase)
                for u in prev:
                    g.add_dep(u, wid)
            g.add(tid, kind, res, dur, size=size, layer=layer, chunk=i, role=role, phase=phase)
            for u in prev:
                g.add_dep(u, tid)
            prev = [tid]
        exits.append(prev[0])
    return exits


def add_layer_forward(g: TaskGraph, spec: LayerSpec, costs: ClusterCosts, r: int, layer: int,
                      after: Sequence[str] = (), comm: str = "split") -> list[str]:
    """Attention block then the pipelined MoE of layer ``layer``; returns the exits."""
    tid = f"F{layer}.attn"
    g.add(tid, "attention", "compute", attention_cost(spec, costs, "forward"), size=spec.attention_macs,
          layer=layer, role="dense", phase="forward")
    for u in after:
        g.add_dep(u, tid)
    return add_moe(g, spec, costs, r, layer, "forward", [tid], comm)


def add_layer_backward(g: TaskGraph, spec: LayerSpec, costs: ClusterCosts, r: int, layer: int,
                       after: Sequence[str] = (), comm: str = "split",
                       grad_partitions: Sequence[float] | None = None, wgrad: bool = False) -> str:
    """MoE backward then attention backward of ``layer``, plus its gradient all-reduce partitions.

    ``grad_partitions``: element counts of the dense-gradient all-reduce
    slices (default: one slice of ``spec.dense_grad_elems``; ``[]``: none,
    e.g. when a bucket after the backward syncs them). Returns the attention
    backward's id (what the next layer's backward and the slices wait for).

    ``wgrad``: split the attention backward into its input gradient
    ``B{l}.attn`` (what the layer below waits for) and its weight gradient
    ``B{l}.attn_w`` (what the all-reduce slices wait for), half the work each,
    and the expert backwards likewise (see :func:`add_moe`).
    """
    exits = add_moe(g, spec, costs, r, layer, "backward", after, comm, wgrad)
    tid = f"B{layer}.attn"
    full = attention_cost(spec, costs, "backward")
    g.add(tid, "attention", "compute", full / 2 if wgrad else full, size=(1 if wgrad else 2) * spec.attention_macs,
          layer=layer, role="dense", phase="backward")
    for u in exits:
        g.add_dep(u, tid)
    src = tid
    if wgrad:
        src = f"B{layer}.attn_w"
        g.add(src, "attention", "compute", full / 2, size=spec.attention_macs, layer=layer, role="dense_wgrad",
              phase="backward")
        for u in exits:
            g.add_dep(u, src)
    parts = [spec.dense_grad_elems] if grad_partitions is None else list(grad_partitions)
    if parts and abs(sum(parts) - spec.dense_grad_elems) > 1e-6 * max(1.0, spec.dense_grad_elems):
        raise ValueError(f"layer {layer}: gradient partitions sum to {sum(parts)} elements, "
                         f"expected the layer's dense gradients, {spec.dense_grad_elems}")
    for k, n in enumerate(parts):
        if not n > 0:
            raise ValueError(f"layer {layer}: gradient partition sizes must be > 0 elements, got {n!r}")
        pid = f"B{layer}.ar{k}"
        g.add(pid, ALL_REDUCE, "inter", all_reduce_cost(costs, n), size=n, layer=layer, chunk=k,
              role="grad_sync", phase="backward")
        g.add_dep(src, pid)
    return tid


def _per_layer(x: int | Sequence[int], n: int, what: str) -> list[int]:
    xs = [x] * n if isinstance(x, int) else list(x)
    if len(xs) != n:
        raise ValueError(f"{what}: need one value per layer ({n}), got {len(xs)}")
    return [_check_r(v, what) for v in xs]


def build_layer_forward(spec: LayerSpec, costs: ClusterCosts, r: int, comm: str = "split", layer: int = 0) -> TaskGraph:
    """One layer's forward: attention then r MoE chunk chains."""
    g = TaskGraph(name=f"fwd L{layer} r={r}")
    add_layer_forward(g, spec, costs, r, layer, (), comm)
    return g


def build_layer_backward(spec: LayerSpec, costs: ClusterCosts, r: int, grad_partitions: Sequence[float] | None = None,
                         comm: str = "split", layer: int = 0, wgrad: bool = False) -> TaskGraph:
    """One layer's backward: r MoE chunk chains, attention backward, gradient slices."""
    g = TaskGraph(name=f"bwd L{layer} r={r}")
    add_layer_backward(g, spec, costs, r, layer, (), comm, grad_partitions, wgrad)
    return g


def build_stack_forward(specs: Sequence[LayerSpec], costs: ClusterCosts, r_fwd: int | Sequence[int],
                        comm: str = "split") -> TaskGraph:
    """Forward of a stack: layer l+1's attention waits for all of layer l's combine chunks."""
    rs = _per_layer(r_fwd, len(specs), "r_fwd")
    g = TaskGraph(name="forward")
    after: list[str] = []
    for l, (spec, r) in enumerate(zip(specs, rs)):
        after = add_layer_forward(g, spec, costs, r, l, after, comm)
    return g


def build_stack_backward(specs: Sequence[LayerSpec], costs: ClusterCosts, r_bwd: int | Sequence[int],
                         grad_partitions: Sequence[Sequence[float] | None] | None = None, comm: str = "split",
                         grad_sync: str = "partitions", after: Sequence[str] = (), g: TaskGraph | None = None,
                         wgrad: bool = False) -> TaskGraph:
    """Backward of a stack, walking the layers in reverse.

    ``grad_sync``: ``"partitions"`` (per-layer slices, free to overlap the
    backward of the layers below), ``"bucket"`` (one all-reduce of all dense
    gradients after the whole backward, as DeepSpeed and Tutel run it) or
    ``"none"``. ``wgrad``: split weight gradients off the backward chain
    (see :func:`add_layer_backward`).
    """
    if grad_sync not in GRAD_SYNC_MODES:
        raise ValueError(f"grad_sync must be one of {GRAD_SYNC_MODES}, got {grad_sync!r}")
    n = len(specs)
    rs = _per_layer(r_bwd, n, "r_bwd")
    parts = list(grad_partitions) if grad_partitions is not None else [None] * n
    if len(parts) != n:
        raise ValueError(f"grad_partitions: need one entry per layer ({n}), got {len(parts)}")
    if g is None:
        g = TaskGraph(name="backward")
    prev = list(after)
    for l in reversed(range(n)):
        p = parts[l] if grad_sync == "partitions" else []
        prev = [add_layer_backward(g, specs[l], costs, rs[l], l, prev, comm, p, wgrad)]
    if grad_sync == "bucket":
        total = sum(s.dense_grad_elems for s in specs)
        g.add("B.bucket", ALL_REDUCE, "inter", all_reduce_cost(costs, total), size=total, layer=0,
              role="grad_sync", phase="backward")
        g.add_dep(prev[0], "B.bucket")
        if wgrad:
            for l in range(n):
                g.add_dep(f"B{l}.attn_w", "B.bucket")
    return g


def build_step(specs: Sequence[LayerSpec], costs: ClusterCosts, r_fwd: int | Sequence[int], r_bwd: int | Sequence[int],
               grad_partitions: Sequence[Sequence[float] | None] | None = None, comm: str = "split",
               grad_sync: str = "partitions", wgrad: bool = False) -> TaskGraph:
    """A whole training step: forward of the stack, a zero-time ``loss`` task, backward of the stack."""
    g = build_stack_forward(specs, costs, r_fwd, comm)
    g.name = "step"
    exits = [t for t in g.tasks if not g.succs(t)]
    g.add("loss", "loss", "compute", 0.0, layer=len(specs) - 1, role="loss", phase="forward")
    for u in exits:
        g.add_dep(u, "loss")
    build_stack_backward(specs, costs, r_bwd, grad_partitions, comm, grad_sync, after=["loss"], g=g, wgrad=wgrad)
    return g


def equal_partitions(total: float, parts: int) -> list[float]:
    """``total`` elements split into ``parts`` equal slices."""
    _check_r(parts, "number of gradient partitions")
    return [total / parts] * parts

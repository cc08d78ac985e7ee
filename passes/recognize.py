"""Find Mixture-of-Experts regions in the forward and backward ATen graphs of aot_autograd.

A region is found from anchors every MoE implementation has, never from module
or parameter names:

* a routing score (softmax / sigmoid / cosine similarity) over a
  ``[tokens, experts]`` matrix and the ``topk`` that picks experts for each
  token (``argmax`` for top-1; or tokens for each expert, "expert choice");
* a permutation of token data by the routing result (one-hot/einsum with a
  capacity, sort + ``index_select``/``gather``, scatter, a per-expert loop of
  ``index``/``index_add_``), bracketed by ``all_to_all_single`` + ``wait_tensor``
  pairs under expert parallelism;
* the experts' matmuls: a matmul of permuted token data with a weight that does
  not depend on the tokens (one ``mm`` per expert, ``bmm`` over an expert
  dimension, or ``_grouped_mm`` with offsets);
* the combine, where expert outputs meet the routing weights again and are
  scattered back to token order.

In the forward graph every node downstream of a ``topk`` is given one of four
states, in graph (topological) order: routing metadata (R), dispatched token
data (D), expert-side data (E, after an expert matmul) and combined data (C,
once expert data meets routing data). Combined data only flows on through ops a
combine is made of, and no state flows into another router or into a residual
(a tensor computed before the router input), which bounds each region. A topk
that yields no expert matmul, no combine or a single dense lane is not MoE.

Soft routing (SoftMoE) has no topk; its anchor is a softmax over the token
dimension of ``[tokens, experts, slots]`` scores, and the same states follow.

In the backward graph the anchor is the gradient of ``topk`` (a ``scatter`` into
a ``[tokens, experts]`` zero tensor at the saved topk indices, which are inputs
of the backward graph), followed by the softmax/sigmoid backward; for soft
routing it is the combine softmax's backward, and for argmax routers (no topk
gradient) the score softmax/sigmoid backward itself. The dominator of the anchor that
also leads to matmuls elsewhere is the fork where the layer's output gradient
splits into the gate gradient and the experts' gradient. Walking on from the
fork, gradient nodes are F (forked, still in token order), P (permuted into
expert space by saved indices, an all-to-all or the combine matmul), G (after
an expert matmul: the transposed expert matmuls and the weight gradients) and U
(un-permuted to token order: the dispatch's gradient). A node that meets any
other gradient (the router's, a shared expert's, a residual) ends the walk.
Saved-tensor names tie a backward region to its forward layer when the forward
regions are at hand.

Sizes are compared as sympy expressions when they are symbolic, so graphs
compiled with dynamic shapes are recognised too (the sizes reported are then
None). What the recogniser does not understand (an opaque custom op, a topk
that is not followed by expert matmuls) it leaves out of every region.

``find_moe_regions`` only reads the graph; ``recognize`` is the pass that stores
the regions on the pass context and tags region nodes with
``node.meta["fsmoe"] = {"role": ..., "layer": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from fsmoe_compiler.passes.graph_utils import (
    ALL_TO_ALL_OPS,
    ARGMAX_OPS,
    COLLECTIVE_OPS,
    GATHER_OPS,
    GROUPED_MM_OPS,
    MATMUL_OPS,
    NORM_OPS,
    SCATTER_OPS,
    SIGMOID_BACKWARD_OPS,
    SIGMOID_OPS,
    SOFTMAX_BACKWARD_OPS,
    SOFTMAX_OPS,
    TOPK_OPS,
    VIEW_OPS,
    WAIT_OPS,
    ancestors_of_set,
    in_order,
    is_getitem,
    is_op,
    is_tensor,
    matmul_operands,
    nbytes,
    numel,
    overloads,
    prod_key,
    shape,
    shape_keys,
    static_int,
    tensor_inputs,
    to_digraph,
)

aten = torch.ops.aten

ROLES = ("router", "dispatch", "expert", "combine", "shared_expert")

# Ops whose result takes only a shape, dtype and device from their tensor input: they carry no data.
_ALLOC_OPS = overloads(
    aten.new_zeros, aten.new_empty, aten.new_full, aten.new_ones, aten.zeros_like, aten.empty_like, aten.ones_like,
    aten.full_like, aten.sym_size, aten.sym_numel, aten.sym_stride,
)

# Ops that combined (C) data may flow through and still be part of the combine:
# un-permuting, weighting, summing over the k choices, reshaping, communication.
_COMBINE_OPS = (
    VIEW_OPS
    | SCATTER_OPS
    | GATHER_OPS
    | COLLECTIVE_OPS  # all-to-all, and the all-gather / reduce-scatter of expert sharding
    | WAIT_OPS
    | overloads(
        aten.add, aten.sub, aten.mul, aten.div, aten.sum, aten.cat, aten.stack, aten.where, aten.masked_fill,
        aten.new_zeros, aten.zeros_like, aten.index_copy, aten.copy, aten.copy_, aten.fill, aten.neg,
        aten.masked_scatter, aten.new_empty, aten.empty_like,
    )
)


@dataclass
class MoERegion:
    """One MoE layer as found in one ATen graph.

    ``nodes`` maps each role ("router", "dispatch", "expert", "combine",
    "shared_expert") to node names in graph order; ``all_to_all`` names the
    ``all_to_all_single`` nodes of the region and ``a2a_bytes`` sums the bytes
    this rank sends through them (None when a size is symbolic). Sizes are None
    when they cannot be read from the graph. ``capacity`` is None for dropless
    dispatch.
    """

    layer: int
    graph: str
    router: str
    num_experts: int | None = None
    top_k: int | None = None
    capacity: int | None = None
    dropless: bool = True
    tokens: int | None = None
    hidden: int | None = None
    ffn_hidden: int | None = None
    nodes: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in ROLES})
    all_to_all: list[str] = field(default_factory=list)
    a2a_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def role_of(self, name: str) -> str | None:
        """The role of node ``name`` in this region, or None."""
        for role, names in self.nodes.items():
            if name in names:
                return role
        return None


# ----------------------------------------------------------------------------------------------
# public entry points


def find_moe_regions(
    gm: fx.GraphModule, graph: str = "forward", forward_regions: list[MoERegion] | None = None
) -> list[MoERegion]:
    """All MoE regions of ``gm``, a forward or backward ATen graph of aot_autograd; reads only.

    Regions come in layer order: forward regions in order of appearance;
    backward regions carry the index of the forward layer they belong to
    (backward runs the layers in reverse, so the first region found in a
    backward graph of L layers is layer L-1). Given the forward graph's
    regions, a backward region takes the layer of the forward region whose
    saved topk indices it reads, which also holds when some forward layer was
    not found.
    """
    if graph not in ("forward", "backward"):
        raise ValueError(f"graph must be 'forward' or 'backward', got {graph!r}")
    if graph == "backward":
        return _find_backward(gm, forward_regions)
    return _find_forward(gm)


def recognize(gm: fx.GraphModule, ctx: Any) -> fx.GraphModule:
    """The recognition pass: store regions on ``ctx.regions[ctx.graph_kind]`` and tag region nodes.

    Writes ``node.meta["fsmoe"]["role"]`` and ``["layer"]`` for every node of
    every region; changes nothing else in the graph.
    """
    kind = getattr(ctx, "graph_kind", "forward")
    regions = find_moe_regions(gm, kind, ctx.regions.get("forward") if kind == "backward" else None)
    ctx.regions[kind] = regions
    by_name = {n.name: n for n in gm.graph.nodes}
    for region in regions:
        for role in ROLES:
            for name in region.nodes.get(role, []):
                node = by_name.get(name)
                if node is None:
                    continue
                tag = node.meta.setdefault("fsmoe", {})
                tag.setdefault("role", role)
                tag.setdefault("layer", region.layer)
        ctx.notes.append(
            f"{kind}: MoE layer {region.layer}: {region.router}, experts={region.num_experts}, "
            f"top_k={region.top_k}, capacity={region.capacity}, all_to_all={len(region.all_to_all)}"
            + (f" ({'; '.join(region.notes)})" if region.notes else "")
        )
    if not regions:
        ctx.notes.append(f"{kind}: no MoE region found")
    return gm


# ----------------------------------------------------------------------------------------------
# forward

R, D, E, C = "R", "D", "E", "C"  # routing metadata, dispatched tokens, expert side, combined


@dataclass
class _Router:
    """What the walk up from a topk found: the gate matmul, score ops, and the router's token input."""

    topk: fx.Node
    gate: fx.Node
    x: fx.Node
    score_ops: list[str]
    cosine: bool


def _primary_input(node: fx.Node) -> fx.Node | None:
    """The input a score-like op is mostly a function of: the first tensor input of the same shape, else the largest."""
    ins = tensor_inputs(node)
    if not ins:
        return None
    same = [a for a in ins if shape(a) == shape(node)]
    if same:
        return same[0]
    return max(ins, key=lambda a: numel(a) or 0)


def _has_norm_near(node: fx.Node, depth: int = 5) -> bool:
    """A vector norm within ``depth`` producers of ``node`` (an L2-normalised operand)."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if is_op(n, NORM_OPS):
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


def _selects(node: fx.Node) -> bool:
    """A discrete choice over a score matrix: ``topk``, or ``argmax``/``max`` along a dimension (top-1)."""
    if is_op(node, TOPK_OPS):
        return True
    if is_op(node, ARGMAX_OPS):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dim, int) and len(shape(node.args[0]) or ()) >= 2
    return False


def _walk_router(topk: fx.Node, anc_topk: set[str]) -> _Router | None:
    """From a topk (or a soft router's token softmax) up through the score ops to the gate matmul and on to
    the router's token input."""
    cur = topk.args[0] if _selects(topk) else topk
    ops: list[str] = []
    gate = None
    for _ in range(40):
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return None
        if is_op(cur, MATMUL_OPS):
            gate = cur
            break
        if is_op(cur, SOFTMAX_OPS):
            ops.append("softmax")
        elif is_op(cur, SIGMOID_OPS):
            ops.append("sigmoid")
        cur = _primary_input(cur)
    if gate is None:
        return None
    left, right = matmul_operands(gate)
    cosine = _has_norm_near(left) and _has_norm_near(right)
    # the token operand is the left one of tokens @ weight; walk up to the first node also used outside the router
    cur = left
    for _ in range(60):
        # (the output node is no consumer here: aot_autograd returns tensors saved for backward through it)
        if cur.op != "call_function" or any(
            u.name not in anc_topk and u is not topk and u.op != "output" for u in cur.users
        ):
            break
        if is_op(cur, MATMUL_OPS):
            cur = matmul_operands(cur)[0]
            continue
        nxt = _primary_input(cur)
        if nxt is None:
            break
        cur = nxt
    return _Router(topk=topk, gate=gate, x=cur, score_ops=ops, cosine=cosine)


def _find_forward(gm: fx.GraphModule) -> list[MoERegion]:
    graph = gm.graph
    dg = to_digraph(graph)
    topks = [n for n in graph.nodes if _selects(n)]
    routers: dict[str, _Router] = {}
    anc: dict[str, set[str]] = {}
    for t in topks:
        anc[t.name] = nx.ancestors(dg, t.name)
        r = _walk_router(t, anc[t.name])
        if r is not None:
            routers[t.name] = r
    # soft routing (SoftMoE): a softmax over the token dimension of [tokens, experts, slots] scores
    before_topk = set().union(*anc.values()) if anc else set()
    for n in graph.nodes:
        if not is_op(n, SOFTMAX_OPS) or n.name in before_topk or len(shape(n) or ()) < 2:
            continue
        if (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) % len(shape(n)) != 0:
            continue
        anc[n.name] = nx.ancestors(dg, n.name)
        r = _walk_router(n, anc[n.name])
        x_keys = shape_keys(r.x) if r is not None else None
        if x_keys and prod_key(x_keys[:-1]) == (shape_keys(n) or (None,))[0]:  # softmax over the router's tokens
            routers[n.name] = r
            topks.append(n)
    # several topks behind one router input (e.g. group-limited routing): the last one routes
    last_for_x: dict[str, str] = {}
    for t in topks:
        if t.name in routers:
            last_for_x[routers[t.name].x.name] = t.name
    candidates = [routers[name] for name in last_for_x.values()]
    pos = _position(graph)
    candidates.sort(key=lambda r: pos[r.topk.name])

    regions: list[MoERegion] = []
    for r in candidates:
        blocked: set[str] = set()
        for other in candidates:
            if other is r:
                continue
            blocked |= (anc[other.topk.name] - nx.ancestors(dg, other.x.name)) | {other.x.name, other.topk.name}
        region = _forward_region(gm, dg, r, anc[r.topk.name], blocked)
        if region is not None:
            region.layer = len(regions)
            regions.append(region)
    return regions


def _position(graph: fx.Graph) -> dict[str, int]:
    """Each node's index in graph (topological) order."""
    return {n.name: i for i, n in enumerate(graph.nodes)}


def _classify_operand(a: fx.Node, state: dict[str, str], x: fx.Node, anc_t: set[str], desc_x: set[str],
                      anc_x: set[str], desc_gate: set[str]) -> str:
    """The category of one input of a node: its state, or router / token / outside / const."""
    if a.name in state:
        return state[a.name]
    if a is x:
        return "token"
    if a.name in anc_x:
        return "outside"
    if a.name in anc_t or a.name in desc_gate:
        return "router"
    if a.name in desc_x:
        return "token"
    return "const"


def _forward_region(gm: fx.GraphModule, dg: nx.DiGraph, r: _Router, anc_t: set[str],
                    blocked: set[str]) -> MoERegion | None:
    """Propagate R/D/E/C states below one router's topk; a region if it has experts and a combine."""
    graph = gm.graph
    t, x = r.topk, r.x
    # x and the tensors it is only a view of (e.g. [B, S, M] before the reshape to [T, M]) are the tokens
    x_views = _view_chain(x)
    desc_x = set().union(*(nx.descendants(dg, v.name) for v in x_views)) | {v.name for v in x_views}
    anc_x = nx.ancestors(dg, x_views[-1].name)
    desc_gate = nx.descendants(dg, r.gate.name)
    state: dict[str, str] = {t.name: R}
    opaque: list[str] = []  # ops outside ATen that the combine runs into: the region stops before them
    expert_mms: list[fx.Node] = []
    depth: dict[str, int] = {}  # expert matmuls on the way to an E node
    started = False
    for n in graph.nodes:
        if n is t:
            started = True
            continue
        if not started or n.op != "call_function" or n.name in blocked or n.target in _ALLOC_OPS:
            continue
        ins = n.all_input_nodes
        if not any(a.name in state for a in ins):
            continue
        tins = [a for a in ins if is_tensor(a)]
        cats = {a.name: _classify_operand(a, state, x, anc_t, desc_x, anc_x, desc_gate) for a in tins}
        kinds = set(cats.values())
        if "outside" in kinds:
            continue  # a residual or another earlier activation: the region ends before this node
        if is_getitem(n) and n.args[0].name in state:
            src = n.args[0]
            state[n.name] = state[src.name]
            depth[n.name] = depth.get(src.name, 0)
            continue
        d_in = max((depth.get(a.name, 0) for a in ins), default=0)
        new: str | None
        if C in kinds:
            if n.target in _COMBINE_OPS or (is_op(n, MATMUL_OPS) and R in kinds):
                new = C
            else:
                new = None
                if _is_opaque(n):
                    opaque.append(str(n.target))
        elif is_op(n, MATMUL_OPS):
            a, b = matmul_operands(n) or (None, None)
            ca, cb = cats.get(a.name) if a else None, cats.get(b.name) if b else None
            if (ca in (D, E) and cb == "const") or (cb in (D, E) and ca == "const"):
                new = E
                expert_mms.append(n)
                depth[n.name] = d_in + 1
            elif E in kinds and (R in kinds or "router" in kinds):
                new = C
            elif E in kinds:
                new = E
            elif D in kinds or "token" in kinds:
                new = D
            else:
                new = R
        elif E in kinds and (R in kinds or "router" in kinds):
            new = C  # expert output meets routing weights: the combine
        elif E in kinds and is_op(n, ALL_TO_ALL_OPS):
            new = C  # expert output sent back to the tokens' ranks: the combine all-to-all
        elif E in kinds:
            new = E
        elif D in kinds or "token" in kinds:
            new = D
        else:
            new = R
        if new is None:
            continue
        state[n.name] = new
        if new in (E, C) and n.name not in depth:
            depth[n.name] = d_in
    region = _summarise_forward(gm, dg, r, anc_t, desc_x, anc_x, state, expert_mms, depth)
    if region is not None and opaque:
        region.notes.append(f"combine stops before opaque op(s) {sorted(set(opaque))}: left alone")
    return region


def _summarise_forward(gm, dg, r: _Router, anc_t, desc_x, anc_x, state, expert_mms, depth) -> MoERegion | None:
    graph = gm.graph
    t, x = r.topk, r.x
    by_name = {n.name: n for n in graph.nodes}
    of = {s: [name for name, st in state.items() if st == s] for s in (R, D, E, C)}
    if not expert_mms or not of[C] or not of[D]:
        return None
    a2a = [n for n in of[D] + of[E] + of[C] + of[R] if is_op(by_name[n], ALL_TO_ALL_OPS)]

    # expert lanes: distinct dispatched inputs of the first expert matmuls, or an expert dimension on batched weights
    first = [m for m in expert_mms if depth[m.name] == 1]
    last_depth = max(depth[m.name] for m in expert_mms)
    last = [m for m in expert_mms if depth[m.name] == last_depth]
    lanes = len({_token_operand(m, state).name for m in first})
    batched = [m for m in expert_mms if is_op(m, GROUPED_MM_OPS) or len(shape(_weight_operand(m, state)) or ()) == 3]
    if lanes < 2 and not batched and not a2a:
        return None  # one dense lane on top-k-selected rows (e.g. top-k pooling): not a mixture of experts

    x_shape = shape(x)
    hidden = x_shape[-1] if x_shape else None
    x_keys = shape_keys(x) or ()
    tokens_key = prod_key(x_keys[:-1]) if x_keys else None
    tokens = static_int(tokens_key) if isinstance(tokens_key, int) else None
    soft = not _selects(t)
    score = t.args[0]
    s_shape = shape(score) or ()
    s_keys = shape_keys(score) or ()
    notes: list[str] = []
    expert_choice = False
    num_experts = None
    k = None
    if soft:  # scores [tokens, experts, slots]
        num_experts = s_shape[1] if len(s_shape) > 1 else None
    elif s_shape:
        if is_op(t, TOPK_OPS):
            dim = t.args[2] if len(t.args) > 2 else t.kwargs.get("dim", -1)
            k = t.args[1] if isinstance(t.args[1], int) else None
        else:  # argmax / max over a dimension: top-1
            dim, k = t.args[1] if len(t.args) > 1 else t.kwargs.get("dim"), 1
        dim = dim % len(s_shape)
        rest = prod_key(d for i, d in enumerate(s_keys) if i != dim)
        if tokens_key is not None and s_keys[dim] == tokens_key and rest != tokens_key:
            expert_choice = True  # topk over the token dimension: each expert picks its tokens
            num_experts = rest if isinstance(rest, int) else None
        else:
            num_experts = s_shape[dim]
    if soft:
        router = "soft"
    elif r.cosine:
        router = "cosine-topk"
    elif expert_choice:
        router = "expert-choice"
    elif "sigmoid" in r.score_ops:
        router = "sigmoid-topk"
    elif "softmax" in r.score_ops:
        router = "softmax-topk"
    elif _softmax_after(t):
        router = "softmax-topk"
        notes.append("softmax over the top-k logits")
    else:
        router = "topk"

    capacity = None
    buffer = False  # a fixed-capacity [E, C, M] expert buffer exists (its C may be symbolic)
    if expert_choice:
        capacity, buffer = k, True
    elif soft:  # every expert has its slots per expert, always full
        capacity = static_int(s_keys[2]) if len(s_keys) == 3 else None
        buffer = True
    else:
        for name in in_order(of[D], graph):
            sk = shape_keys(by_name[name])
            if sk and len(sk) == 3 and sk[0] == num_experts and sk[2] == hidden:
                capacity, buffer = static_int(sk[1]) if isinstance(sk[1], int) else None, True
                break
    dropless = not buffer
    if buffer and capacity is None:
        notes.append("capacity is symbolic (dynamic shapes)")
    if dropless:
        notes.append("dropless: tokens per expert are data-dependent" if _has_unbacked(of[D] + of[E], by_name)
                     else "dropless: no fixed-capacity expert buffer")
    ffn_hidden = None
    lt = _token_operand(last[0], state)
    lt_shape = shape(lt)
    if lt_shape:
        ffn_hidden = lt_shape[-1]

    shared = _shared_expert_nodes(dg, by_name, state, of, x, anc_t, desc_x)
    x_views = {v.name for v in _view_chain(x)}
    router_nodes = {n for n in anc_t - anc_x - x_views if by_name[n].op == "call_function"} | set(of[R])
    nodes = {
        "router": in_order(router_nodes - set(shared), graph),
        "dispatch": in_order(of[D], graph),
        "expert": in_order(of[E], graph),
        "combine": in_order(of[C], graph),
        "shared_expert": in_order(shared, graph),
    }
    nodes["router"] = in_order(set(nodes["router"]) | {t.name}, graph)
    a2a = in_order(a2a, graph)
    a2a_bytes: int | None = 0
    for name in a2a:
        b = nbytes(by_name[name].args[0])
        a2a_bytes = None if (b is None or a2a_bytes is None) else a2a_bytes + b
    if not a2a:
        a2a_bytes = None
    if lanes >= 2:
        notes.append(f"{lanes} expert lanes (one matmul chain per local expert)")
    return MoERegion(
        layer=0,
        graph="forward",
        router=router,
        num_experts=num_experts,
        top_k=None if expert_choice else k,
        capacity=capacity,
        dropless=dropless,
        tokens=tokens,
        hidden=hidden,
        ffn_hidden=ffn_hidden,
        nodes=nodes,
        all_to_all=a2a,
        a2a_bytes=a2a_bytes,
        notes=notes,
    )


def _view_chain(x: fx.Node) -> list[fx.Node]:
    """``x`` and the tensors it is a view of, nearest first (``[T, M]`` back to ``[B, S, M]``)."""
    chain = [x]
    while chain[-1].target in VIEW_OPS and len(tensor_inputs(chain[-1])) == 1:
        chain.append(tensor_inputs(chain[-1])[0])
    return chain


def _is_opaque(node: fx.Node) -> bool:
    """A call into an op that is not ATen, prims or a functional collective (e.g. a library's custom kernel)."""
    name = getattr(node.target, "namespace", None)
    return node.op == "call_function" and name is not None and name not in ("aten", "prims", "_c10d_functional")


def _token_operand(m: fx.Node, state: dict[str, str]) -> fx.Node:
    a, b = matmul_operands(m)
    return a if a.name in state else b


def _weight_operand(m: fx.Node, state: dict[str, str]) -> fx.Node:
    a, b = matmul_operands(m)
    return b if a.name in state else a


def _softmax_after(t: fx.Node) -> bool:
    for u in t.users:
        if is_getitem(u) and u.args[1] == 0:
            frontier = list(u.users)
            for _ in range(3):
                if any(is_op(n, SOFTMAX_OPS) for n in frontier):
                    return True
                frontier = [v for n in frontier for v in n.users]
    return False


def _has_unbacked(names, by_name) -> bool:
    for name in names:
        v = by_name[name].meta.get("val")
        if isinstance(v, torch.Tensor) and any(not isinstance(s, int) for s in v.shape):
            return True
    return False


def _shared_expert_nodes(dg, by_name, state, of, x, anc_t, desc_x) -> set[str]:
    """Nodes of a dense expert on the router input whose output is added into the combine."""
    merged_in: list[str] = []
    for name in of[C]:
        for a in by_name[name].all_input_nodes:
            if a.name not in state and a.name in desc_x and a.name not in anc_t and is_tensor(a):
                merged_in.append(a.name)
    if not merged_in:
        return set()
    routed_roots = ancestors_of_set(dg, of[D])
    shared: set[str] = set()
    for out in merged_in:
        cand = (nx.ancestors(dg, out) | {out}) & desc_x
        cand = {n for n in cand if n not in anc_t and n not in routed_roots and n not in state
                and by_name[n].op == "call_function"}
        if any(is_op(by_name[n], MATMUL_OPS) for n in cand):
            shared |= cand
    return shared


# ----------------------------------------------------------------------------------------------
# backward
#
# States of gradient nodes below a layer's combine fork: F (forked, still in token order), P (gradient
# permuted into expert space, before any expert matmul), G (expert-side gradient, after one), U (gradient
# un-permuted back to token order: the gradient of the dispatch).
F, P, G, U = "F", "P", "G", "U"
_RANK = {F: 0, P: 1, G: 2, U: 3}


def _is_tangent(node: fx.Node) -> bool:
    return node.op == "placeholder" and node.name.startswith("tangents")


def _saved_index(node: fx.Node, grad: set[str]) -> bool:
    """An integer tensor that does not depend on the incoming gradient: saved (or recomputed) routing indices."""
    v = node.meta.get("val")
    return (
        isinstance(v, torch.Tensor)
        and not v.dtype.is_floating_point
        and v.dtype is not torch.bool
        and node.name not in grad
    )


def _soft_backward_anchors(graph: fx.Graph, grad: set[str]) -> list[fx.Node]:
    """Backward of a softmax over the last dim whose gradient is one half of a matmul pair on one gradient.

    That is the gradient of soft combine weights (``out = combine @ expert_out``:
    one matmul computes the combine weights' gradient, its sibling on the same
    incoming gradient sends it to the experts). Attention's softmax has the same
    shape of backward; it is told apart later, as it reaches no expert matmuls.
    """
    anchors = []
    for n in graph.nodes:
        if not is_op(n, SOFTMAX_BACKWARD_OPS) or n.name not in grad:
            continue
        sh = shape(n)
        if not sh or len(sh) != 2 or n.args[2] % len(sh) != len(sh) - 1:
            continue
        cur = n.args[0]
        for _ in range(10):
            if not isinstance(cur, fx.Node) or not (cur.target in VIEW_OPS or is_op(cur, MATMUL_OPS)):
                cur = None
                break
            if is_op(cur, MATMUL_OPS):
                break
            gins = [a for a in cur.all_input_nodes if a.name in grad]
            cur = gins[0] if len(gins) == 1 else None
            if cur is None:
                break
        if cur is None or not is_op(cur, MATMUL_OPS):
            continue
        g_op = _grad_operand(cur, grad)
        if any(u is not cur and is_op(u, MATMUL_OPS) for u in g_op.users):
            anchors.append(n)
    return anchors


def _soft_dispatch_weight_backward(graph, by_name, pos, grad, s, dispatch_weight_grads, router_bwd, taken) -> set[str]:
    """Router work of soft routing's backward besides the combine softmax's: the dispatch weights' gradient.

    That is each ``gradient @ tokens^T`` matmul, the token-softmax backward below
    it, and, where it meets the combine softmax's gradient, on to the gate's
    matmuls, up to where other gradients join.
    """
    out = set(router_bwd) | {m.name for m in dispatch_weight_grads}
    for m in dispatch_weight_grads:
        out |= _until_join(by_name, grad, m, taken)
    limit = min((d for d in (shape(s) or ()) if d is not None), default=2)
    for n in graph.nodes:
        if n.name in out or n.name not in grad or n.op != "call_function" or pos[n.name] < pos[s.name]:
            continue
        gins = [a for a in n.all_input_nodes if a.name in grad]
        if any(a.name in out for a in gins) and all(a.name in out or _small_gradient(a, limit, grad) for a in gins):
            out.add(n.name)
    return out


def _score_backward_anchors(dg: nx.DiGraph, graph: fx.Graph, grad: set[str], known: list[fx.Node]) -> list[fx.Node]:
    """Softmax/sigmoid gradients of ``[tokens, experts]`` scores unrelated to any topk gradient.

    A router that picks with ``argmax`` (DeepSpeed's top-1) leaves no topk
    gradient: the gates' gradient reaches the score backward through the
    one-hot mask instead. Gates of width 1 (a shared expert's) are not scores.
    """
    known_names = {n.name for n in known}
    out = []
    for n in graph.nodes:
        if n.name not in grad or n.name in known_names:
            continue
        sh = shape(n)
        if not sh or len(sh) != 2 or not sh[-1] or sh[-1] < 2:
            continue
        if is_op(n, SOFTMAX_BACKWARD_OPS):
            if n.args[2] % 2 != 1:
                continue
        elif not is_op(n, SIGMOID_BACKWARD_OPS):
            continue
        if known_names & (nx.ancestors(dg, n.name) | nx.descendants(dg, n.name)):
            continue  # part of a topk router (e.g. a softmax over the top-k logits) or of a soft one
        out.append(n)
    return out


def _until_join(by_name, grad: set[str], start: fx.Node, stop: set[str]) -> set[str]:
    """Gradient nodes fed only by ``start`` and each other, in graph order: a branch up to where it meets others."""
    out = {start.name}
    frontier = list(start.users)
    while frontier:
        n = frontier.pop(0)
        if n.name in out or n.name in stop or n.name not in grad or n.op != "call_function":
            continue
        if any(a.name in grad and a.name not in out for a in n.all_input_nodes):
            continue
        out.add(n.name)
        frontier.extend(n.users)
    return out


def _gradient_nodes(graph: fx.Graph) -> set[str]:
    """Nodes whose value depends on an incoming gradient (a ``tangents_*`` input of the backward graph).

    Allocations that only borrow a gradient's shape (``new_zeros``) and sizes
    read off it (``sym_size``) carry no gradient and are left out.
    """
    grad: set[str] = set()
    for n in graph.nodes:
        if _is_tangent(n):
            grad.add(n.name)
        elif n.op == "call_function" and n.target not in _ALLOC_OPS:
            v = n.meta.get("val")
            if isinstance(v, (torch.SymInt, int, float, bool)):
                continue
            if any(a.name in grad for a in n.all_input_nodes):
                grad.add(n.name)
    return grad


def _topk_backward_anchors(graph: fx.Graph, grad: set[str]) -> list[fx.Node]:
    """Gradients of topk: a scatter of a gradient into a zero [tokens, experts] tensor at saved integer indices."""
    anchors = []
    for n in graph.nodes:
        if not is_op(n, overloads(aten.scatter, aten.scatter_add)) or n.name not in grad:
            continue
        base, index = n.args[0], n.args[2]
        if not (isinstance(base, fx.Node) and isinstance(index, fx.Node)):
            continue
        if base.name in grad and not is_op(base, overloads(aten.new_zeros, aten.zeros, aten.zeros_like, aten.full)):
            continue
        if not _saved_index(index, grad):
            continue
        if len(shape(n) or ()) != 2:
            continue
        anchors.append(n)
    return anchors


def _permutes(node: fx.Node, grad: set[str]) -> bool:
    """An indexing op that moves gradient rows by saved routing indices, or an all-to-all.

    Gathers (``index_select``, ``gather``, ``index``) always count; scatters
    (``index_add``, ``index_put``, ``scatter_add``) count when given an
    integer index that does not depend on the gradient.
    """
    if is_op(node, ALL_TO_ALL_OPS):
        return True
    if node.target not in GATHER_OPS and not is_op(node, SCATTER_OPS):
        return False
    return any(_saved_index(a, grad) for a in node.all_input_nodes)


def _permuted_above(node: fx.Node, grad: set[str]) -> bool:
    """``node`` is, or is a view of, a gradient permuted by saved routing indices."""
    cur = node
    for _ in range(8):
        if _permutes(cur, grad):
            return True
        gins = [a for a in cur.all_input_nodes if a.name in grad]
        if cur.target not in VIEW_OPS or len(gins) != 1:
            return False
        cur = gins[0]
    return False


def _has_dim(node: fx.Node, size: object, anywhere: bool = False) -> bool:
    """``size`` (an int or a symbolic size) is a leading (non-feature) dimension of ``node``: a token dimension.

    With ``anywhere`` the last dimension counts too.
    """
    s = shape_keys(node)
    dims = (s or ()) if anywhere else (s or ())[:-1]
    return size is not None and any(d == size for d in dims)


def _find_backward(gm: fx.GraphModule, forward_regions: list[MoERegion] | None = None) -> list[MoERegion]:
    graph = gm.graph
    dg = to_digraph(graph)
    by_name = {n.name: n for n in graph.nodes}
    grad = _gradient_nodes(graph)
    pos = _position(graph)
    found: list[tuple[MoERegion, str | None]] = []
    seen: set[tuple] = set()
    topk_anchors = _topk_backward_anchors(graph, grad)
    soft_anchors = _soft_backward_anchors(graph, grad)
    kinds = {n.name: "topk" for n in topk_anchors}
    kinds.update({n.name: "soft" for n in soft_anchors})
    kinds.update({n.name: "score" for n in _score_backward_anchors(dg, graph, grad, topk_anchors + soft_anchors)})
    for name in sorted(kinds, key=pos.__getitem__):
        result = _backward_region(gm, dg, by_name, pos, grad, by_name[name], kinds[name])
        if result is None:
            continue
        key = tuple(result[0].nodes["expert"])  # anchors of one layer (group-limited routing) share experts
        if key not in seen:
            seen.add(key)
            found.append(result)
    regions = [r for r, _ in found]
    for i, r in enumerate(regions):  # backward runs the layers in reverse
        r.layer = len(regions) - 1 - i
    if forward_regions:
        _match_forward_layers(regions, [name for _, name in found], forward_regions)
    regions.sort(key=lambda r: r.layer)
    return regions


def _match_forward_layers(regions: list[MoERegion], saved: list[str | None],
                          forward_regions: list[MoERegion]) -> None:
    """Give each backward region the index of the forward layer whose saved topk indices it reads.

    aot_autograd names a saved tensor's backward input after its forward node,
    so the topk-indices input of the backward is a router node of one forward region.
    """
    for r, name in zip(regions, saved):
        for f in forward_regions:
            if name is not None and name in f.nodes.get("router", []):
                r.layer = f.layer
                if f.router not in (r.router, "unknown"):  # e.g. cosine scores look like softmax in backward
                    r.notes.append(f"router kind from the forward graph ({r.router} in backward)")
                    r.router = f.router
                break


def _idom_chain(dg: nx.DiGraph, target: str, keep: set[str]) -> list[str]:
    """Dominators of ``target`` (nearest first) in the subgraph ``keep`` entered from a virtual root."""
    sub = dg.subgraph(keep).copy()
    root = "__fsmoe_root__"
    sub.add_node(root)
    for n in keep:
        if sub.in_degree(n) == 0:
            sub.add_edge(root, n)
    idom = nx.immediate_dominators(sub, root)
    chain, cur = [], target
    while cur in idom and idom[cur] != cur:
        cur = idom[cur]
        if cur == root:
            break
        chain.append(cur)
    return chain


def _leads_to_matmul(dg: nx.DiGraph, start: str, by_name, avoid: set[str]) -> bool:
    return any(is_op(by_name[d], MATMUL_OPS) for d in ({start} | nx.descendants(dg, start)) if d not in avoid)


def _backward_region(gm, dg, by_name, pos, grad: set[str], s: fx.Node,
                     kind: str) -> tuple[MoERegion, str | None] | None:
    """The region around one anchor: ``kind`` "topk" (topk gradient), "soft" (soft combine softmax gradient)
    or "score" (the score softmax/sigmoid gradient of a router that picks with argmax)."""
    graph = gm.graph
    s_shape = shape(s)
    s_keys = shape_keys(s)
    soft = kind == "soft"
    if kind == "topk":
        dim, index = s.args[1] % 2, s.args[2]
    else:
        dim, index = 1, None
    anc_s = nx.ancestors(dg, s.name)
    desc_s = nx.descendants(dg, s.name)
    # the fork where the gradient splits into the gate-gradient path (to s) and the expert path;
    # gradients smaller than the score matrix's short side (an auxiliary loss's) do not count
    smallest = min((d for d in s_shape if d is not None), default=1)
    keep = {n for n in anc_s & grad if (numel(by_name[n]) or smallest) >= smallest} | {s.name}
    fork = None
    for d in _idom_chain(dg, s.name, keep):
        if _leads_to_matmul(dg, d, by_name, anc_s | desc_s):
            fork = by_name[d]
            break
    if fork is None:
        return None
    # the entry: the gradient of the layer output, and the views/permutations between it and the fork
    chain = [fork.name]
    for d in _idom_chain(dg, fork.name, grad | {fork.name}):
        node = by_name[d]
        if not (node.target in VIEW_OPS or node.target in GATHER_OPS or is_op(node, ALL_TO_ALL_OPS)
                or is_op(node, WAIT_OPS) or _is_tangent(node)):
            break
        chain.append(d)
        if len([u for u in node.users if u.name in grad]) > 1:
            break
    entry = by_name[chain[-1]]
    entry_keys = shape_keys(entry) or (None,)
    hidden = entry_keys[-1] if isinstance(entry_keys[-1], int) else None
    tokens = prod_key(entry_keys[:-1])  # an int, or a sympy expression under dynamic shapes
    # topk over experts scatters along the expert dimension; expert choice along the token dimension
    expert_choice = not soft and tokens is not None and s_keys[dim] == tokens and s_keys[1 - dim] != tokens
    if tokens is None:
        tokens = s_keys[1 - dim]
    num_experts = s_shape[1 - dim] if expert_choice else s_shape[dim]

    # walk the gradient forward from the fork in graph order
    state: dict[str, str] = {fork.name: P if _permuted_above(fork, grad) else F}
    expert_mms: list[fx.Node] = []
    dispatch_weight_grads: list[fx.Node] = []
    depth: dict[str, int] = {}
    started = False
    for n in graph.nodes:
        if n is fork:
            started = True
            continue
        if not started or n.op != "call_function" or n.name not in grad or n.name in desc_s or n is s:
            continue
        ins = [a for a in n.all_input_nodes if a.name in grad]
        if not ins or not any(a.name in state for a in ins):
            continue
        if any(a.name not in state for a in ins):
            continue  # meets another gradient (router, shared expert, residual): the region ends here
        rank = max(_RANK[state[a.name]] for a in ins)
        d_in = max((depth.get(a.name, 0) for a in ins), default=0)
        new: str | None
        if is_op(n, MATMUL_OPS):
            a, b = matmul_operands(n)
            g_op = a if a.name in grad else b
            other = b if g_op is a else a
            if rank == _RANK[F]:  # still in token order: a permutation into expert space if it leaves token order
                leaves = _has_dim(g_op, tokens) and not _has_dim(n, tokens)
                new = P if (leaves or _combine_matmul_pair(n, g_op, anc_s)) else None
            elif rank >= _RANK[G] and other.name not in grad and _has_dim(other, tokens) and _has_dim(n, tokens):
                new = U  # dispatch mask^T @ gradient: back to token order
            elif rank >= _RANK[G] and other.name not in grad and _has_dim(other, tokens, anywhere=True) \
                    and _has_dim(n, tokens, anywhere=True):
                dispatch_weight_grads.append(n)  # gradient @ tokens^T: the gradient of soft dispatch weights
                new = None
            elif rank == _RANK[U]:
                new = None
            else:
                new = G
                expert_mms.append(n)
                depth[n.name] = d_in + 1
        elif rank == _RANK[F]:
            if _permutes(n, grad):
                new = P
            elif n.target in _COMBINE_OPS:
                new = F
            else:
                new = None
        elif rank >= _RANK[G] and (_permutes(n, grad) or is_op(n, ALL_TO_ALL_OPS)):
            new = U  # indexed by the saved routing (or sent back by all-to-all): the gradient of the dispatch
        else:
            new = [F, P, G, U][rank]
        if new is None:
            continue
        state[n.name] = new
        depth.setdefault(n.name, d_in)
    # the forked gradient before the permutation is the combine's only where it leads to the experts
    feeds = ancestors_of_set(dg, [name for name, st in state.items() if st != F])
    for name in [n for n, st in state.items() if st == F and n not in feeds]:
        del state[name]
    combine = {n for n, st in state.items() if st == F}
    for name in combine:
        del state[name]
    if not expert_mms:
        return None
    first = [m for m in expert_mms if depth[m.name] == 1]
    lanes = len({_grad_operand(m, grad).name for m in first})
    batched = [m for m in expert_mms if is_op(m, GROUPED_MM_OPS) or len(shape(m) or ()) == 3]
    a2a = [n for n in state if is_op(by_name[n], ALL_TO_ALL_OPS)]
    if lanes < 2 and not batched and not a2a:
        return None
    # permuted gradient that only feeds the gate gradient belongs to the router's backward
    feeds_experts = ancestors_of_set(dg, [m.name for m in expert_mms])
    for name in [n for n in state if n in anc_s and n not in feeds_experts]:
        del state[name]

    of = {st: [n for n, v in state.items() if v == st] for st in (P, G, U)}
    combine |= set(chain)
    combine = {c for c in combine if by_name[c].op == "call_function"}
    router_bwd = _router_backward_nodes(dg, by_name, pos, grad, s, anc_s, desc_s, fork) - set(state) - combine
    router_kind = "unknown"
    if kind == "score":
        router_bwd.add(s.name)
    if any(is_op(by_name[n], SOFTMAX_BACKWARD_OPS) for n in router_bwd):
        router_kind = "softmax-topk"
    elif any(is_op(by_name[n], SIGMOID_BACKWARD_OPS) for n in router_bwd):
        router_kind = "sigmoid-topk"
    k = (shape(index) or (None, None))[dim] if index is not None else None
    if expert_choice:
        router_kind = "expert-choice"
    if soft:
        router_kind, num_experts = "soft", None
        for name in in_order(of[P], graph):  # the first [E, slots, M] gradient buffer (before any all-to-all)
            sk = shape_keys(by_name[name])
            if sk and len(sk) == 3 and sk[2] == hidden and isinstance(sk[0], int) and sk[0] > 1:
                num_experts = sk[0]
                break
        router_bwd |= _soft_dispatch_weight_backward(graph, by_name, pos, grad, s, dispatch_weight_grads,
                                                     router_bwd, set(state) | combine)
    capacity, buffer = None, False  # a fixed-capacity [E, C, M] gradient buffer (C may be symbolic)
    for name in in_order(of[P], graph):
        sk = shape_keys(by_name[name])
        if sk and len(sk) == 3 and sk[0] == num_experts and sk[2] == hidden:
            capacity, buffer = (sk[1] if isinstance(sk[1], int) else None), True
            break
    if expert_choice:
        capacity, buffer = k, True
    notes = []
    if buffer and capacity is None:
        notes.append("capacity is symbolic (dynamic shapes)")
    ffn_hidden = None
    for m in sorted(expert_mms, key=lambda m: pos[m.name]):
        g_op = _grad_operand(m, grad)
        gs, ms_ = shape(g_op), shape(m)
        if gs and ms_ and gs[-1] == hidden and ms_[-1] not in (hidden, None) and _rows_match(gs, ms_):
            ffn_hidden = ms_[-1]
            break
    shared = _shared_backward_nodes(graph, by_name, grad, set(chain), set(state) | combine | router_bwd)
    nodes = {
        "router": in_order(router_bwd, graph),
        "dispatch": in_order(of[U], graph),
        "expert": in_order(of[G], graph),
        "combine": in_order(combine | set(of[P]), graph),
        "shared_expert": in_order(shared, graph),
    }
    a2a = in_order(a2a, graph)
    a2a_bytes: int | None = 0 if a2a else None
    for name in a2a:
        b = nbytes(by_name[name].args[0])
        a2a_bytes = None if (b is None or a2a_bytes is None) else a2a_bytes + b
    if router_kind == "unknown":
        notes.append("no softmax/sigmoid backward after the topk gradient")
    saved = _saved_root(index) if index is not None else None
    return MoERegion(
        layer=0, graph="backward", router=router_kind, num_experts=num_experts,
        top_k=None if (expert_choice or soft) else k, capacity=capacity, dropless=not buffer,
        tokens=tokens if isinstance(tokens, int) else None, hidden=hidden, ffn_hidden=ffn_hidden, nodes=nodes, all_to_all=a2a,
        a2a_bytes=a2a_bytes, notes=notes,
    ), (saved.name if saved is not None else None)


def _combine_matmul_pair(n: fx.Node, g_op: fx.Node, anc_s: set[str]) -> bool:
    """``n`` is a bmm whose gradient input also feeds a bmm towards the gate gradient.

    The backward of ``out = combine_weights @ expert_out`` is such a pair: one
    bmm sends the gradient into expert space, its sibling computes the gradient
    of the combine weights, which flows into the router.
    """
    if not is_op(n, overloads(aten.bmm)):
        return False
    return any(u is not n and is_op(u, overloads(aten.bmm)) and u.name in anc_s for u in g_op.users)


def _rows_match(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and a[:-1] == b[:-1]


def _saved_root(node: fx.Node) -> fx.Node | None:
    """The backward input (a saved forward tensor) an index tensor is a view of."""
    cur = node
    for _ in range(10):
        if cur.op == "placeholder":
            return cur
        ins = tensor_inputs(cur)
        if cur.target not in VIEW_OPS or not ins:
            return None
        cur = ins[0]
    return None


def _grad_operand(m: fx.Node, grad: set[str]) -> fx.Node:
    a, b = matmul_operands(m)
    return a if a.name in grad else b


def _router_backward_nodes(dg, by_name, pos, grad, s, anc_s, desc_s, fork) -> set[str]:
    """The gradient of the gates from the fork to s, and everything below s up to where it meets other gradients."""
    upstream = (anc_s & grad) - nx.ancestors(dg, fork.name) - {fork.name}
    below = set()
    for n in sorted(desc_s, key=pos.__getitem__):
        node = by_name[n]
        if node.op != "call_function":
            continue
        gins = [a for a in node.all_input_nodes if a.name in grad]
        limit = min((d for d in (shape(s) or ()) if d is not None), default=2)
        ours = [a for a in gins if a.name in below or a.name == s.name or a.name in upstream]
        if not ours or any(a not in ours and not _small_gradient(a, limit, grad) for a in gins):
            continue
        below.add(n)
    return {n for n in upstream | below | {s.name} if by_name[n].op == "call_function"}


def _small_gradient(node: fx.Node, limit: int, grad: set[str]) -> bool:
    """A gradient that comes from a tensor of fewer than ``limit`` values (an auxiliary loss, a scalar)."""
    cur = node
    for _ in range(12):
        n = numel(cur)
        if n is not None and n < limit:
            return True
        gins = [a for a in cur.all_input_nodes if a.name in grad]
        if len(gins) != 1:
            return False
        cur = gins[0]
    return False


def _shared_backward_nodes(graph, by_name, grad, chain: set[str], taken: set[str]) -> set[str]:
    """Gradient nodes of a dense expert fed only by the layer's output gradient, up to where they meet other gradients.

    Connected pieces without a matmul (e.g. an auxiliary loss's gradient) are dropped.
    """
    branch: set[str] = set()
    for n in graph.nodes:
        if n.name not in grad or n.name in taken or n.name in chain or n.op != "call_function":
            continue
        gins = [a for a in n.all_input_nodes if a.name in grad]
        if gins and all(a.name in chain or a.name in branch for a in gins):
            branch.add(n.name)
    out: set[str] = set()
    sub = nx.Graph()
    sub.add_nodes_from(branch)
    for name in branch:
        for a in by_name[name].all_input_nodes:
            if a.name in branch:
                sub.add_edge(a.name, name)
    for comp in nx.connected_components(sub):
        if any(is_op(by_name[c], MATMUL_OPS) for c in comp):
            out |= comp
    return out

"""Find Mixture-of-Experts regions in the forward and backward ATen graphs of aot_autograd.

A region is found from anchors every MoE implementation has, never from module
or parameter names:

* a routing score (softmax / sigmoid / cosine similarity) over a
  ``[tokens, experts]`` matrix and the ``topk`` that picks experts for each
  token (or tokens for each expert, "expert choice");
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

In the backward graph the anchor is the gradient of ``topk`` (a ``scatter`` into
a ``[tokens, experts]`` zero tensor with the saved topk indices), followed by
the softmax/sigmoid backward. The saved routing tensors of the forward (indices,
masks, gates) are inputs of the backward graph; the gradient flowing through
them is permuted the same way, reversed. See ``_find_backward``.

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
    _overloads,
    in_order,
    is_getitem,
    is_op,
    is_tensor,
    matmul_operands,
    nbytes,
    numel,
    shape,
    tensor_inputs,
    to_digraph,
)

aten = torch.ops.aten

ROLES = ("router", "dispatch", "expert", "combine", "shared_expert")

# Ops that combined (C) data may flow through and still be part of the combine:
# un-permuting, weighting, summing over the k choices, reshaping, communication.
_COMBINE_OPS = (
    VIEW_OPS
    | SCATTER_OPS
    | GATHER_OPS
    | ALL_TO_ALL_OPS
    | WAIT_OPS
    | _overloads(
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


def find_moe_regions(gm: fx.GraphModule, graph: str = "forward") -> list[MoERegion]:
    """All MoE regions of ``gm``, a forward or backward ATen graph of aot_autograd; reads only.

    Regions come in layer order: forward regions in order of appearance;
    backward regions carry the index of the forward layer they belong to
    (backward runs the layers in reverse, so the first region found in a
    backward graph of L layers is layer L-1).
    """
    if graph not in ("forward", "backward"):
        raise ValueError(f"graph must be 'forward' or 'backward', got {graph!r}")
    if graph == "backward":
        return _find_backward(gm)
    return _find_forward(gm)


def recognize(gm: fx.GraphModule, ctx: Any) -> fx.GraphModule:
    """The recognition pass: store regions on ``ctx.regions[ctx.graph_kind]`` and tag region nodes.

    Writes ``node.meta["fsmoe"]["role"]`` and ``["layer"]`` for every node of
    every region; changes nothing else in the graph.
    """
    kind = getattr(ctx, "graph_kind", "forward")
    regions = find_moe_regions(gm, kind)
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


def _walk_router(topk: fx.Node, anc_topk: set[str]) -> _Router | None:
    """From a topk up through the score ops to the gate matmul and on to the router's token input."""
    cur = topk.args[0]
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
        if cur.op != "call_function" or any(u.name not in anc_topk and u is not topk for u in cur.users):
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
    topks = [n for n in graph.nodes if is_op(n, TOPK_OPS)]
    routers: dict[str, _Router] = {}
    anc: dict[str, set[str]] = {}
    for t in topks:
        anc[t.name] = nx.ancestors(dg, t.name)
        r = _walk_router(t, anc[t.name])
        if r is not None:
            routers[t.name] = r
    # several topks behind one router input (e.g. group-limited routing): the last one routes
    last_for_x: dict[str, str] = {}
    for t in topks:
        if t.name in routers:
            last_for_x[routers[t.name].x.name] = t.name
    candidates = [routers[name] for name in last_for_x.values()]
    candidates.sort(key=lambda r: _position(graph)[r.topk.name])

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


_POSITIONS: dict[int, dict[str, int]] = {}


def _position(graph: fx.Graph) -> dict[str, int]:
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
    desc_x = nx.descendants(dg, x.name)
    anc_x = nx.ancestors(dg, x.name)
    desc_gate = nx.descendants(dg, r.gate.name)
    state: dict[str, str] = {t.name: R}
    expert_mms: list[fx.Node] = []
    depth: dict[str, int] = {}  # expert matmuls on the way to an E node
    started = False
    for n in graph.nodes:
        if n is t:
            started = True
            continue
        if not started or n.op != "call_function" or n.name in blocked:
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
        elif is_op(n, MATMUL_OPS):
            a, b = matmul_operands(n) or (None, None)
            ca, cb = cats.get(a.name) if a else None, cats.get(b.name) if b else None
            if (ca in (D, E) and cb == "const") or (cb in (D, E) and ca == "const"):
                new = E
                expert_mms.append(n)
                depth[n.name] = d_in + 1
            elif E in kinds and R in kinds:
                new = C
            elif E in kinds:
                new = E
            elif D in kinds or "token" in kinds:
                new = D
            else:
                new = R
        elif E in kinds and R in kinds:
            new = C
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
    return _summarise_forward(gm, dg, r, anc_t, desc_x, anc_x, state, expert_mms, depth)


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
    tokens = None
    if x_shape and hidden and all(d is not None for d in x_shape):
        tokens = numel(x) // hidden
    score = t.args[0]
    s_shape = shape(score) or ()
    dim = t.args[2] if len(t.args) > 2 else t.kwargs.get("dim", -1)
    k = t.args[1] if isinstance(t.args[1], int) else None
    dim = dim % len(s_shape) if s_shape else dim
    notes: list[str] = []
    expert_choice = False
    num_experts = None
    if s_shape:
        rest = 1
        for i, d in enumerate(s_shape):
            if i != dim and d is not None:
                rest *= d
        if tokens is not None and s_shape[dim] == tokens and rest != tokens:
            expert_choice = True
            num_experts = rest
        else:
            num_experts = s_shape[dim]

    if r.cosine:
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
    if expert_choice:
        capacity = k
    else:
        for name in in_order(of[D], graph):
            s = shape(by_name[name])
            if s and len(s) == 3 and s[0] == num_experts and s[2] == hidden and s[1] is not None:
                capacity = s[1]
                break
    dropless = capacity is None
    if dropless:
        notes.append("dropless: tokens per expert are data-dependent" if _has_unbacked(of[D] + of[E], by_name)
                     else "dropless: no fixed-capacity expert buffer")
    ffn_hidden = None
    lt = _token_operand(last[0], state)
    lt_shape = shape(lt)
    if lt_shape:
        ffn_hidden = lt_shape[-1]

    shared = _shared_expert_nodes(dg, by_name, state, of, x, anc_t, desc_x)
    router_nodes = {n for n in anc_t - anc_x - {x.name} if by_name[n].op == "call_function"} | set(of[R])
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
    routed_roots = set()
    for name in of[D]:
        routed_roots |= nx.ancestors(dg, name)
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


def _find_backward(gm: fx.GraphModule) -> list[MoERegion]:
    return []

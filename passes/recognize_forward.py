"""Recognition in the forward graph: from each ``topk`` (or soft-routing softmax) to a region.

Every node downstream of a routing anchor gets a state in graph order: routing
metadata (R), dispatched tokens (D), expert side (E) or combined (C); the
region is the set of nodes so labelled, with the router walked upwards from
the anchor to the gate matmul. ``recognize`` documents the whole scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from fsmoe_compiler.ops import (
    ALL_TO_ALL_OPS,
    ARGMAX_OPS,
    COLLECTIVE_OPS,
    GATHER_OPS,
    GROUPED_MM_OPS,
    LAYOUT_OPS,
    MATMUL_OPS,
    NORM_OPS,
    SCATTER_OPS,
    SHAPE_ONLY_OPS,
    SIGMOID_OPS,
    SOFTMAX_OPS,
    TOPK_OPS,
    TRANSPOSE_OPS,
    WAIT_OPS,
    is_getitem,
    is_op,
    is_opaque,
    overloads,
)
from fsmoe_compiler.passes.graph_utils import (
    ancestors_of_set,
    in_order,
    is_tensor,
    matmul_operands,
    nbytes,
    numel,
    prod_key,
    shape,
    shape_keys,
    static_int,
    tensor_inputs,
    to_digraph,
    dim_through_transpose,
)

aten = torch.ops.aten

from fsmoe_compiler.passes.region import MoERegion


# Ops that combined (C) data may flow through and still be part of the combine:
# un-permuting, weighting, summing over the k choices, reshaping, communication.
COMBINE_OPS = (
    LAYOUT_OPS
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


def find_forward_regions(gm: fx.GraphModule, notes: list[str] | None = None) -> list[MoERegion]:
    """MoE regions of a forward graph in order of appearance; ``notes`` gets why routing-like anchors were left alone."""
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
    pos = node_positions(graph)
    candidates.sort(key=lambda r: pos[r.topk.name])

    regions: list[MoERegion] = []
    for r in candidates:
        blocked: set[str] = set()
        for other in candidates:
            if other is r:
                continue
            blocked |= (anc[other.topk.name] - nx.ancestors(dg, other.x.name)) | {other.x.name, other.topk.name}
        region = _forward_region(gm, dg, r, anc[r.topk.name], blocked)
        if isinstance(region, MoERegion):
            region.layer = len(regions)
            regions.append(region)
        elif notes is not None:
            notes.append(f"forward: routing-like scores at {r.topk.name} (gate {r.gate.name}) left alone: {region}")
    return regions


def node_positions(graph: fx.Graph) -> dict[str, int]:
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
                    blocked: set[str]) -> MoERegion | str:
    """Propagate R/D/E/C states below one router's topk; a region if it has experts and a combine, else why not."""
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
        if not started or n.op != "call_function" or n.name in blocked or n.target in SHAPE_ONLY_OPS:
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
            if n.target in COMBINE_OPS or (is_op(n, MATMUL_OPS) and R in kinds):
                new = C
            else:
                new = None
                if is_opaque(n):
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
    if isinstance(region, MoERegion) and opaque:
        region.notes.append(f"combine stops before opaque op(s) {sorted(set(opaque))}: left alone")
    return region


def _summarise_forward(gm, dg, r: _Router, anc_t, desc_x, anc_x, state, expert_mms, depth) -> MoERegion | str:
    """The region below one router, or why there is none."""
    graph = gm.graph
    t, x = r.topk, r.x
    by_name = {n.name: n for n in graph.nodes}
    of = {s: [name for name, st in state.items() if st == s] for s in (R, D, E, C)}
    if not expert_mms:
        return "no expert matmul (routed token data times a weight) below it"
    if not of[D]:
        return "no token data permuted by the routing result (no dispatch)"
    if not of[C]:
        return "expert outputs never meet the routing weights again (no combine)"
    a2a = [n for n in of[D] + of[E] + of[C] + of[R] if is_op(by_name[n], ALL_TO_ALL_OPS)]

    # expert lanes: distinct dispatched inputs of the first expert matmuls, or an expert dimension on batched weights
    first = [m for m in expert_mms if depth[m.name] == 1]
    last_depth = max(depth[m.name] for m in expert_mms)
    last = [m for m in expert_mms if depth[m.name] == last_depth]
    lanes = len({_token_operand(m, state).name for m in first})
    batched = [m for m in expert_mms if is_op(m, GROUPED_MM_OPS) or len(shape(_weight_operand(m, state)) or ()) == 3]
    if lanes < 2 and not batched and not a2a:
        return "one dense lane on top-k-selected rows (e.g. top-k pooling), not a mixture of experts"

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
        picks_tokens = _selects_over_tokens(score, dim, r.gate)
        if picks_tokens is None:  # the choice's dimension could not be followed to the gate: compare sizes
            picks_tokens = tokens_key is not None and s_keys[dim] == tokens_key and rest != tokens_key
        if picks_tokens:
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


def _selects_over_tokens(score: fx.Node, dim: int, gate: fx.Node) -> bool | None:
    """Whether a choice along ``dim`` of ``score`` picks tokens (expert choice) rather than experts.

    Follows ``dim`` up from the scores to the gate matmul ``tokens @ weight``
    through transposes and ops that keep the shape (softmax, sigmoid, bias,
    casts): landing on the gate's first (row) dimension means the choice is
    among tokens, on its last (the weight's) among experts. This holds however
    the sizes compare (with E == T a size says nothing). None when the
    dimension cannot be followed (a reshape on the way).
    """
    cur, d = score, dim
    for _ in range(40):
        if cur is gate:
            rank = len(shape(gate) or ())
            if rank < 2:
                return None
            return d % rank != rank - 1
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return None
        if is_op(cur, TRANSPOSE_OPS):
            d = dim_through_transpose(cur, d, upward=True)
            cur = tensor_inputs(cur)[0] if tensor_inputs(cur) else None
            if d is None:
                return None
            continue
        nxt = _primary_input(cur)
        if nxt is None or shape(nxt) != shape(cur):
            return None
        cur = nxt
    return None


def _view_chain(x: fx.Node) -> list[fx.Node]:
    """``x`` and the tensors it is a view of, nearest first (``[T, M]`` back to ``[B, S, M]``)."""
    chain = [x]
    while chain[-1].target in LAYOUT_OPS and len(tensor_inputs(chain[-1])) == 1:
        chain.append(tensor_inputs(chain[-1])[0])
    return chain


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



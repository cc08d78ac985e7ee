"""Recognition in the forward graph: from each ``topk`` (or soft-routing softmax) to a region.

Routing anchors are found first and walked up to their gate matmul and token
input. Below each anchor every node gets a state from ``FORWARD_RULES`` in
graph order: routing metadata, dispatched tokens, expert side or combined.
Small steps then read the region's facts off the states (router kind, top-k,
experts, capacity, sizes, all-to-alls, shared expert, router nodes).
``recognize`` documents the whole scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fsmoe_compiler.ops import (
    ALL_TO_ALL_OPS,
    ARGMAX_OPS,
    GATHER_OPS,
    GROUPED_MM_OPS,
    LAYOUT_OPS,
    MATMUL_OPS,
    NORM_OPS,
    SHAPE_ONLY_OPS,
    SIGMOID_OPS,
    SOFTMAX_OPS,
    TOPK_OPS,
    TRANSPOSE_OPS,
    is_getitem,
    is_op,
    is_opaque,
    is_pointwise,
)
from fsmoe_compiler.passes.graph_utils import (
    ancestors_of_set,
    dim_through_transpose,
    is_tensor,
    matmul_operands,
    numel,
    prod_key,
    shape,
    shape_keys,
    static_int,
    tensor_inputs,
    val,
)
from fsmoe_compiler.passes.recognize_common import (
    COMBINE_OPS,
    EXPERT_MATMUL,
    OPAQUE,
    SAME,
    GraphIndex,
    Rule,
    all_to_alls,
    always,
    expert_buffer,
    first_match,
    opaque_gemm_operands,
)
from fsmoe_compiler.passes.region import LeftAlone, MoERegion

#: ``Rule.mark`` of an opaque op the combine takes in by its signature: named in the region's notes.
OPAQUE_COMBINE = "opaque combine"

# ----------------------------------------------------------------------------------------------
# states and the categories of unlabelled inputs

ROUTING = "routing"  # routing metadata: scores, indices, gates, masks, counts
DISPATCHED = "dispatched"  # token data permuted by the routing result, before any expert matmul
EXPERT = "expert"  # expert-side data: after an expert matmul
COMBINED = "combined"  # expert output that met the routing weights again
WEIGHTS = "routed weights"  # expert weights gathered per token by the routing result (weights go to the tokens)
STATES = (ROUTING, DISPATCHED, EXPERT, COMBINED, WEIGHTS)

ROUTER_SIDE = "router-side"  # computed on the way to the topk (or from the gate), not labelled
TOKEN = "token"  # the router's token input or computed from it
OUTSIDE = "outside"  # computed before the router's input: a residual, an earlier activation
CONSTANT = "constant"  # none of these: a weight, a constant


# ----------------------------------------------------------------------------------------------
# routers: from each anchor up to the gate matmul and the token input


@dataclass
class Router:
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


def _walk_router(topk: fx.Node, anc_topk: frozenset[str]) -> Router | None:
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
    return Router(topk=topk, gate=gate, x=cur, score_ops=ops, cosine=cosine)


def _soft_anchor(index: GraphIndex, n: fx.Node, before_topk: set[str]) -> Router | None:
    """The router of a soft-routing anchor: a softmax over the token dim of ``[tokens, experts, slots]`` scores."""
    if not is_op(n, SOFTMAX_OPS) or n.name in before_topk or len(shape(n) or ()) < 2:
        return None
    if (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) % len(shape(n)) != 0:
        return None
    r = _walk_router(n, index.ancestors(n.name))
    x_keys = shape_keys(r.x) if r is not None else None
    if x_keys and prod_key(x_keys[:-1]) == (shape_keys(n) or (None,))[0]:  # softmax over the router's tokens
        return r
    return None


def _routers(index: GraphIndex) -> list[list[Router]]:
    """The routers of each MoE layer candidate, in graph order of its anchor: the likeliest first, then the others.

    Several anchors behind one router input (group-limited routing's topk
    over groups, then over experts; an auxiliary loss's second softmax and
    topk on the same logits): the last one routes, unless it forms no region;
    ``find_forward_regions`` then tries the earlier ones, latest first.
    """
    topks = [n for n in index.graph.nodes if _selects(n)]
    routers: dict[str, Router] = {}
    for t in topks:
        r = _walk_router(t, index.ancestors(t.name))
        if r is not None:
            routers[t.name] = r
    before_topk = set().union(*(index.ancestors(t.name) for t in topks))
    for n in index.graph.nodes:
        r = _soft_anchor(index, n, before_topk)
        if r is not None:
            routers[n.name] = r
            topks.append(n)
    by_x: dict[str, list[Router]] = {}
    for t in sorted(topks, key=lambda t: index.pos[t.name]):
        if t.name in routers:
            by_x.setdefault(routers[t.name].x.name, []).insert(0, routers[t.name])
    return sorted(by_x.values(), key=lambda rs: index.pos[rs[0].topk.name])


def find_forward_regions(gm: fx.GraphModule, notes: list[str] | None = None) -> list[MoERegion]:
    """MoE regions of a forward graph in order of appearance; ``notes`` gets why routing-like anchors were not."""
    index = GraphIndex.build(gm)
    groups = _routers(index)
    # a capacity topk over tokens limits the routing topk, not routes: (the dropping topk or None, the router)
    resolved = [[(r.topk, lim) if (lim := _limited_router(index, r)) else (None, r) for r in rs] for rs in groups]
    candidates = [rs[0][1] for rs in resolved]
    found: list[tuple[int, MoERegion]] = []  # (the anchor's position, the region)
    for i, group in enumerate(resolved):
        tried: list[tuple[Router, str]] = []
        for dropping, r in group:  # the latest anchor first; an earlier one on the same input if it forms no region
            region = _forward_region(index, _scope(index, r, candidates[:i] + [r] + candidates[i + 1:]))
            if isinstance(region, MoERegion):
                _argmax_top_k(index, r, region)
                if dropping is not None:
                    region.notes.append(_token_dropping_note(dropping, region))
                if tried:
                    region.notes.append("routing-like anchor(s) on the same router input left alone: " + "; ".join(
                        f"{t.topk.name}: {why}" for t, why in tried))
                found.append((index.pos[r.topk.name], region))
                break
            tried.append((r, region))
        else:
            if notes is not None:
                r, why = tried[0]
                notes.append(_left_alone_note(r, why))
    regions = [region for _, region in sorted(found, key=lambda pr: pr[0])]
    for layer, region in enumerate(regions):
        region.layer = layer
    if notes is not None:
        notes.extend(_routing_from_inputs(index, {r.topk.name for rs in groups for r in rs}))
    return regions


def _argmax_top_k(index: GraphIndex, r: Router, region: MoERegion) -> None:
    """Top-k written as k ``argmax`` (each after masking the earlier choices, GShard/DeepSpeed top-2): the anchor
    is the last argmax, and the earlier ones on the same router input over the same experts are among what it
    is computed from. ``k`` counts them all; the router kind is read off every one's scores (the first choice
    is made on the softmax, the later ones on the masked, possibly noised, logits)."""
    t = r.topk
    if not is_op(t, ARGMAX_OPS) or region.top_k != 1:
        return
    below = index.ancestors(t.name)
    earlier = []
    for a in index.nodes[:index.pos[t.name]]:
        if a.name in below and is_op(a, ARGMAX_OPS) and _selects(a) and _float_scores(a):
            other = _walk_router(a, index.ancestors(a.name))
            if other is not None and other.x is r.x and shape(a.args[0]) == shape(t.args[0]):
                earlier.append(other)
    if not earlier:
        return
    region.top_k = 1 + len(earlier)
    ops = set(r.score_ops).union(*(o.score_ops for o in earlier))
    if region.router == "topk" and ("softmax" in ops or "sigmoid" in ops):
        region.router = "sigmoid-topk" if "sigmoid" in ops else "softmax-topk"
    region.notes.append(f"top-{region.top_k} as {region.top_k} argmax, each after masking the earlier choices "
                        f"({', '.join(o.topk.name for o in earlier)}, then {t.name})")


def _float_scores(choice: fx.Node) -> bool:
    """A choice over floating-point scores (not over a one-hot mask, which only reads a choice back)."""
    v = val(choice.args[0]) if isinstance(choice.args[0], fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _limited_router(index: GraphIndex, r: Router) -> Router | None:
    """The router whose choice the anchor of ``r`` only limits to a capacity, else None.

    Token dropping by capacity (Megatron's ``apply_router_token_dropping``) is a topk over the token dimension
    of scores computed from the routing topk's result, on the same router input: each expert keeps its
    ``capacity`` best tokens of those routed to it. It is not an expert-choice router of its own.
    """
    tokens_key = _token_sizes(r.x)[1]
    if not _selects(r.topk) or not _choice(r, tokens_key).expert_choice:
        return None
    below = index.ancestors(r.topk.name)
    for a in reversed(index.nodes[:index.pos[r.topk.name]]):
        if a.name in below and _selects(a):
            routing = _walk_router(a, index.ancestors(a.name))
            if routing is not None and routing.x is r.x and not _choice(routing, tokens_key).expert_choice:
                return routing
    return None


def _token_dropping_note(topk: fx.Node, region: MoERegion) -> str:
    """What a capacity topk over tokens does to the region: each expert keeps its best ``k`` routed tokens."""
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    k = k if isinstance(k, int) else "a symbolic number of"
    note = f"token dropping: {topk.name} keeps each expert's best {k} routed tokens (a topk over tokens)"
    if region.dropless:
        note += ("; the expert buffers stay data-dependent (not padded to the capacity): dispatched as dropless")
    return note


# ----------------------------------------------------------------------------------------------
# the walk below one router


@dataclass
class Scope:
    """What bounds one router's region and classifies the unlabelled inputs of a node below it."""

    router: Router
    anc_t: frozenset[str]  # everything the anchor is computed from
    x_views: list[fx.Node]  # the token input and the tensors it is only a view of, nearest first
    desc_x: set[str]  # the token input, its views and everything computed from them
    anc_x: frozenset[str]  # what the token input is computed from
    desc_gate: frozenset[str]
    blocked: set[str]  # other routers' nodes: no state flows into them


def _view_chain(x: fx.Node) -> list[fx.Node]:
    """``x`` and the tensors it is a view of, nearest first (``[T, M]`` back to ``[B, S, M]``)."""
    chain = [x]
    while chain[-1].target in LAYOUT_OPS and len(tensor_inputs(chain[-1])) == 1:
        chain.append(tensor_inputs(chain[-1])[0])
    return chain


def _scope(index: GraphIndex, r: Router, candidates: list[Router]) -> Scope:
    """The node sets around router ``r``; the other candidates' routers are blocked."""
    blocked: set[str] = set()
    for other in candidates:
        if other is not r:
            blocked |= index.ancestors(other.topk.name) - index.ancestors(other.x.name)
            blocked |= {other.x.name, other.topk.name}
    # x and the tensors it is only a view of (e.g. [B, S, M] before the reshape to [T, M]) are the tokens
    x_views = _view_chain(r.x)
    desc_x = set().union(*(index.descendants(v.name) for v in x_views)) | {v.name for v in x_views}
    return Scope(router=r, anc_t=index.ancestors(r.topk.name), x_views=x_views, desc_x=desc_x,
                 anc_x=index.ancestors(x_views[-1].name), desc_gate=index.descendants(r.gate.name), blocked=blocked)


@dataclass
class ForwardSeen:
    """What the forward walk sees at one node: the categories of its tensor inputs and, for rules, a bit more."""

    node: fx.Node
    kinds: frozenset[str]  # the states of its labelled tensor inputs and the categories of the others
    operands: tuple[str | None, str | None]  # the categories of a matmul's two operands (None, None) otherwise
    source: str | None  # the state of the tuple a getitem reads, else None
    inputs: dict[str, str] = field(default_factory=dict)  # the state or category of each tensor input, by name
    gemm: tuple[str | None, str | None] | None = None  # an opaque GEMM's (rows, weight) categories, else None
    scope: Scope | None = None  # the router's scope (rules that compare with the token input read it)


def _category(a: fx.Node, state: dict[str, str], scope: Scope) -> str:
    """The category of one input of a node: its state, or router-side / token / outside / constant."""
    if a.name in state:
        return state[a.name]
    if a is scope.router.x:
        return TOKEN
    if a.name in scope.anc_x:
        return OUTSIDE
    if a.name in scope.anc_t or a.name in scope.desc_gate:
        return ROUTER_SIDE
    if a.name in scope.desc_x:
        return TOKEN
    return CONSTANT


def _see(n: fx.Node, state: dict[str, str], scope: Scope) -> ForwardSeen:
    """What the rules may ask about node ``n``, given the states so far."""
    cats = {a.name: _category(a, state, scope) for a in n.all_input_nodes if is_tensor(a)}
    a, b = (matmul_operands(n) or (None, None)) if is_op(n, MATMUL_OPS) else (None, None)
    operands = (cats.get(a.name) if a else None, cats.get(b.name) if b else None)
    source = state.get(n.args[0].name) if is_getitem(n) else None
    gemm = opaque_gemm_operands(n)
    gemm_cats = (cats.get(gemm[0].name), cats.get(gemm[1].name)) if gemm else None
    return ForwardSeen(node=n, kinds=frozenset(cats.values()), operands=operands, source=source, inputs=cats,
                       gemm=gemm_cats, scope=scope)


def _meets_outside(s: ForwardSeen) -> bool:
    return OUTSIDE in s.kinds


def _reads_labelled_tuple(s: ForwardSeen) -> bool:
    return s.source is not None


def _combined_through_combine_op(s: ForwardSeen) -> bool:
    return COMBINED in s.kinds and (
        s.node.target in COMBINE_OPS or (is_op(s.node, MATMUL_OPS) and ROUTING in s.kinds))


def _opaque_scatter_back(s: ForwardSeen) -> bool:
    """Combined data put back in token order by an op outside ATen (torchtitan's ``deterministic_scatter_add``).

    Told by signature and data flow, not by name: one tensor result with the
    rows and width of the router's token input, computed from combined
    data and an integer index that is routing metadata.
    """
    if COMBINED not in s.kinds or not is_opaque(s.node) or s.scope is None:
        return False
    out = val(s.node)
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
        return False
    if _token_rows(s.node) not in {_token_rows(v) for v in s.scope.x_views}:
        return False
    return any(_integer(a) and s.inputs.get(a.name) == ROUTING for a in s.node.all_input_nodes)


def _token_rows(node: fx.Node) -> tuple | None:
    """``(rows, width)`` of a tensor: ``[B, S, M]`` and ``[B*S, M]`` read the same."""
    keys = shape_keys(node)
    return (prod_key(keys[:-1]), keys[-1]) if keys else None


def _integer(node: fx.Node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype is not torch.bool


def _combined_into_opaque(s: ForwardSeen) -> bool:
    return COMBINED in s.kinds and is_opaque(s.node)


def _combined_elsewhere(s: ForwardSeen) -> bool:
    return COMBINED in s.kinds


def _routed_times_weight(s: ForwardSeen) -> bool:
    ca, cb = s.operands
    return (ca in (DISPATCHED, EXPERT) and cb == CONSTANT) or (cb in (DISPATCHED, EXPERT) and ca == CONSTANT)


def _routed_times_weight_in_opaque_op(s: ForwardSeen) -> bool:
    return s.gemm is not None and s.gemm[0] in (DISPATCHED, EXPERT) and s.gemm[1] == CONSTANT


def _tokens_times_routed_weights(s: ForwardSeen) -> bool:
    ca, cb = s.operands
    return (ca == WEIGHTS and cb in (TOKEN, DISPATCHED, EXPERT)) or (cb == WEIGHTS and ca in (TOKEN, DISPATCHED, EXPERT))


def _weights_gathered_by_routing(s: ForwardSeen) -> bool:
    """A stack of per-expert parameters (rank >= 2, no token or router data) indexed by routing metadata."""
    n = s.node
    if n.target not in GATHER_OPS or ROUTING not in s.kinds or not isinstance(n.args[0], fx.Node):
        return False
    src = n.args[0]
    return s.inputs.get(src.name) == CONSTANT and len(shape(src) or ()) >= 2


def _view_of_routed_weights(s: ForwardSeen) -> bool:
    return s.kinds == frozenset({WEIGHTS}) and s.node.target in LAYOUT_OPS
def _weighted_before_next_expert_matmul(s: ForwardSeen) -> bool:
    """Expert-side data scaled by routing weights on its way to another expert matmul (Megatron's experts apply
    the routing probabilities to the activation between their two linears): still inside the expert."""
    return _expert_meets_routing(s) and is_pointwise(s.node.target) and _feeds_weight_matmul(s.node)


def _feeds_weight_matmul(node: fx.Node, depth: int = 4) -> bool:
    """A matmul with a weight (a graph input seen through views) within ``depth`` pointwise or view ops below."""
    frontier = list(node.users)
    for _ in range(depth):
        nxt = []
        for u in frontier:
            if is_op(u, MATMUL_OPS):
                if any(_is_weight(a) for a in (matmul_operands(u) or ())):
                    return True
            elif u.op == "call_function" and (u.target in LAYOUT_OPS or is_pointwise(u.target)):
                nxt.extend(u.users)
        frontier = nxt
    return False


def _is_weight(node: fx.Node) -> bool:
    """A graph input (a parameter) seen through views and casts."""
    cur = node
    for _ in range(6):
        if cur.op == "placeholder":
            return True
        if cur.op != "call_function" or cur.target not in LAYOUT_OPS or len(tensor_inputs(cur)) != 1:
            return False
        cur = tensor_inputs(cur)[0]
    return False


def _expert_meets_routing(s: ForwardSeen) -> bool:
    return EXPERT in s.kinds and (ROUTING in s.kinds or ROUTER_SIDE in s.kinds)


def _expert_all_to_all(s: ForwardSeen) -> bool:
    return EXPERT in s.kinds and is_op(s.node, ALL_TO_ALL_OPS)


def _expert_side(s: ForwardSeen) -> bool:
    return EXPERT in s.kinds


def _token_data(s: ForwardSeen) -> bool:
    return DISPATCHED in s.kinds or TOKEN in s.kinds


#: The forward transition table, evaluated in order at each node fed by a labelled node.
FORWARD_RULES: tuple[Rule, ...] = (
    Rule("meets a residual or another earlier activation: the region ends", _meets_outside, None),
    Rule("one output of a labelled multi-output op", _reads_labelled_tuple, SAME),
    Rule("combined data through an op a combine is made of", _combined_through_combine_op, COMBINED),
    Rule("combined data scattered back to token order by an opaque op", _opaque_scatter_back, COMBINED,
         mark=OPAQUE_COMBINE),
    Rule("combined data into an opaque op: the combine stops", _combined_into_opaque, None, mark=OPAQUE),
    Rule("combined data into any other op: the combine stops", _combined_elsewhere, None),
    Rule("routed token data times a weight: an expert matmul", _routed_times_weight, EXPERT, mark=EXPERT_MATMUL),
    Rule("routed token data times a weight in an opaque op (a library's grouped GEMM): an expert matmul",
         _routed_times_weight_in_opaque_op, EXPERT, mark=EXPERT_MATMUL),
    Rule("token data times expert weights gathered per token: an expert matmul", _tokens_times_routed_weights, EXPERT,
         mark=EXPERT_MATMUL),
    Rule("expert activation scaled by its routing weight before the expert's next matmul",
         _weighted_before_next_expert_matmul, EXPERT),
    Rule("expert output meets routing weights: the combine", _expert_meets_routing, COMBINED),
    Rule("expert output sent back to the tokens' ranks: the combine all-to-all", _expert_all_to_all, COMBINED),
    Rule("expert-side data", _expert_side, EXPERT),
    Rule("token data moved by routing metadata: the dispatch", _token_data, DISPATCHED),
    Rule("expert weights gathered per token by routing metadata: the dispatch of weights to tokens",
         _weights_gathered_by_routing, WEIGHTS),
    Rule("a view of expert weights gathered per token", _view_of_routed_weights, WEIGHTS),
    Rule("routing metadata", always, ROUTING),
)


@dataclass
class ForwardWalk:
    """The states the walk gave, the expert matmuls it met (with their depth) and the opaque ops it stopped at."""

    state: dict[str, str]
    anchor: fx.Node
    expert_mms: list[fx.Node] = field(default_factory=list)
    depth: dict[str, int] = field(default_factory=dict)  # expert matmuls on the way to an expert-side node
    opaque: list[str] = field(default_factory=list)
    opaque_combine: list[str] = field(default_factory=list)  # opaque ops taken into the combine by signature

    def of(self, st: str) -> list[str]:
        """Nodes labelled ``st``, in the order they were labelled (graph order)."""
        return [name for name, s in self.state.items() if s == st]


def _walk_forward(index: GraphIndex, scope: Scope) -> ForwardWalk:
    """Label every node below the anchor, in graph order, by ``FORWARD_RULES``."""
    t = scope.router.topk
    walk = ForwardWalk(state={t.name: ROUTING}, anchor=t)
    for n in index.after(t):
        if n.op != "call_function" or n.name in scope.blocked or n.target in SHAPE_ONLY_OPS:
            continue
        if not any(a.name in walk.state for a in n.all_input_nodes):
            continue
        seen = _see(n, walk.state, scope)
        rule = first_match(FORWARD_RULES, seen)
        if rule.mark == OPAQUE:
            walk.opaque.append(str(n.target))
        elif rule.mark == OPAQUE_COMBINE:
            walk.opaque_combine.append(str(n.target))
        new = seen.source if rule.to == SAME else rule.to
        if new is None:
            continue
        walk.state[n.name] = new
        d_in = max((walk.depth.get(a.name, 0) for a in n.all_input_nodes), default=0)
        if rule.mark == EXPERT_MATMUL:
            walk.expert_mms.append(n)
            walk.depth[n.name] = d_in + 1
        elif new in (EXPERT, COMBINED) or rule.to == SAME:
            walk.depth[n.name] = d_in
    return walk


def _forward_region(index: GraphIndex, scope: Scope) -> MoERegion | str:
    """The region below one router if it has experts and a combine, else why not."""
    walk = _walk_forward(index, scope)
    region = _summarise_forward(index, scope, walk)
    if isinstance(region, str):  # why not, with the roles the walk did find
        region = _roles_found(index, scope, walk, region)
    if isinstance(region, MoERegion) and walk.opaque:
        region.notes.append(f"combine stops before opaque op(s) {sorted(set(walk.opaque))}: left alone")
    opaque_gemms = sorted({str(m.target) for m in walk.expert_mms if is_opaque(m)})
    if isinstance(region, MoERegion) and opaque_gemms:
        region.notes.append(f"expert GEMMs in opaque op(s) {opaque_gemms}, told by signature (routed rows times a "
                            "constant weight)")
    if isinstance(region, MoERegion) and walk.opaque_combine:
        region.notes.append(f"opaque op(s) {sorted(set(walk.opaque_combine))} in the combine: "
                            "a scatter back to token order by signature (routing index in, token rows out)")
    return region


def _routing_from_inputs(index: GraphIndex, anchored: set[str]) -> list[LeftAlone]:
    """Top-k choices over scores this graph takes as an input (no gate matmul above them) with matmuls below.

    The gate ran in an earlier graph: a Dynamo graph break between the
    router's scores and its topk splits the layer. Not a region; a note, with
    the roles seen below the topk, so the report can tie it to the break.
    """
    out = []
    for t in index.graph.nodes:
        if not _selects(t) or t.name in anchored:
            continue
        above = [index.by_name[a] for a in index.ancestors(t.name)]
        if any(is_op(a, MATMUL_OPS) for a in above) or not any(a.op == "placeholder" for a in above):
            continue
        below = [index.by_name[d] for d in index.descendants(t.name)]
        present = ("dispatch", "expert", "combine") if any(is_op(d, MATMUL_OPS) for d in below) else ()
        if not present:
            continue
        out.append(LeftAlone(
            f"forward: topk {t.name} over scores that are an input of this graph (no gate matmul here) with matmuls "
            "below it left alone: if its router ran in an earlier graph, a Dynamo graph break splits the layer "
            f"[{', '.join(present)} found; missing: router]", anchor=t.name, gate="", present=present))
    return out


def _roles_found(index: GraphIndex, scope: Scope, walk: ForwardWalk, why: str) -> LeftAlone:
    """``why`` no region formed below ``scope.router``, carrying the roles found and whether routing leaves the graph."""
    present = ["router"]
    if walk.of(DISPATCHED) or walk.of(WEIGHTS):
        present.append("dispatch")
    if walk.expert_mms:
        present.append("expert")
    if walk.of(COMBINED):
        present.append("combine")
    stack = scope.router.topk.meta.get("nn_module_stack") or {}
    module = ""
    if stack:  # the innermost module Dynamo recorded, e.g. ("L['self'].layers[0].mlp", MoEBlock)
        path, cls = list(stack.values())[-1][:2]
        path = str(path).removeprefix("L['self']").lstrip(".")
        name = getattr(cls, "__name__", str(cls))
        module = f"{path} ({name})" if path else name
    return LeftAlone(why, anchor=scope.router.topk.name, gate=scope.router.gate.name, module=module,
                     present=tuple(present), leaves_graph=bool(_leaves_graph(index, walk)))


def _left_alone_note(r: Router, why: str) -> str:
    """The note on an anchor that formed no region: why, and which roles were found and which are missing."""
    text = f"forward: routing-like scores at {r.topk.name} (gate {r.gate.name}) left alone: {why}"
    if not isinstance(why, LeftAlone):
        return text
    found = "router only" if why.present == ("router",) else "partial: " + ", ".join(why.present) + " found"
    text += f" [{found}; missing: {', '.join(why.missing)}]" if why.missing else ""
    return LeftAlone(text, anchor=why.anchor, gate=why.gate, module=why.module, present=why.present,
                     leaves_graph=why.leaves_graph)


# ----------------------------------------------------------------------------------------------
# what the states say: the region's facts, one small step each


def _summarise_forward(index: GraphIndex, scope: Scope, walk: ForwardWalk) -> MoERegion | str:
    """The region below one router, or why there is none."""
    reason = _not_moe(index, walk)
    if reason is not None:
        return reason
    r = scope.router
    hidden, tokens_key = _token_sizes(r.x)
    choice = _choice(r, tokens_key)
    notes: list[str] = []
    router = _router_kind(r, choice, notes)
    capacity, dropless = _capacity(index, walk, choice, hidden, notes)
    a2a, a2a_bytes = all_to_alls(index, walk.state)
    lanes = _lanes(walk)
    if lanes >= 2:
        notes.append(f"{lanes} expert lanes (one matmul chain per local expert)")
    return MoERegion(
        layer=0,
        graph="forward",
        router=router,
        num_experts=choice.num_experts,
        top_k=None if choice.expert_choice else choice.k,
        capacity=capacity,
        dropless=dropless,
        tokens=static_int(tokens_key) if isinstance(tokens_key, int) else None,
        hidden=hidden,
        ffn_hidden=_ffn_hidden(walk),
        nodes=_roles(index, scope, walk),
        all_to_all=a2a,
        a2a_bytes=a2a_bytes,
        notes=notes,
    )


def _not_moe(index: GraphIndex, walk: ForwardWalk) -> str | None:
    """Why the states below a routing-like anchor are no MoE layer, or None when they are one."""
    if not walk.expert_mms:
        return "no expert matmul (routed token data times a weight) below it" + _leaves_graph(index, walk)
    if not walk.of(DISPATCHED) and not walk.of(WEIGHTS):
        return "no token data permuted by the routing result (no dispatch)"
    if not walk.of(COMBINED):
        return "expert outputs never meet the routing weights again (no combine)"
    batched = [m for m in walk.expert_mms
               if is_op(m, GROUPED_MM_OPS) or len(shape(_expert_operands(m, walk.state)[1]) or ()) == 3]
    if _lanes(walk) < 2 and not batched and not any(is_op(index.by_name[n], ALL_TO_ALL_OPS) for n in walk.state):
        return "one dense lane on top-k-selected rows (e.g. top-k pooling), not a mixture of experts"
    return None


def _lanes(walk: ForwardWalk) -> int:
    """Expert lanes: distinct dispatched inputs of the first expert matmuls."""
    return len({_expert_operands(m, walk.state)[0].name for m in walk.expert_mms if walk.depth[m.name] == 1})


def _token_sizes(x: fx.Node) -> tuple[int | None, object]:
    """The hidden width and the token count (an int or a symbolic size key) of the router's input."""
    x_shape = shape(x)
    x_keys = shape_keys(x) or ()
    return (x_shape[-1] if x_shape else None), (prod_key(x_keys[:-1]) if x_keys else None)


@dataclass
class Choice:
    """How the anchor chooses: soft routing, expert choice, k choices, among how many experts."""

    soft: bool
    expert_choice: bool = False
    k: int | None = None
    num_experts: int | None = None
    slots: int | None = None  # soft routing: slots per expert


def _choice(r: Router, tokens_key: object) -> Choice:
    """Read the choice off the anchor: its dimension of the scores, followed up to the gate, says tokens or experts."""
    t = r.topk
    score = t.args[0]
    s_shape, s_keys = shape(score) or (), shape_keys(score) or ()
    if not _selects(t):  # soft routing: scores [tokens, experts, slots]
        return Choice(soft=True, num_experts=s_shape[1] if len(s_shape) > 1 else None,
                      slots=static_int(s_keys[2]) if len(s_keys) == 3 else None)
    if not s_shape:
        return Choice(soft=False)
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
    if picks_tokens:  # topk over the token dimension: each expert picks its tokens
        return Choice(soft=False, expert_choice=True, k=k, num_experts=rest if isinstance(rest, int) else None)
    return Choice(soft=False, k=k, num_experts=s_shape[dim])


def _router_kind(r: Router, choice: Choice, notes: list[str]) -> str:
    """The router's kind: soft, cosine-topk, expert-choice, sigmoid-topk, softmax-topk or plain topk."""
    if choice.soft:
        return "soft"
    if r.cosine:
        return "cosine-topk"
    if choice.expert_choice:
        return "expert-choice"
    if "sigmoid" in r.score_ops:
        return "sigmoid-topk"
    if "softmax" in r.score_ops:
        return "softmax-topk"
    if _softmax_after(r.topk):
        notes.append("softmax over the top-k logits")
        return "softmax-topk"
    return "topk"


def _capacity(index: GraphIndex, walk: ForwardWalk, choice: Choice, hidden: int | None,
              notes: list[str]) -> tuple[int | None, bool]:
    """``(capacity, dropless)``: a fixed-capacity ``[E, C, M]`` expert buffer (C may be symbolic) or none."""
    if choice.expert_choice:
        capacity, buffer = choice.k, True
    elif choice.soft:  # every expert has its slots per expert, always full
        capacity, buffer = choice.slots, True
    else:
        capacity, buffer = expert_buffer(index, walk.of(DISPATCHED), choice.num_experts, hidden)
    if buffer and capacity is None:
        notes.append("capacity is symbolic (dynamic shapes)")
    if not buffer:
        notes.append("dropless: tokens per expert are data-dependent"
                     if _has_unbacked(index, walk.of(DISPATCHED) + walk.of(EXPERT))
                     else "dropless: no fixed-capacity expert buffer")
    return capacity, not buffer


def _ffn_hidden(walk: ForwardWalk) -> int | None:
    """The experts' inner width: the last dimension of the token operand of the last expert matmuls."""
    last_depth = max(walk.depth[m.name] for m in walk.expert_mms)
    last = [m for m in walk.expert_mms if walk.depth[m.name] == last_depth]
    token = _expert_operands(last[0], walk.state)[0]
    lt_shape = shape(token)
    if not lt_shape:
        return None
    # the contracted width: the last dim of a left operand, the one before it of a right one (weights @ column)
    right = is_op(last[0], MATMUL_OPS) and matmul_operands(last[0])[1] is token and len(lt_shape) >= 2
    return lt_shape[-2] if right else lt_shape[-1]


def _roles(index: GraphIndex, scope: Scope, walk: ForwardWalk) -> dict[str, list[str]]:
    """Node names by role, in graph order.

    The router is everything the anchor is computed from after the token
    input, plus the routing metadata below it; the shared expert is taken out.
    """
    shared = _shared_expert_nodes(index, scope, walk)
    x_views = {v.name for v in scope.x_views}
    router = {n for n in scope.anc_t - scope.anc_x - x_views if index.by_name[n].op == "call_function"}
    router |= set(walk.of(ROUTING))
    return {
        "router": index.in_order((router - shared) | {scope.router.topk.name}),
        "dispatch": index.in_order(walk.of(DISPATCHED) + walk.of(WEIGHTS)),
        "expert": index.in_order(walk.of(EXPERT)),
        "combine": index.in_order(walk.of(COMBINED)),
        "shared_expert": index.in_order(shared),
    }


def _shared_expert_nodes(index: GraphIndex, scope: Scope, walk: ForwardWalk) -> set[str]:
    """Nodes of a dense expert on the router input whose output is added into the combine."""
    state = walk.state
    merged_in: list[str] = []
    for name in walk.of(COMBINED):
        for a in index.by_name[name].all_input_nodes:
            if a.name not in state and a.name in scope.desc_x and a.name not in scope.anc_t and is_tensor(a):
                merged_in.append(a.name)
    if not merged_in:
        return set()
    routed_roots = ancestors_of_set(index.dg, walk.of(DISPATCHED))
    shared: set[str] = set()
    for out in merged_in:
        if _routed_elsewhere(index, scope, out):  # another layer's output (token ranges joined by a cat)
            continue
        cand = (index.ancestors(out) | {out}) & scope.desc_x
        cand = {n for n in cand if n not in scope.anc_t and n not in routed_roots and n not in state
                and index.by_name[n].op == "call_function"}
        if any(is_op(index.by_name[n], MATMUL_OPS) for n in cand):
            shared |= cand
    return shared


def _routed_elsewhere(index: GraphIndex, scope: Scope, name: str) -> bool:
    """Whether ``name`` is computed from a top-k other than this layer's router: it is not a dense expert.
    A top-k above this layer's own (an earlier layer's, or a group-limited router's group choice) feeds
    everything of this layer and says nothing."""
    mine = scope.router.topk.name
    above = index.ancestors(mine)
    return any(a != mine and a not in above and is_op(index.by_name[a], TOPK_OPS) for a in index.ancestors(name))


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


def _expert_operands(m: fx.Node, state: dict[str, str]) -> tuple[fx.Node, fx.Node]:
    """``(token data, weight)`` of an expert matmul: an ATen matmul, an opaque GEMM or one with gathered weights.

    The weight is the unlabelled operand, or the one holding expert weights
    gathered per token (the token data then may be unlabelled: tokens repeated k times).
    """
    gemm = opaque_gemm_operands(m)
    if gemm is not None:
        return gemm
    a, b = matmul_operands(m)
    if state.get(a.name) == WEIGHTS:
        return b, a
    if state.get(b.name) == WEIGHTS:
        return a, b
    return (a, b) if a.name in state else (b, a)


def _leaves_graph(index: GraphIndex, walk: ForwardWalk) -> str:
    """A note when routing metadata below the anchor is an output of the graph: the layer may go on in another graph."""
    results, frontier = set(), [walk.anchor]
    while frontier:  # the anchor's outputs and their views
        cur = frontier.pop()
        results.add(cur.name)
        frontier.extend(u for u in cur.users if is_getitem(u) or u.target in LAYOUT_OPS)
    if not any(a.name in results for a in index.graph.output_node().all_input_nodes):
        return ""
    return ("; the routing result is an output of this graph: if the experts run in a later graph, a Dynamo graph "
            "break splits the layer (e.g. a Python loop over nonzero() of expert hits; "
            "fsmoe_compiler.ecosystem.compile_friendly(model) switches known libraries to a compile-friendly "
            "expert implementation)")


def _softmax_after(t: fx.Node) -> bool:
    """A softmax within three ops below the topk's values: a softmax over the top-k logits."""
    for u in t.users:
        if is_getitem(u) and u.args[1] == 0:
            frontier = list(u.users)
            for _ in range(3):
                if any(is_op(n, SOFTMAX_OPS) for n in frontier):
                    return True
                frontier = [v for n in frontier for v in n.users]
    return False


def _has_unbacked(index: GraphIndex, names: list[str]) -> bool:
    """Some node of ``names`` has a size that is not a plain int (data-dependent, or symbolic)."""
    for name in names:
        v = index.by_name[name].meta.get("val")
        if isinstance(v, torch.Tensor) and any(not isinstance(s, int) for s in v.shape):
            return True
    return False

"""Recognition in the backward graph: from the topk gradient (or soft-routing anchors) to a region.

A backward region starts where the gradient of the routing result appears (a
scatter into a ``[tokens, experts]`` zero tensor at the saved topk indices, the
soft-routing softmax gradients, or an argmax router's score gradient) and
follows the output gradient through its fork into the gate path and the
expert path. Walking on from the fork, each gradient node gets a state from
``BACKWARD_RULES``: forked, permuted, expert gradient or un-permuted. Small
steps then read the region's facts off the states. ``recognize`` documents
the whole scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import torch
import torch.fx as fx

from fsmoe_compiler.ops import (
    ALL_TO_ALL_OPS,
    GATHER_OPS,
    GROUPED_MM_OPS,
    LAYOUT_OPS,
    MATMUL_OPS,
    SCATTER_OPS,
    SHAPE_ONLY_OPS,
    SIGMOID_BACKWARD_OPS,
    SOFTMAX_BACKWARD_OPS,
    TRANSPOSE_OPS,
    WAIT_OPS,
    is_getitem,
    is_op,
    is_opaque,
    overloads,
)
from fsmoe_compiler.passes.graph_utils import (
    ancestors_of_set,
    dim_through_transpose,
    matmul_operands,
    numel,
    prod_key,
    shape,
    shape_keys,
    tensor_inputs,
)
from fsmoe_compiler.passes.recognize_common import (
    COMBINE_OPS,
    DISPATCH_WEIGHTS,
    EXPERT_MATMUL,
    SAME,
    GraphIndex,
    Rule,
    all_to_alls,
    always,
    expert_buffer,
    first_match,
    opaque_gemm_backward_operands,
)
from fsmoe_compiler.passes.region import MoERegion

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------
# states of gradient nodes below a layer's combine fork, in the order a gradient passes them

FORKED = "forked"  # the layer's output gradient after the fork, still in token order
PERMUTED = "permuted"  # permuted into expert space, before any expert matmul
EXPERT_GRAD = "expert gradient"  # after an expert matmul: the experts' input and weight gradients
UNPERMUTED = "un-permuted"  # back in token order: the gradient of the dispatch
STATES = (FORKED, PERMUTED, EXPERT_GRAD, UNPERMUTED)
_ORDER = {st: i for i, st in enumerate(STATES)}


# ----------------------------------------------------------------------------------------------
# gradients and saved routing indices


def _is_tangent(node: fx.Node) -> bool:
    return node.op == "placeholder" and node.name.startswith("tangents")


def gradient_nodes(graph: fx.Graph) -> set[str]:
    """Nodes whose value depends on an incoming gradient (a ``tangents_*`` input of the backward graph).

    Allocations that only borrow a gradient's shape (``new_zeros``) and sizes
    read off it (``sym_size``) carry no gradient and are left out.
    """
    grad: set[str] = set()
    for n in graph.nodes:
        if _is_tangent(n):
            grad.add(n.name)
        elif n.op == "call_function" and n.target not in SHAPE_ONLY_OPS:
            v = n.meta.get("val")
            if isinstance(v, (torch.SymInt, int, float, bool)):
                continue
            if any(a.name in grad for a in n.all_input_nodes):
                grad.add(n.name)
    return grad


def _saved_index(node: fx.Node, grad: frozenset[str]) -> bool:
    """An integer tensor that does not depend on the incoming gradient: saved (or recomputed) routing indices."""
    v = node.meta.get("val")
    return (
        isinstance(v, torch.Tensor)
        and not v.dtype.is_floating_point
        and v.dtype is not torch.bool
        and node.name not in grad
    )


def _permutes(node: fx.Node, grad: frozenset[str]) -> bool:
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


def _permuted_above(node: fx.Node, grad: frozenset[str]) -> bool:
    """``node`` is, or is a view or a chunk reorder of, a gradient permuted by saved routing indices."""
    cur = node
    for _ in range(8):
        if _permutes(cur, grad):
            return True
        source = _chunk_reorder_source(cur, grad)
        if source is not None:
            cur = source
            continue
        gins = [a for a in cur.all_input_nodes if a.name in grad]
        if not _moves_unchanged(cur) or len(gins) != 1:
            return False
        cur = gins[0]
    return False


def _moves_unchanged(node: fx.Node) -> bool:
    """A view or copy, a ``wait_tensor``, or the copy into the output buffer that ends an in-place collective
    (``dist.all_to_all_single(out, inp)`` traces to the functional op, a wait and ``aten.copy(out, waited)``)."""
    if node.target in LAYOUT_OPS or is_op(node, WAIT_OPS):
        return True
    return is_op(node, overloads(aten.copy, aten.copy_)) and len(node.args) > 1 and isinstance(node.args[1], fx.Node) \
        and is_op(node.args[1], WAIT_OPS)


def _chunk_reorder_source(node: fx.Node, grad: frozenset[str]) -> fx.Node | None:
    """The one gradient a ``cat`` of its slices reorders (Megatron's ``sort_chunks_by_idxs``: split by counts,
    concatenate in another order: a permutation of row blocks), else None."""
    if not is_op(node, overloads(aten.cat)) or not node.args or not isinstance(node.args[0], (list, tuple)):
        return None
    sources = set()
    for piece in node.args[0]:
        if not isinstance(piece, fx.Node) or piece.target not in LAYOUT_OPS:
            return None
        gins = [a for a in piece.all_input_nodes if a.name in grad]
        if len(gins) != 1:
            return None
        src = gins[0]
        if is_getitem(src):  # a piece of split_with_sizes
            src = src.args[0]
        sources.add(src)
    return sources.pop() if len(sources) == 1 else None


def _small_gradient(node: fx.Node, limit: int, grad: frozenset[str]) -> bool:
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


def _grad_operand(m: fx.Node, grad: frozenset[str]) -> fx.Node:
    """The gradient operand of a matmul (the first one when both are), or of an opaque GEMM's backward."""
    gemm = opaque_gemm_backward_operands(m, grad)
    if gemm is not None:
        return gemm[0]
    a, b = matmul_operands(m)
    return a if a.name in grad else b


def _is_gemm(node: fx.Node, grad: frozenset[str]) -> bool:
    """An ATen matmul, or an opaque op whose signature is a GEMM's backward (a library's grouped GEMM)."""
    return is_op(node, MATMUL_OPS) or opaque_gemm_backward_operands(node, grad) is not None


def _ungathered_to_experts(node: fx.Node, num_experts: int | None, grad: frozenset[str]) -> bool:
    """``node``'s result (through views) is scattered by saved routing indices into an ``[experts, ...]`` buffer.

    That is the backward of expert weights gathered per token (``weight[indices]``):
    each token's weight gradient goes back to its expert's weight.
    """
    frontier = [node]
    for _ in range(4):
        nxt = []
        for cur in frontier:
            for u in cur.users:
                if (is_op(u, SCATTER_OPS) and any(_saved_index(a, grad) for a in u.all_input_nodes)
                        and (shape(u) or (None,))[0] == num_experts and u.args[0] is not cur):
                    return True
                if u.target in LAYOUT_OPS:
                    nxt.append(u)
        frontier = nxt
    return False


# ----------------------------------------------------------------------------------------------
# anchors: where the routing result's gradient appears


def _topk_backward_anchors(index: GraphIndex, known: list[fx.Node]) -> list[fx.Node]:
    """Gradients of topk: a scatter of a gradient into a zero [tokens, experts] tensor at saved integer indices."""
    grad = index.grad
    anchors = []
    for n in index.graph.nodes:
        if not is_op(n, overloads(aten.scatter, aten.scatter_add)) or n.name not in grad:
            continue
        base, idx = n.args[0], n.args[2]
        if not (isinstance(base, fx.Node) and isinstance(idx, fx.Node)):
            continue
        if base.name in grad and not is_op(base, overloads(aten.new_zeros, aten.zeros, aten.zeros_like, aten.full)):
            continue
        if not _saved_index(idx, grad):
            continue
        if not _score_shaped(n):
            continue
        anchors.append(n)
    return anchors


def _score_shaped(scatter: fx.Node) -> bool:
    """A topk gradient of routing scores: ``[tokens, experts]``, or ``[batch, seq, experts]`` scattered along
    its last dimension (torchtitan's router keeps the batch and sequence dimensions)."""
    rank = len(shape(scatter) or ())
    return rank == 2 or (rank == 3 and isinstance(scatter.args[1], int) and scatter.args[1] % 3 == 2)


def _soft_backward_anchors(index: GraphIndex, known: list[fx.Node]) -> list[fx.Node]:
    """Backward of a softmax over the last dim whose gradient is one half of a matmul pair on one gradient.

    That is the gradient of soft combine weights (``out = combine @ expert_out``:
    one matmul computes the combine weights' gradient, its sibling on the same
    incoming gradient sends it to the experts). Attention's softmax has the same
    shape of backward; it is told apart later, as it reaches no expert matmuls.
    """
    grad = index.grad
    anchors = []
    for n in index.graph.nodes:
        if not is_op(n, SOFTMAX_BACKWARD_OPS) or n.name not in grad:
            continue
        sh = shape(n)
        if not sh or len(sh) != 2 or n.args[2] % len(sh) != len(sh) - 1:
            continue
        cur = n.args[0]
        for _ in range(10):
            if not isinstance(cur, fx.Node) or not (cur.target in LAYOUT_OPS or is_op(cur, MATMUL_OPS)):
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


def _score_backward_anchors(index: GraphIndex, known: list[fx.Node]) -> list[fx.Node]:
    """Softmax/sigmoid gradients of ``[tokens, experts]`` scores unrelated to any topk gradient.

    A router that picks with ``argmax`` (DeepSpeed's top-1) leaves no topk
    gradient: the gates' gradient reaches the score backward through the
    one-hot mask instead. Gates of width 1 (a shared expert's) are not scores.
    """
    known_names = {n.name for n in known}
    out = []
    for n in index.graph.nodes:
        if n.name not in index.grad or n.name in known_names:
            continue
        sh = shape(n)
        if not sh or len(sh) != 2 or not sh[-1] or sh[-1] < 2:
            continue
        if is_op(n, SOFTMAX_BACKWARD_OPS):
            if n.args[2] % 2 != 1:
                continue
        elif not is_op(n, SIGMOID_BACKWARD_OPS):
            continue
        if known_names & (index.ancestors(n.name) | index.descendants(n.name)):
            continue  # part of a topk router (e.g. a softmax over the top-k logits) or of a soft one
        out.append(n)
    return out


#: Anchor kinds and their finders, in order; each finder gets the anchors found before it (``known``):
#: "topk" (the topk gradient), "soft" (the soft combine softmax's gradient), "score" (the score
#: softmax/sigmoid gradient of a router that picks with argmax).
ANCHOR_FINDERS = (
    ("topk", _topk_backward_anchors),
    ("soft", _soft_backward_anchors),
    ("score", _score_backward_anchors),
)


@dataclass
class Anchor:
    """One backward anchor: the node, its kind, the routing dimension it scatters along and the saved indices."""

    node: fx.Node
    kind: str
    dim: int
    index: fx.Node | None  # the saved topk indices ("topk" anchors)
    anc: frozenset[str]
    desc: frozenset[str]


def _anchors(index: GraphIndex) -> list[Anchor]:
    """Every anchor of the graph, in graph order."""
    kinds: dict[str, str] = {}
    known: list[fx.Node] = []
    for kind, finder in ANCHOR_FINDERS:
        found = finder(index, known)
        kinds.update({n.name: kind for n in found})
        known = known + found
    out = []
    for name in sorted(kinds, key=index.pos.__getitem__):
        s = index.by_name[name]
        dim, idx = (s.args[1] % len(shape(s)), s.args[2]) if kinds[name] == "topk" else (1, None)
        out.append(Anchor(node=s, kind=kinds[name], dim=dim, index=idx, anc=index.ancestors(name),
                          desc=index.descendants(name)))
    return out


def find_backward_regions(gm: fx.GraphModule, forward_regions: list[MoERegion] | None = None) -> list[MoERegion]:
    """MoE regions of a backward graph in layer order; ``forward_regions``, if given, name each region's layer."""
    index = GraphIndex.build(gm, gradient_nodes(gm.graph))
    found: list[tuple[MoERegion, str | None]] = []
    seen: set[tuple] = set()
    anchors = _anchors(index)
    for anchor in anchors:
        result = _backward_region(index, anchor, {a.node.name for a in anchors} - {anchor.node.name})
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
                if r.top_k is None and f.top_k is not None and f.router != "expert-choice":
                    r.top_k = f.top_k  # argmax routers leave no topk gradient to read k from
                    r.notes.append("top-k from the forward graph (an argmax router leaves no topk gradient)")
                break


# ----------------------------------------------------------------------------------------------
# one anchor's layer: the fork, the entry and the sizes read before the walk


def _idom_chain(dg: nx.DiGraph, target: str, keep: set[str] | frozenset[str]) -> list[str]:
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


def _leads_to_matmul(index: GraphIndex, start: str, avoid: frozenset[str]) -> bool:
    """A matmul (or an opaque GEMM's backward) at or below ``start`` outside ``avoid``."""
    return any(_is_gemm(index.by_name[d], index.grad) for d in ({start} | index.descendants(start)) if d not in avoid)


def _fork(index: GraphIndex, anchor: Anchor) -> fx.Node | None:
    """The dominator of the anchor that also leads to matmuls elsewhere: where the gate and expert gradients split.

    Gradients smaller than the score matrix's short side (an auxiliary loss's) do not count, nor do the
    gradients of routing tensors that left the forward graph as outputs (``_side_tangents``).
    """
    s = anchor.node
    smallest = min((d for d in shape(s) if d is not None), default=1)
    side = _side_tangents(index, anchor)
    keep = {n for n in anchor.anc & index.grad if (numel(index.by_name[n]) or smallest) >= smallest
            and n not in side} | {s.name}
    for d in _idom_chain(index.dg, s.name, keep):
        if _leads_to_matmul(index, d, anchor.anc | anchor.desc):
            return index.by_name[d]
    return None


def _nearest_split(index: GraphIndex, anchor: Anchor) -> fx.Node | None:
    """The fork of an argmax router's score gradient when no dominator shows it: the nearest gradient above the
    anchor that feeds both the anchor and, through another user, matmuls outside the anchor's own.

    DeepSpeed's gate adds its auxiliary loss's gradient (``mean(gates, dim=0)``: one value per expert, broadcast
    back over the tokens) to the gates' gradient from the combine just above the score gradient, and both come
    from the loss's gradient: the two paths meet only at the loss, so the anchor has no dominator that leads to
    the experts. The gradient that splits into the gates' and the experts' gradients is still the nearest node
    above the anchor with one user on the way to the anchor and another leading to matmuls elsewhere.
    """
    s = anchor.node
    smallest = min((d for d in shape(s) if d is not None), default=1)
    avoid = anchor.anc | anchor.desc | {s.name}
    best = None
    for name in anchor.anc & index.grad:
        node = index.by_name[name]
        if node.op != "call_function" or (numel(node) or 0) <= smallest:
            continue
        to_anchor = [u for u in node.users if u.name in anchor.anc or u is s]
        elsewhere = [u for u in node.users if u.name not in avoid and u.name in index.grad]
        if to_anchor and any(_leads_to_matmul(index, u.name, avoid) for u in elsewhere):
            if best is None or index.pos[name] > index.pos[best.name]:
                best = node
    return best


def _side_tangents(index: GraphIndex, anchor: Anchor) -> set[str]:
    """Incoming gradients of routing tensors that left the forward graph as outputs, and what only they feed.

    A layer that keeps its routing probabilities on the module (Megatron's dispatcher stores them on ``self``)
    makes them an output of the forward graph, so the backward graph has a gradient input for them that joins
    the gate's gradient. Such a tangent reaches the anchor but no matmul other than the router's own (below
    the anchor); it is not the layer's output gradient and must not hide the fork.
    """
    side = {t for t in anchor.anc if _is_tangent(index.by_name[t])
            and not _leads_to_matmul(index, t, anchor.desc | {anchor.node.name})}
    if not side:
        return side
    out = set(side)
    for n in index.in_order(set().union(*(index.descendants(t) for t in side)) & anchor.anc):
        gins = [a.name for a in index.by_name[n].all_input_nodes if a.name in index.grad]
        if gins and all(g in out for g in gins):
            out.add(n)
    return out


def _entry_chain(index: GraphIndex, fork: fx.Node) -> list[str]:
    """The fork and, above it, the gradient of the layer output and the views/permutations between the two."""
    chain = [fork.name]
    for d in _idom_chain(index.dg, fork.name, index.grad | {fork.name}):
        node = index.by_name[d]
        if not (_moves_unchanged(node) or node.target in GATHER_OPS or is_op(node, ALL_TO_ALL_OPS)
                or _is_tangent(node)):
            break
        chain.append(d)
        users = [u for u in node.users if u.name in index.grad]
        if len(users) > 1 and not _pieces_of(index, users, fork):
            break
    return chain


def _entry_gradient(index: GraphIndex, chain: list[str]) -> set[str]:
    """The gradient the entry chain hangs from when it is computed in this graph (not a tangent), else nothing.

    Inside a model the layer output's gradient is a sum (the residual's and the
    next layer's): the chain of views stops below it, but a shared expert's
    gradient branches off it too. It is no part of the region (the residual
    reads it); only the shared expert's search starts from it.
    """
    top = index.by_name[chain[-1]]
    if _is_tangent(top):
        return set()
    above = _idom_chain(index.dg, top.name, index.grad | {top.name})
    return {above[0]} if above else set()


def _pieces_of(index: GraphIndex, users: list[fx.Node], fork: fx.Node) -> bool:
    """Every one of ``users`` is a slice (or a split) on the way to ``fork``: a chunk reorder, not a branch."""
    return all(u.target in LAYOUT_OPS and (u is fork or fork.name in index.descendants(u.name)) for u in users)


def _between(index: GraphIndex, chain: list[str]) -> list[str]:
    """Nodes between consecutive nodes of the entry chain that are not in it (the pieces of a chunk reorder)."""
    out: set[str] = set()
    for below, above in zip(chain, chain[1:]):
        out |= (index.descendants(above) & index.ancestors(below)) - set(chain)
    return index.in_order(out)


def _scatter_over_tokens(s: fx.Node, dim: int) -> bool | None:
    """Whether the topk gradient ``s`` scatters along the token dimension (expert choice) or the expert one.

    The score softmax normalises over the experts, so following the scatter's
    dimension down through transposes and shape-keeping ops to the softmax
    backward tells which it is, whatever the sizes (with E == T they say
    nothing). None when no softmax backward is reached (a sigmoid router).
    """
    cur, d = s, dim
    for _ in range(12):
        users = [u for u in cur.users if u.op == "call_function" and u.args and u.args[0] is cur]
        soft = [u for u in users if is_op(u, SOFTMAX_BACKWARD_OPS)]
        if soft:
            rank = len(shape(soft[0]) or ())
            return None if rank == 0 else d % rank != soft[0].args[2] % rank
        moved = [u for u in users if is_op(u, TRANSPOSE_OPS)]
        same = [u for u in users if not is_op(u, TRANSPOSE_OPS) and shape(u) == shape(cur) and shape(u) is not None]
        if len(moved) + len(same) != 1:
            return None
        if moved:
            d = dim_through_transpose(moved[0], d, upward=False)
            if d is None:
                return None
            cur = moved[0]
        else:
            cur = same[0]
    return None


@dataclass
class Layer:
    """What is known of one anchor's layer before the walk: the fork, the entry chain and the sizes."""

    anchor: Anchor
    fork: fx.Node
    chain: list[str]
    hidden: int | None
    tokens: object  # an int, or a sympy expression under dynamic shapes
    expert_choice: bool
    num_experts: int | None
    between: list[str] = field(default_factory=list)  # entry-chain nodes between dominators (chunk pieces)


def _layer(index: GraphIndex, anchor: Anchor) -> Layer | None:
    """The fork of the anchor's layer and the sizes read at its entry; None without a fork."""
    fork = _fork(index, anchor) or (_nearest_split(index, anchor) if anchor.kind == "score" else None)
    if fork is None:
        return None
    chain = _entry_chain(index, fork)
    entry_keys = shape_keys(index.by_name[chain[-1]]) or (None,)
    hidden = entry_keys[-1] if isinstance(entry_keys[-1], int) else None
    tokens = prod_key(entry_keys[:-1])
    s, dim, soft = anchor.node, anchor.dim, anchor.kind == "soft"
    s_keys = shape_keys(s)
    others = prod_key(k for i, k in enumerate(s_keys) if i != dim)  # the other side: [B, S] of 3-D scores
    # topk over experts scatters along the expert dimension; expert choice along the token dimension
    expert_choice = None if soft else _scatter_over_tokens(s, dim)
    if expert_choice is None:  # no softmax backward to read the expert dimension from: compare sizes
        expert_choice = not soft and tokens is not None and s_keys[dim] == tokens and others != tokens
    if tokens is None:
        tokens = others
    num_experts = (others if isinstance(others, int) else None) if expert_choice else shape(s)[dim]
    return Layer(anchor=anchor, fork=fork, chain=chain, hidden=hidden, tokens=tokens,
                 expert_choice=expert_choice, num_experts=num_experts, between=_between(index, chain))


# ----------------------------------------------------------------------------------------------
# the walk from the fork


def _has_dim(node: fx.Node, size: object, anywhere: bool = False) -> bool:
    """``size`` (an int or a symbolic size) is a leading (non-feature) dimension of ``node``: a token dimension.

    With ``anywhere`` the last dimension counts too.
    """
    s = shape_keys(node)
    dims = (s or ()) if anywhere else (s or ())[:-1]
    return size is not None and any(d == size for d in dims)


def _combine_matmul_pair(n: fx.Node, g_op: fx.Node, anc_s: frozenset[str]) -> bool:
    """``n`` is a bmm whose gradient input also feeds a bmm towards the gate gradient.

    The backward of ``out = combine_weights @ expert_out`` is such a pair: one
    bmm sends the gradient into expert space, its sibling computes the gradient
    of the combine weights, which flows into the router.
    """
    if not is_op(n, overloads(aten.bmm)):
        return False
    return any(u is not n and is_op(u, overloads(aten.bmm)) and u.name in anc_s for u in g_op.users)


def _expert_side_matmul_use(index: GraphIndex, n: fx.Node, other: fx.Node, desc_s: frozenset[str]) -> str:
    """What a matmul of an expert-side gradient with a non-gradient operand computes, from where its result goes.

    Returns "expert" (an expert's input or weight gradient), "dispatch" (the
    dispatch's gradient: a dispatch mask or weights times the gradient, back in
    token order) or "dispatch-weights" (the gradient of soft dispatch weights,
    which flows into the router's softmax backward).

    Decided by data flow, not by sizes (a dimension equal to the token count is
    ambiguous when hidden, E*C or E equals it):

    * a result that never meets the router's gradient (the descendants of the
      anchor) is a weight gradient: it only flows to the graph outputs;
    * otherwise let J be the first node where it meets the router's gradient
      (the token input's gradient, or the score gradient). A result that on its
      way to J passes through another matmul or a permutation by saved routing
      indices (an all-to-all included) is an expert's input gradient: the
      dispatch's gradient still lies ahead of it;
    * one that passes through a softmax/sigmoid backward is the gradient of
      soft dispatch weights, on its way to the router's scores;
    * one that reaches J through views, casts and sums only is the dispatch's
      gradient.
    """
    if other.name in index.grad:
        return "expert"
    below = index.descendants(n.name)
    meets = [d for d in below if d in desc_s and index.by_name[d].op == "call_function"]
    if not meets:
        return "expert"
    join = min(meets, key=index.pos.__getitem__)
    between = (below & index.ancestors(join)) - {n.name}
    ops = [index.by_name[b] for b in between]
    if any(is_op(b, MATMUL_OPS) or _permutes(b, index.grad) for b in ops):
        return "expert"
    if any(is_op(b, SOFTMAX_BACKWARD_OPS) or is_op(b, SIGMOID_BACKWARD_OPS) for b in ops):
        return "dispatch-weights"
    if is_op(index.by_name[join], SOFTMAX_BACKWARD_OPS) or is_op(index.by_name[join], SIGMOID_BACKWARD_OPS):
        return "dispatch-weights"
    return "dispatch"


@dataclass
class BackwardSeen:
    """What the backward walk sees at one gradient node: its gradient inputs' states, and its layer."""

    node: fx.Node
    index: GraphIndex
    layer: Layer
    states: list[str | None]  # the state of each gradient input, None where it has none (another gradient)

    @cached_property
    def furthest(self) -> str:
        """The state furthest along of its gradient inputs."""
        return max((st for st in self.states if st is not None), key=_ORDER.__getitem__)

    @cached_property
    def is_matmul(self) -> bool:
        return is_op(self.node, MATMUL_OPS)

    @cached_property
    def operands(self) -> tuple[fx.Node, fx.Node]:
        """A matmul's (gradient operand, other operand)."""
        a, b = matmul_operands(self.node)
        g_op = a if a.name in self.index.grad else b
        return g_op, (b if g_op is a else a)

    @cached_property
    def use(self) -> str:
        """What a matmul on an expert-side gradient computes (``_expert_side_matmul_use``)."""
        return _expert_side_matmul_use(self.index, self.node, self.operands[1], self.layer.anchor.desc)


def _meets_other_gradient(s: BackwardSeen) -> bool:
    return None in s.states


def _forked(s: BackwardSeen) -> bool:
    return s.furthest == FORKED


def _forked_matmul_into_experts(s: BackwardSeen) -> bool:
    if not (s.is_matmul and _forked(s)):
        return False
    g_op, tokens = s.operands[0], s.layer.tokens
    leaves = _has_dim(g_op, tokens) and not _has_dim(s.node, tokens)
    return leaves or _combine_matmul_pair(s.node, g_op, s.layer.anchor.anc)


def _per_token_weight_pair(s: BackwardSeen) -> bool:
    """A bmm of a gradient with expert weights gathered per token, or that weight's gradient.

    Told by data flow: of the bmms on the same gradient operand, one's result goes
    back to the experts' weights (``_ungathered_to_experts``).
    """
    if not (s.is_matmul and is_op(s.node, overloads(aten.bmm))):
        return False
    g_op = s.operands[0]
    return any(is_op(u, overloads(aten.bmm)) and _ungathered_to_experts(u, s.layer.num_experts, s.index.grad)
               for u in g_op.users)


def _into_opaque_gemm(s: BackwardSeen) -> bool:
    return s.furthest != UNPERMUTED and opaque_gemm_backward_operands(s.node, s.index.grad) is not None


def _forked_matmul(s: BackwardSeen) -> bool:
    return s.is_matmul and _forked(s)


def _dispatch_matmul(s: BackwardSeen) -> bool:
    return s.is_matmul and s.use == "dispatch"


def _dispatch_weights_matmul(s: BackwardSeen) -> bool:
    return s.is_matmul and s.use == "dispatch-weights"


def _matmul_after_unpermute(s: BackwardSeen) -> bool:
    return s.is_matmul and s.furthest == UNPERMUTED


def _matmul(s: BackwardSeen) -> bool:
    return s.is_matmul


def _forked_permute(s: BackwardSeen) -> bool:
    return _forked(s) and _permutes(s.node, s.index.grad)


def _forked_combine_op(s: BackwardSeen) -> bool:
    return _forked(s) and s.node.target in COMBINE_OPS


def _expert_side_permute(s: BackwardSeen) -> bool:
    return _ORDER[s.furthest] >= _ORDER[EXPERT_GRAD] and _permutes(s.node, s.index.grad)


#: The backward transition table, evaluated in order at each gradient node fed by a labelled node.
BACKWARD_RULES: tuple[Rule, ...] = (
    Rule("meets another gradient (router, shared expert, residual): the region ends", _meets_other_gradient, None),
    Rule("gradient times expert weights gathered per token, or their gradient: an expert matmul",
         _per_token_weight_pair, EXPERT_GRAD, mark=EXPERT_MATMUL),
    Rule("gradient into an opaque GEMM's backward (a library's grouped GEMM): an expert matmul",
         _into_opaque_gemm, EXPERT_GRAD, mark=EXPERT_MATMUL),
    Rule("token-order gradient through a matmul into expert space (or the combine bmm pair)",
         _forked_matmul_into_experts, PERMUTED),
    Rule("token-order gradient through any other matmul", _forked_matmul, None),
    Rule("dispatch mask or weights times the expert-side gradient: back to token order", _dispatch_matmul, UNPERMUTED),
    Rule("gradient @ tokens^T: the gradient of soft dispatch weights", _dispatch_weights_matmul, None,
         mark=DISPATCH_WEIGHTS),
    Rule("matmul of a gradient already back in token order", _matmul_after_unpermute, None),
    Rule("an expert's input or weight gradient", _matmul, EXPERT_GRAD, mark=EXPERT_MATMUL),
    Rule("token-order gradient permuted by saved indices or an all-to-all", _forked_permute, PERMUTED),
    Rule("token-order gradient through an op a combine is made of", _forked_combine_op, FORKED),
    Rule("token-order gradient into any other op", _forked, None),
    Rule("expert-side gradient indexed by the saved routing or sent back: the dispatch's gradient",
         _expert_side_permute, UNPERMUTED),
    Rule("any other op keeps its input's state", always, SAME),
)


@dataclass
class BackwardWalk:
    """The states the walk gave, the expert matmuls (with depth) and the soft dispatch weights' gradients it met."""

    state: dict[str, str]
    expert_mms: list[fx.Node] = field(default_factory=list)
    dispatch_weight_grads: list[fx.Node] = field(default_factory=list)
    depth: dict[str, int] = field(default_factory=dict)

    def of(self, st: str) -> list[str]:
        """Nodes labelled ``st``, in the order they were labelled (graph order)."""
        return [name for name, s in self.state.items() if s == st]


def _walk_backward(index: GraphIndex, layer: Layer) -> BackwardWalk:
    """Label the gradient nodes below the fork, in graph order, by ``BACKWARD_RULES``."""
    fork, s = layer.fork, layer.anchor.node
    walk = BackwardWalk(state={fork.name: PERMUTED if _permuted_above(fork, index.grad) else FORKED})
    for n in index.after(fork):
        if n.op != "call_function" or n.name not in index.grad or n.name in layer.anchor.desc or n is s:
            continue
        ins = [a for a in n.all_input_nodes if a.name in index.grad]
        if not any(a.name in walk.state for a in ins):
            continue
        seen = BackwardSeen(node=n, index=index, layer=layer, states=[walk.state.get(a.name) for a in ins])
        rule = first_match(BACKWARD_RULES, seen)
        if rule.mark == DISPATCH_WEIGHTS:
            walk.dispatch_weight_grads.append(n)
        new = seen.furthest if rule.to == SAME else rule.to
        if new is None:
            continue
        walk.state[n.name] = new
        d_in = max((walk.depth.get(a.name, 0) for a in ins), default=0)
        if rule.mark == EXPERT_MATMUL:
            walk.expert_mms.append(n)
            walk.depth[n.name] = d_in + 1
        else:
            walk.depth.setdefault(n.name, d_in)
    return walk


# ----------------------------------------------------------------------------------------------
# what the states say: the region's facts, one small step each


def _backward_region(index: GraphIndex, anchor: Anchor, others: set[str] = frozenset()
                     ) -> tuple[MoERegion, str | None] | None:
    """The region around one anchor and the name of the saved topk indices it reads; None if it is not MoE.
    ``others``: the other anchors of the graph (a branch that leads to one is another layer's, not a shared
    expert's: token ranges of one layer hang from one output gradient)."""
    layer = _layer(index, anchor)
    if layer is None:
        return None
    # an anchor below this one is an earlier layer's, which every gradient of this layer flows on to: only the
    # anchors beside it (other token ranges of the layer) tell another layer's branch from a shared expert's
    others = {o for o in others if o not in anchor.desc}
    walk = _walk_backward(index, layer)
    combine = _take_combine(index, walk)
    a2a, a2a_bytes = all_to_alls(index, set(walk.state) | set(layer.chain))  # the chain: a fork past the all-to-all
    if not _is_moe(index, walk, a2a):
        return None
    _drop_gate_only(index, layer, walk)
    combine = {c for c in combine | set(layer.chain) | set(layer.between) if index.by_name[c].op == "call_function"}
    router = _router_nodes(index, layer, walk, combine)
    num_experts = _soft_num_experts(index, layer, walk) if anchor.kind == "soft" else layer.num_experts
    capacity, buffer = _capacity(index, layer, walk, num_experts)
    notes = ["capacity is symbolic (dynamic shapes)"] if buffer and capacity is None else []
    kind = _router_kind(index, layer, router)
    if kind == "unknown":
        notes.append("no softmax/sigmoid backward after the topk gradient")
    opaque_gemms = sorted({str(m.target) for m in walk.expert_mms if is_opaque(m)})
    if opaque_gemms:
        notes.append(f"expert GEMM gradients in opaque op(s) {opaque_gemms}, told by signature (a gradient times a "
                     "saved weight)")
    heads = set(layer.chain) | _entry_gradient(index, layer.chain) | _output_gradient_views(index, layer.chain, others)
    shared = _shared_backward_nodes(index, heads, set(walk.state) | combine | router, others)
    nodes = {
        "router": index.in_order(router),
        "dispatch": index.in_order(walk.of(UNPERMUTED)),
        "expert": index.in_order(walk.of(EXPERT_GRAD)),
        "combine": index.in_order(combine | set(walk.of(PERMUTED))),
        "shared_expert": index.in_order(shared),
    }
    saved = _saved_root(anchor.index) if anchor.index is not None else _score_gate_weight(index, anchor)
    return MoERegion(
        layer=0, graph="backward", router=kind, num_experts=num_experts,
        top_k=None if (layer.expert_choice or anchor.kind == "soft") else _top_k(anchor),
        capacity=capacity, dropless=not buffer,
        tokens=layer.tokens if isinstance(layer.tokens, int) else None, hidden=layer.hidden,
        ffn_hidden=_ffn_hidden(index, walk, layer.hidden), nodes=nodes, all_to_all=a2a, a2a_bytes=a2a_bytes,
        notes=notes,
    ), (saved.name if saved is not None else None)


def _top_k(anchor: Anchor) -> int | None:
    """The k of a topk anchor: the saved indices' size along the dimension it scatters along."""
    return (shape(anchor.index) or (None, None))[anchor.dim] if anchor.index is not None else None


def _capacity(index: GraphIndex, layer: Layer, walk: BackwardWalk,
              num_experts: int | None) -> tuple[int | None, bool]:
    """``(capacity, buffer)``: expert choice's k, else the first ``[E, C, M]`` permuted gradient (C may be symbolic)."""
    if layer.expert_choice:
        return _top_k(layer.anchor), True
    # the gradient may be in expert order above the fork already (the gate weights applied inside the experts)
    above = [n for n in reversed(layer.chain[1:] + layer.between) if _permuted_above(index.by_name[n], index.grad)]
    return expert_buffer(index, above + walk.of(PERMUTED), num_experts, layer.hidden)


def _take_combine(index: GraphIndex, walk: BackwardWalk) -> set[str]:
    """Take the forked (token-order) gradient out of the states: the combine's, where it leads to the experts."""
    feeds = ancestors_of_set(index.dg, [name for name, st in walk.state.items() if st != FORKED])
    for name in [n for n, st in walk.state.items() if st == FORKED and n not in feeds]:
        del walk.state[name]
    combine = set(walk.of(FORKED))
    for name in combine:
        del walk.state[name]
    return combine


def _is_moe(index: GraphIndex, walk: BackwardWalk, a2a: list[str]) -> bool:
    """Expert matmuls in two or more lanes, batched over an expert dimension, or behind an all-to-all."""
    if not walk.expert_mms:
        return False
    first = [m for m in walk.expert_mms if walk.depth[m.name] == 1]
    lanes = len({_grad_operand(m, index.grad).name for m in first})
    batched = [m for m in walk.expert_mms if is_op(m, GROUPED_MM_OPS) or len(shape(m) or ()) == 3
               or len(shape((opaque_gemm_backward_operands(m, index.grad) or (None, None))[1]) or ()) == 3]
    return lanes >= 2 or bool(batched) or bool(a2a)


def _drop_gate_only(index: GraphIndex, layer: Layer, walk: BackwardWalk) -> None:
    """Permuted gradient that only feeds the gate gradient belongs to the router's backward: unlabel it."""
    feeds_experts = ancestors_of_set(index.dg, [m.name for m in walk.expert_mms])
    for name in [n for n in walk.state if n in layer.anchor.anc and n not in feeds_experts]:
        del walk.state[name]


def _router_nodes(index: GraphIndex, layer: Layer, walk: BackwardWalk, combine: set[str]) -> set[str]:
    """The router's backward: the gates' gradient from the fork to the anchor and on below it, not otherwise labelled.

    For soft routing also the dispatch weights' gradient.
    """
    anchor = layer.anchor
    router = _gate_gradient_nodes(index, anchor, layer.fork) - set(walk.state) - combine
    if anchor.kind == "score":
        router.add(anchor.node.name)
    if anchor.kind == "soft":
        router |= _soft_dispatch_weight_backward(index, anchor.node, walk.dispatch_weight_grads, router,
                                                 set(walk.state) | combine)
    return router


def _router_kind(index: GraphIndex, layer: Layer, router: set[str]) -> str:
    """soft, expert-choice, softmax-topk or sigmoid-topk (by the score backward among its nodes), or unknown."""
    if layer.anchor.kind == "soft":
        return "soft"
    if layer.expert_choice:
        return "expert-choice"
    if any(is_op(index.by_name[n], SOFTMAX_BACKWARD_OPS) for n in router):
        return "softmax-topk"
    if any(is_op(index.by_name[n], SIGMOID_BACKWARD_OPS) for n in router):
        return "sigmoid-topk"
    return "unknown"


def _soft_num_experts(index: GraphIndex, layer: Layer, walk: BackwardWalk) -> int | None:
    """Soft routing's experts: the first ``[E, slots, M]`` gradient buffer (before any all-to-all)."""
    for name in index.in_order(walk.of(PERMUTED)):
        sk = shape_keys(index.by_name[name])
        if sk and len(sk) == 3 and sk[2] == layer.hidden and isinstance(sk[0], int) and sk[0] > 1:
            return sk[0]
    return None


def _ffn_hidden(index: GraphIndex, walk: BackwardWalk, hidden: int | None) -> int | None:
    """The experts' inner width: the output width of the first expert matmul that maps ``hidden`` to another width."""
    for m in sorted(walk.expert_mms, key=lambda m: index.pos[m.name]):
        gemm = opaque_gemm_backward_operands(m, index.grad)
        if gemm is not None:  # gradient [..., N] with a weight [E, K, N]: K is the other width
            pair, width = shape(gemm[1])[-2:], (shape(gemm[0]) or (None,))[-1]
            if width == hidden and width in pair and pair[0] != pair[1]:
                return pair[0] if pair[1] == width else pair[1]
            continue
        g = _grad_operand(m, index.grad)
        gs, ms_ = shape(g), shape(m)
        if gs and ms_ and len(gs) >= 2 and matmul_operands(m)[1] is g and matmul_operands(m)[0] is not g:
            gs, ms_ = gs[:-2] + gs[-1:] + gs[-2:-1], ms_[:-2] + ms_[-1:] + ms_[-2:-1]  # weights @ column: width is -2
        if gs and ms_ and gs[-1] == hidden and ms_[-1] not in (hidden, None) and _rows_match(gs, ms_):
            return ms_[-1]
    return None


def _rows_match(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and a[:-1] == b[:-1]


def _score_gate_weight(index: GraphIndex, anchor: Anchor) -> fx.Node | None:
    """The saved gate weight an argmax router's score gradient is multiplied with (``grad @ W^T``, the gate
    input's gradient): the saved tensor that ties a "score" anchor, which reads no saved topk indices, to its
    forward layer (the weight's forward node is in that layer's router)."""
    if anchor.kind != "score":
        return None
    for u in anchor.node.users:
        if is_op(u, MATMUL_OPS) and matmul_operands(u)[0] is anchor.node:
            root = _saved_root(matmul_operands(u)[1])
            if root is not None:
                return root
    return None


def _saved_root(node: fx.Node) -> fx.Node | None:
    """The backward input (a saved forward tensor) an index tensor is a view of."""
    cur = node
    for _ in range(10):
        if cur.op == "placeholder":
            return cur
        ins = tensor_inputs(cur)
        if cur.target not in LAYOUT_OPS or not ins:
            return None
        cur = ins[0]
    return None


def _gate_gradient_nodes(index: GraphIndex, anchor: Anchor, fork: fx.Node) -> set[str]:
    """The gates' gradient from the fork to the anchor, and everything below it up to where other gradients join."""
    s = anchor.node
    upstream = (anchor.anc & index.grad) - index.ancestors(fork.name) - {fork.name}
    below: set[str] = set()
    limit = min((d for d in (shape(s) or ()) if d is not None), default=2)
    for n in sorted(anchor.desc, key=index.pos.__getitem__):
        node = index.by_name[n]
        if node.op != "call_function":
            continue
        gins = [a for a in node.all_input_nodes if a.name in index.grad]
        ours = [a for a in gins if a.name in below or a.name == s.name or a.name in upstream]
        if not ours or any(a not in ours and not _small_gradient(a, limit, index.grad) for a in gins):
            continue
        below.add(n)
    return {n for n in upstream | below | {s.name} if index.by_name[n].op == "call_function"}


def _until_join(index: GraphIndex, start: fx.Node, stop: set[str]) -> set[str]:
    """Gradient nodes fed only by ``start`` and each other, in graph order: a branch up to where it meets others."""
    out = {start.name}
    frontier = list(start.users)
    while frontier:
        n = frontier.pop(0)
        if n.name in out or n.name in stop or n.name not in index.grad or n.op != "call_function":
            continue
        if any(a.name in index.grad and a.name not in out for a in n.all_input_nodes):
            continue
        out.add(n.name)
        frontier.extend(n.users)
    return out


def _soft_dispatch_weight_backward(index: GraphIndex, s: fx.Node, dispatch_weight_grads: list[fx.Node],
                                   router_bwd: set[str], taken: set[str]) -> set[str]:
    """Router work of soft routing's backward besides the combine softmax's: the dispatch weights' gradient.

    That is each ``gradient @ tokens^T`` matmul, the token-softmax backward below
    it, and, where it meets the combine softmax's gradient, on to the gate's
    matmuls, up to where other gradients join.
    """
    grad = index.grad
    out = set(router_bwd) | {m.name for m in dispatch_weight_grads}
    for m in dispatch_weight_grads:
        out |= _until_join(index, m, taken)
    limit = min((d for d in (shape(s) or ()) if d is not None), default=2)
    for n in index.graph.nodes:
        if n.name in out or n.name not in grad or n.op != "call_function" or index.pos[n.name] < index.pos[s.name]:
            continue
        gins = [a for a in n.all_input_nodes if a.name in grad]
        if any(a.name in out for a in gins) and all(a.name in out or _small_gradient(a, limit, grad) for a in gins):
            out.add(n.name)
    return out


def _output_gradient_views(index: GraphIndex, chain: list[str], others: set[str] = frozenset()) -> set[str]:
    """Views of the layer's output gradient beside the entry chain, when that gradient is computed (not a tangent).

    In a model the layer's output gradient comes from later layers (a
    residual's gradient); the routed and the shared expert each take their
    own view of it (torchtitan adds the shared expert on ``[B, S, D]``). The
    gradient itself is the residual's, so it stays out of the layer. A view that leads to another anchor in
    ``others`` is another layer's (the slice of a token range's gradient beside this range's), not a shared
    expert's.
    """
    top = index.by_name[chain[-1]]
    gins = [a for a in top.all_input_nodes if a.name in index.grad]
    if top.target not in LAYOUT_OPS or len(gins) != 1:
        return set()
    out = gins[0]
    return {u.name for u in out.users if u.target in LAYOUT_OPS and u.name not in chain
            and [a for a in u.all_input_nodes if a.name in index.grad] == [out]
            and not any(o in index.descendants(u.name) for o in others)}


def _shared_backward_nodes(index: GraphIndex, chain: set[str], taken: set[str],
                           others: set[str] = frozenset()) -> set[str]:
    """Gradient nodes of a dense expert fed only by the layer's output gradient, up to where they meet other gradients.

    Connected pieces without a matmul (e.g. an auxiliary loss's gradient) are dropped, and so are pieces that
    reach another anchor in ``others`` (another layer's routing gradient).
    """
    branch: set[str] = set()
    feeds_other = set().union(*(index.ancestors(o) for o in others)) if others else set()
    for n in index.graph.nodes:
        if n.name not in index.grad or n.name in taken or n.name in chain or n.op != "call_function" \
                or n.name in feeds_other:  # another token range's gradient slice and what it feeds
            continue
        gins = [a for a in n.all_input_nodes if a.name in index.grad]
        if gins and all(a.name in chain or a.name in branch for a in gins):
            branch.add(n.name)
    out: set[str] = set()
    sub = nx.Graph()
    sub.add_nodes_from(branch)
    for name in branch:
        for a in index.by_name[name].all_input_nodes:
            if a.name in branch:
                sub.add_edge(a.name, name)
    for comp in nx.connected_components(sub):
        if any(o in comp or o in index.descendants(c) for c in comp for o in others):
            continue
        if any(is_op(index.by_name[c], MATMUL_OPS) for c in comp):
            out |= comp
    return out

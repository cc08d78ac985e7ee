"""Recognition in the backward graph: from the topk gradient (or soft-routing anchors) to a region.

A backward region starts where the gradient of the routing result appears (a
scatter into a ``[tokens, experts]`` zero tensor at the saved topk indices, or
the soft-routing softmax gradients) and follows the output gradient through
its fork into the gate path and the expert path. ``recognize`` documents the
whole scheme.
"""

from __future__ import annotations


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
    is_op,
    overloads,
)
from fsmoe_compiler.passes.graph_utils import (
    ancestors_of_set,
    dim_through_transpose,
    in_order,
    matmul_operands,
    nbytes,
    numel,
    prod_key,
    shape,
    shape_keys,
    tensor_inputs,
    to_digraph,
)

aten = torch.ops.aten

from fsmoe_compiler.passes.recognize_common import COMBINE_OPS
from fsmoe_compiler.passes.region import MoERegion

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
        elif n.op == "call_function" and n.target not in SHAPE_ONLY_OPS:
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
        if cur.target not in LAYOUT_OPS or len(gins) != 1:
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


def _expert_side_matmul_use(n: fx.Node, other: fx.Node, grad: set[str], dg: nx.DiGraph, by_name,
                            desc_s: set[str], pos: dict[str, int]) -> str:
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
    if other.name in grad:
        return "expert"
    below = nx.descendants(dg, n.name)
    meets = [d for d in below if d in desc_s and by_name[d].op == "call_function"]
    if not meets:
        return "expert"
    join = min(meets, key=pos.__getitem__)
    between = (below & nx.ancestors(dg, join)) - {n.name}
    ops = [by_name[b] for b in between]
    if any(is_op(b, MATMUL_OPS) or _permutes(b, grad) for b in ops):
        return "expert"
    if any(is_op(b, SOFTMAX_BACKWARD_OPS) or is_op(b, SIGMOID_BACKWARD_OPS) for b in ops):
        return "dispatch-weights"
    if is_op(by_name[join], SOFTMAX_BACKWARD_OPS) or is_op(by_name[join], SIGMOID_BACKWARD_OPS):
        return "dispatch-weights"
    return "dispatch"


def find_backward_regions(gm: fx.GraphModule, forward_regions: list[MoERegion] | None = None) -> list[MoERegion]:
    graph = gm.graph
    dg = to_digraph(graph)
    by_name = {n.name: n for n in graph.nodes}
    grad = _gradient_nodes(graph)
    pos = {n.name: i for i, n in enumerate(graph.nodes)}
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
        if not (node.target in LAYOUT_OPS or node.target in GATHER_OPS or is_op(node, ALL_TO_ALL_OPS)
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
    expert_choice = None if soft else _scatter_over_tokens(s, dim)
    if expert_choice is None:  # no softmax backward to read the expert dimension from: compare sizes
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
            else:
                use = _expert_side_matmul_use(n, other, grad, dg, by_name, desc_s, pos)
                if use == "dispatch":
                    new = U  # dispatch mask^T @ gradient: back to token order
                elif use == "dispatch-weights":
                    dispatch_weight_grads.append(n)  # gradient @ tokens^T: the gradient of soft dispatch weights
                    new = None
                elif rank == _RANK[U]:
                    new = None  # already back in token order
                else:
                    new = G
                    expert_mms.append(n)
                    depth[n.name] = d_in + 1
        elif rank == _RANK[F]:
            if _permutes(n, grad):
                new = P
            elif n.target in COMBINE_OPS:
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
        if cur.target not in LAYOUT_OPS or not ins:
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

"""Split each expert-parallel MoE region into r chunks, along the capacity or the hidden dimension.

For a region with all-to-alls and a requested degree ``r = ctx.degrees[layer] > 1``
the pass takes the part of the region between its all-to-alls and its experts
(dispatch all-to-all -> expert compute -> combine all-to-all; in the backward
graph the reverse, weight gradients included), finds how each tensor of it is
split by propagating layouts through per-op rules (``passes.chunk_rules``),
and rewrites it as r copies working on 1/r of the split each: entries are
sliced, shape arguments rescaled, and the exits are put back together (``cat``
of split outputs, ``add`` of partial sums such as expert weight gradients). The
scheduler can then overlap chunk i's compute with chunk i±1's communication.

Capacity dispatch (a static ``[E, C, M]`` buffer) is split along the capacity
``C``: all-to-alls send 1/r of every expert's buffer, and every chunk runs the
whole expert FFN on its share.

Dropless dispatch exchanges token counts first and its data all-to-alls have
data-dependent (unbacked) split sizes. It is split along the hidden dimension
``M`` of the dispatched rows instead, so every chunk keeps the layer's own
split sizes and no count is exchanged again: each data all-to-all sends 1/r of
every row's features; the first expert GEMM contracts over ``M``, so each chunk
computes a partial product and the activation reads their sum (a ``PARTIAL``
layout read whole); the last GEMM computes its output in column chunks, each
sent back by its own combine all-to-all. The backward graph mirrors it (the
gradient all-to-alls in column chunks, the expert weight gradients in column
chunks). The integer count all-to-all is left whole.

A region that cannot be split (an op without a rule, a degree larger than the
capacity or not dividing it or the hidden size) is left as it is with the
reason in ``ctx.chunking`` and ``ctx.notes``; ``ctx.strict`` raises
``ChunkError`` instead. Graph inputs and outputs are never changed: aot_autograd links the
forward and backward graph by them, so the forward's saved tensors keep their
full shapes and values.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._prims_common import is_contiguous_or_false
from torch._subclasses.fake_tensor import FakeTensorMode

from fsmoe_compiler.ops import ALL_TO_ALL_OPS, SIZE_QUERY_OPS, TRANSPOSE_OPS, WAIT_OPS, is_op, overloads
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.chunk_rules import (PARTIAL, SHAPE_ONLY_RULE_OPS, UNSPLIT, Layout, Split, Unchunkable,
                                               apply_rule, loose_shape, reads_whole, rule_for, static_shape)
from fsmoe_compiler.passes.graph_utils import ancestors_of_set, to_digraph
from fsmoe_compiler.passes.region import ROLES, MoERegion

aten = torch.ops.aten

__all__ = ["ChunkError", "ChunkInfo", "ChunkPlan", "chunk", "plan_region", "region_subgraph"]

#: the two ways a region is split
ALONG_CAPACITY, ALONG_HIDDEN = "capacity", "hidden"


class ChunkError(ValueError):
    """A requested chunk degree cannot be applied (raised only with ``ctx.strict``)."""


@dataclass
class ChunkInfo:
    """What the chunk pass did for one layer of one graph.

    ``degree`` is the applied degree (1 when left alone, with ``reason``);
    ``nodes`` counts the nodes the pass created; ``split`` describes the anchor
    split, e.g. ``"dim 1 of view_3 [4, 10, 32]"``; ``entries``/``exits`` name the
    values that cross the chunked subgraph's boundary; ``along`` is
    ``"capacity"`` or ``"hidden"`` (dropless dispatch).
    """

    layer: int
    degree: int
    requested: int
    reason: Optional[str] = None
    nodes: int = 0
    split: Optional[str] = None
    graph: str = "forward"
    entries: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    along: str = ALONG_CAPACITY


@dataclass
class Subgraph:
    """The chunked part of a region: ``nodes`` in graph order, the ``entries`` it reads from outside,
    the ``exits`` read outside it."""

    nodes: list[fx.Node]
    entries: list[fx.Node]
    exits: list[fx.Node]


@dataclass
class ChunkPlan:
    """A region that can be chunked: its subgraph, the layout of every value of it, and the anchor."""

    region: MoERegion
    sub: Subgraph
    layouts: dict[fx.Node, Layout]
    anchor: str
    along: str = ALONG_CAPACITY


# ----------------------------------------------------------------------------------------------
# the subgraph


def _descendants_of_set(dg: nx.DiGraph, names: set[str]) -> set[str]:
    """Every node reachable from some node of ``names`` (one search)."""
    return ancestors_of_set(dg.reverse(copy=False), names)


def _carries_data(node: fx.Node) -> bool:
    """``node``'s value is a floating-point tensor (or a list of them): token data, not counts or sizes."""
    v = node.meta.get("val")
    vals = v if isinstance(v, (list, tuple)) else [v]
    return bool(vals) and all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in vals)


def _a2a_and_waits(gm: fx.GraphModule, region: MoERegion) -> list[fx.Node]:
    """The region's all_to_all_single nodes that move token data and the wait_tensor nodes that complete them.

    The integer all-to-all of dropless dispatch's token counts is not among them: it stays whole.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    out = [by_name[a] for a in region.all_to_all if a in by_name and _carries_data(by_name[a])]
    return out + [u for a in list(out) for u in a.users if is_op(u, WAIT_OPS)]


def _window_digraph(gm: fx.GraphModule, names: set[str]) -> nx.DiGraph:
    """The data-flow graph of the nodes from the first to the last of ``names`` in graph order.

    Graph order is topological, so every path between two of ``names`` lies in
    that window: searches for such paths need no more (the whole graph, once per
    region and degree, was most of the chunk pass's time on 8 layers).
    """
    nodes = list(gm.graph.nodes)
    at = [i for i, n in enumerate(nodes) if n.name in names]
    return to_digraph(gm.graph, nodes[at[0]:at[-1] + 1] if at else [])


def region_subgraph(gm: fx.GraphModule, region: MoERegion) -> Subgraph:
    """The region's nodes on paths between its all-to-alls and its expert nodes (plus those nodes).

    Only nodes holding token data (floating-point tensors) count: sizes, counts
    and the count all-to-all are entries every chunk reads as they are. Any
    node on a path between two of them joins too, so no value computed from
    the subgraph flows back into it from outside. Transposes whose users all lie
    in the subgraph join it (the backward graph transposes saved activations and
    weights right before the expert matmuls), so a saved activation itself is the
    entry.
    """
    comm = {n.name for n in _a2a_and_waits(gm, region)}
    by_name = {n.name: n for n in gm.graph.nodes}
    # token data only: sizes and counts (SymInts, the count all-to-all) are read as they are by every chunk
    members = {n for names in region.nodes.values() for n in names if n in by_name and _carries_data(by_name[n])}
    members |= comm
    window = _window_digraph(gm, members)
    dg = window.subgraph([n for n in window if _carries_data(by_name[n])])
    experts = set(region.nodes.get("expert", [])) & set(dg.nodes)
    down_comm, up_comm = _descendants_of_set(dg, comm) | comm, ancestors_of_set(dg, comm) | comm
    down_exp, up_exp = _descendants_of_set(dg, experts) | experts, ancestors_of_set(dg, experts) | experts
    names = members & ((down_comm & up_exp) | (down_exp & up_comm))
    names |= _descendants_of_set(dg, names) & ancestors_of_set(dg, names)  # convex: no path leaves and re-enters
    nodes = {n for n in gm.graph.nodes if n.name in names}
    grown = True
    while grown:
        extra = {
            p for n in nodes for p in n.all_input_nodes
            if p not in nodes and is_op(p, TRANSPOSE_OPS) and all(u in nodes for u in p.users)
        }
        nodes |= extra
        grown = bool(extra)
    ordered = [n for n in gm.graph.nodes if n in nodes]
    entries = list(dict.fromkeys(p for n in ordered for p in n.all_input_nodes if p not in nodes))
    exits = [n for n in ordered if any(u not in nodes for u in n.users)]
    return Subgraph(ordered, entries, exits)


# ----------------------------------------------------------------------------------------------
# layout inference


def infer_layouts(sub: Subgraph, seeds: dict[fx.Node, Layout], read_whole: bool = False) -> dict[fx.Node, Layout]:
    """Layouts of every value of ``sub`` implied by ``seeds``: a worklist over the op rules, both directions.

    Values nothing constrains are unsplit. With ``read_whole`` an op may read a
    partial sum whole (``chunk_rules.apply_rule``). Splits spread first and partial sums only
    after them, so a value that some all-to-all needs split is never made a
    partial sum on the way (a partial sum can always be read whole, a split
    value cannot). A final pass re-applies every rule to the
    complete assignment, so each op sees consistent layouts. Raises
    ``Unchunkable`` on a contradiction.
    """
    members = set(sub.nodes)
    known: dict[fx.Node, Layout] = dict(seeds)
    queue, queued = deque(sub.nodes), set(sub.nodes)
    deferred: deque[tuple[fx.Node, fx.Node]] = deque()  # (value, the node whose rule made it a partial sum)

    def enqueue(*nodes: fx.Node) -> None:
        for n in nodes:
            if n in members and n not in queued:
                queue.append(n)
                queued.add(n)

    while queue or deferred:
        if not queue:  # splits have spread as far as they go: now the partial sums
            value, origin = deferred.popleft()
            # a value its users need whole may still be made a partial sum by its own op: they read it summed
            if value not in known or (read_whole and known[value] is UNSPLIT and origin is value):
                known[value] = PARTIAL
                enqueue(value, *value.users)
            enqueue(origin)
            continue
        node = queue.popleft()
        queued.discard(node)
        for value, layout in apply_rule(rule_for(node), node, known.get, read_whole).items():
            if layout is None or known.get(value) == layout:
                continue
            if layout is PARTIAL and (value not in known or (read_whole and known[value] is UNSPLIT and value is node)):
                deferred.append((value, node))
                continue
            if value in known:
                raise Unchunkable(f"{value.name} would be both {known[value]} and {layout} (at {node.name})")
            known[value] = layout
            enqueue(value, *value.users)
    for value in [*sub.entries, *sub.nodes]:
        if isinstance(value.meta.get("val"), torch.Tensor) or value in members:
            known.setdefault(value, UNSPLIT)
    for node in sub.nodes:
        for value, layout in apply_rule(rule_for(node), node, known.get, read_whole).items():
            if layout is not None and known.get(value) != layout:
                raise Unchunkable(f"{value.name} is {known.get(value)} but {node.name} needs {layout}")
    partial = [e.name for e in sub.entries if known.get(e) is PARTIAL]
    if partial:
        raise Unchunkable(f"{', '.join(partial)} would come into the chunks as a partial sum")
    return known


def _anchor_candidates(node: fx.Node, capacity: int) -> list[Split]:
    """Ways ``node``'s shape can hold the capacity dim: pure dims (not dim 0 first), then merged dims."""
    dims = static_shape(node)
    pure = [d for d in range(len(dims)) if dims[d] == capacity]
    out = [Split(d, 1, capacity, 1) for d in sorted(pure, key=lambda d: d == 0)]
    for d, n in enumerate(dims):
        if n != capacity and n % capacity == 0:
            out += [Split(d, n // capacity, capacity, 1), Split(d, 1, capacity, n // capacity)]
    return out


def _symbolic(node: fx.Node) -> bool:
    """``node`` has a symbolic size, or is an all-to-all with symbolic split sizes (dropless dispatch)."""
    sizes = list(getattr(node.meta.get("val"), "shape", ()))
    if is_op(node, ALL_TO_ALL_OPS):
        sizes += [s for arg in node.args[1:3] if isinstance(arg, (list, tuple)) for s in arg]
    return any(isinstance(s, (torch.SymInt, fx.Node)) for s in sizes)


def _dropless(region: MoERegion) -> bool:
    return region.dropless or region.capacity is None


def _checked_subgraph(gm: fx.GraphModule, region: MoERegion) -> Subgraph:
    """The region's subgraph, or ``Unchunkable`` naming the first op without a rule."""
    sub = region_subgraph(gm, region)
    for node in sub.nodes:
        if rule_for(node) is None:
            raise Unchunkable(f"no chunking rule for {node.target} (node {node.name})")
    return sub


def _dims(node: fx.Node) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in loose_shape(node)) + "]"


def plan_region(gm: fx.GraphModule, region: MoERegion, degree: int) -> ChunkPlan:
    """How to chunk ``region`` of ``gm`` into ``degree`` chunks; raises ``Unchunkable`` with the reason."""
    if not region.all_to_all:
        raise Unchunkable("no all-to-all: the layer is not expert parallel")
    if _dropless(region):
        return _plan_hidden(gm, region, degree)
    cap = region.capacity
    if degree > cap:
        raise Unchunkable(f"degree {degree} is larger than the capacity {cap}")
    if cap % degree:
        raise Unchunkable(f"degree {degree} does not divide the capacity {cap}")
    sub = _checked_subgraph(gm, region)
    if any(_symbolic(n) for n in sub.nodes):  # a capacity layer with data-dependent sizes: split the hidden dim
        return _plan_hidden(gm, region, degree, sub)
    a2a = next((n for n in sub.nodes if is_op(n, ALL_TO_ALL_OPS)), None)
    if a2a is None:
        raise Unchunkable("no all-to-all on a path to the experts")
    src = a2a.args[0]
    failures = []
    for cand in _anchor_candidates(src, cap):
        try:
            layouts = infer_layouts(sub, {src: cand})
        except Unchunkable as exc:
            failures.append(str(exc))
            continue
        unsplit = [n.name for n in sub.nodes if is_op(n, ALL_TO_ALL_OPS) and not isinstance(layouts[n], Split)]
        if unsplit:
            failures.append(f"all-to-all {', '.join(unsplit)} would not be split")
            continue
        return ChunkPlan(region, sub, layouts, f"{cand.describe()} of {src.name} {list(static_shape(src))}")
    why = failures[0] if failures else f"no dim of {src.name} {list(static_shape(src))} holds the capacity {cap}"
    raise Unchunkable(f"cannot split along the capacity: {why}")


def _plan_hidden(gm: fx.GraphModule, region: MoERegion, degree: int, sub: Subgraph | None = None) -> ChunkPlan:
    """Split every token-data all-to-all of the region along its last (hidden) dim: dropless dispatch.

    The split sizes of the all-to-alls stay as they are (they are data-dependent),
    so no count is exchanged again; the layouts of the rest follow from the rules.
    An all-to-all of one value per row (Megatron sends the permuted routing
    probabilities beside the tokens, with the same splits) has no hidden dim:
    it stays whole, sent once, and its readers take it whole.
    """
    sub = sub or _checked_subgraph(gm, region)
    a2as = [n for n in sub.nodes if is_op(n, ALL_TO_ALL_OPS)]
    if not a2as:
        raise Unchunkable("no all-to-all of token data on a path to the experts")
    seeds: dict[fx.Node, Layout] = {}
    whole = [n for n in a2as if len(loose_shape(n.args[0])) < 2]  # one value per row (Megatron's routing probs)
    for a2a in a2as:
        if a2a in whole:
            continue
        src = a2a.args[0]
        dims = loose_shape(src)
        hidden = dims[-1] if dims else None
        if hidden is None:
            raise Unchunkable(f"the all-to-all {a2a.name} sends {src.name} {_dims(src)}: no static hidden dim")
        if degree > hidden:
            raise Unchunkable(f"degree {degree} is larger than the hidden size {hidden}")
        if hidden % degree:
            raise Unchunkable(f"degree {degree} does not divide the hidden size {hidden}")
        seeds[src] = Split(len(dims) - 1, 1, hidden, 1)
    try:
        layouts = infer_layouts(sub, seeds, read_whole=True)
    except Unchunkable as exc:
        raise Unchunkable(f"cannot split along the hidden dim: {exc}") from None
    if not seeds:
        raise Unchunkable("no all-to-all of token rows with a hidden dim on a path to the experts")
    unsplit = [n.name for n in a2as if n not in whole and not isinstance(layouts[n], Split)]
    if unsplit:
        raise Unchunkable(f"cannot split along the hidden dim: all-to-all {', '.join(unsplit)} would not be split")
    anchor = "the hidden dim of " + ", ".join(f"{a.args[0].name} {_dims(a.args[0])}" for a in a2as)
    return ChunkPlan(region, sub, layouts, anchor, ALONG_HIDDEN)


# ----------------------------------------------------------------------------------------------
# the rewrite


def _signature(a: Any) -> Any:
    """What an argument contributes to an op's fake result: a tensor's shape, strides and dtype."""
    v = a.meta.get("val") if isinstance(a, fx.Node) else a
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), v.stride(), v.dtype, str(v.device))
    return v


class _Emitter:
    """Creates nodes with ``meta["val"]`` (evaluated under the graph's fake mode) and ``meta["fsmoe"]``."""

    def __init__(self, gm: fx.GraphModule, plan: ChunkPlan, degree: int, memo: dict | None = None) -> None:
        self.graph = gm.graph
        self.memo = {} if memo is None else memo
        self.plan = plan
        self.degree = degree
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        self.fake_mode = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
        self.created = 0

    def role(self, node: fx.Node) -> str:
        """The region role of ``node``, or that of its first user inside the subgraph (an absorbed transpose)."""
        role = self.plan.region.role_of(node.name)
        if role is None:
            users = [u for u in node.users if u in self.plan.layouts and self.plan.region.role_of(u.name)]
            role = self.plan.region.role_of(users[0].name) if users else "expert"
        return role

    def emit(
        self, target: Any, args: tuple, kwargs: dict | None, origin: fx.Node, k: Optional[int], copy: bool = False
    ) -> fx.Node:
        """A new call of ``target`` before the current insertion point, tagged as chunk ``k`` made for ``origin``.

        A copy of ``origin`` records it as ``"origin"`` (its cost scales by 1/r);
        glue made for it (entry slices, contiguous copies, reassembly) records it as ``"glue"``.
        """
        kwargs = kwargs or {}
        val = self.fake(target, args, kwargs)
        op = getattr(target, "__name__", "op").split(".")[0]
        name = f"{origin.name}_c{k}" if copy else f"{origin.name}_{op}" + ("" if k is None else f"_c{k}")
        node = self.graph.call_function(target, args, kwargs, name=name)
        node.meta["val"] = val
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in origin.meta:
                node.meta[key] = origin.meta[key]
        node.meta["fsmoe"] = {
            "layer": self.plan.region.layer, "role": self.role(origin), "degree": self.degree,
            "chunk": k, ("origin" if copy else "glue"): origin.name,
        }
        self.created += 1
        return node

    def fake(self, target: Any, args: tuple, kwargs: dict) -> Any:
        """``target``'s result on the fake values of ``args`` (raises like the op would).

        Memoised on the op and the arguments' shapes, strides and dtypes: the r
        chunks of a node, and identical layers, share one fake value (fake
        dispatch is the bulk of the pass's time; later passes read shapes and bytes).
        """
        key = (target, repr(fx.node.map_aggregate((args, kwargs), _signature)))
        if key not in self.memo:
            real = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
            with self.fake_mode:
                self.memo[key] = target(*fx.node.map_aggregate(args, real), **fx.node.map_aggregate(kwargs, real))
        return self.memo[key]

    def viewable(self, node: fx.Node, dims: list[int]) -> bool:
        """``node``'s value can be viewed as ``dims`` without a copy."""
        try:
            self.fake(aten.view.default, (node, dims), {})
        except RuntimeError:
            return False
        return True

    def contiguous(self, node: fx.Node, origin: fx.Node, k: Optional[int]) -> fx.Node:
        """``node`` itself when contiguous, else a contiguous clone of it."""
        if is_contiguous_or_false(node.meta["val"]):  # symbolic sizes: unknown counts as not contiguous
            return node
        return self.emit(aten.clone.default, (node,), {"memory_format": torch.contiguous_format}, origin, k)


def _chunk_shape(node: fx.Node, layout: Layout, degree: int) -> list[int]:
    """``node``'s shape in one chunk."""
    dims = list(static_shape(node))
    if isinstance(layout, Split):
        dims[layout.dim] //= degree
    return dims


def _exposed(dims: list[int], lay: Split, size: int) -> list[int]:
    """``dims`` with the split dim written as ``[outer, size, inner]``."""
    return dims[: lay.dim] + [lay.outer, size, lay.inner] + dims[lay.dim + 1 :]


def _slice_entry(em: _Emitter, entry: fx.Node, lay: Split) -> list[fx.Node]:
    """The ``degree`` chunks of an entry: a slice of the dim, or of the exposed factor for a merged dim."""
    r, cs = em.degree, lay.size // em.degree
    if lay.outer == 1 and lay.inner == 1:
        return [em.emit(aten.slice.Tensor, (entry, lay.dim, k * cs, (k + 1) * cs), None, entry, k) for k in range(r)]
    full = list(static_shape(entry))
    base = em.contiguous(entry, entry, None)
    exposed = em.emit(aten.view.default, (base, _exposed(full, lay, lay.size)), None, entry, None)
    out = []
    for k in range(r):
        part = em.emit(aten.slice.Tensor, (exposed, lay.dim + 1, k * cs, (k + 1) * cs), None, entry, k)
        part = em.emit(aten.clone.default, (part,), {"memory_format": torch.contiguous_format}, entry, k)
        out.append(em.emit(aten.view.default, (part, _chunk_shape(entry, lay, r)), None, entry, k))
    return out


#: ops whose output shape is an argument (its position), rescaled in each chunk
_SHAPE_ARG = {
    **dict.fromkeys(overloads(aten.view, aten._unsafe_view, aten.reshape, aten.expand), 1),
    **dict.fromkeys(overloads(aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty_strided), 1),
    **dict.fromkeys(overloads(aten.select_backward, aten.slice_backward), 1),
}


def _rescaled(sizes: Any, lay: Layout, degree: int) -> Any:
    """A shape argument with the split dim divided by ``degree`` (``-1`` and symbolic sizes stay)."""
    if not isinstance(lay, Split) or not isinstance(sizes, (list, tuple)) or lay.dim >= len(sizes):
        return sizes
    out = list(sizes)
    if isinstance(out[lay.dim], int) and out[lay.dim] != -1:
        out[lay.dim] //= degree
    return out


def _dense_strides(sizes: list, strides: list) -> list:
    """Contiguous strides for ``sizes`` in the dim order of ``strides`` (outermost = largest stride)."""
    order = sorted(range(len(sizes)), key=lambda d: -strides[d])
    out, acc = [0] * len(sizes), 1
    for d in reversed(order):
        out[d] = acc
        acc *= sizes[d]
    return out


def _copy_args(node: fx.Node, args: tuple, layouts: dict, degree: int) -> tuple:
    """``node``'s arguments for one chunk: shape arguments rescaled to the chunk."""
    lay = layouts[node]
    pos = _SHAPE_ARG.get(node.target)
    if pos is not None and len(args) > pos:
        args = (*args[:pos], _rescaled(args[pos], lay, degree), *args[pos + 1:])
        if node.target in overloads(aten.new_empty_strided) and isinstance(lay, Split):
            args = (*args[:2], _dense_strides(args[1], list(node.args[2])), *args[3:])
        return args
    if is_op(node, ALL_TO_ALL_OPS) and isinstance(lay, Split) and lay.dim == 0:
        return (args[0], [s // degree for s in args[1]], [s // degree for s in args[2]], *args[3:])
    return args


VIEW_TARGETS = (aten.view.default, aten._unsafe_view.default)


def _copy_node(em: _Emitter, node: fx.Node, copies: dict, k: int, whole) -> fx.Node:
    """Chunk ``k`` of ``node``: its inputs' chunk-``k`` copies (unsplit inputs as they are), shapes rescaled.

    A partial sum the node reads whole is the sum of its chunks (``whole``). All-to-all
    inputs are made contiguous, and so is a view's input when its chunk (a slice)
    cannot be viewed without a copy.
    """
    layouts = em.plan.layouts

    def pick(a: fx.Node) -> fx.Node:
        if a not in copies:
            return a
        return whole(a) if reads_whole(node, a, layouts) else copies[a][k]

    args = _copy_args(node, fx.node.map_arg(node.args, pick), layouts, em.degree)
    kwargs = fx.node.map_arg(node.kwargs, pick)
    if is_op(node, ALL_TO_ALL_OPS) or (node.target in VIEW_TARGETS and not em.viewable(args[0], args[1])):
        args = (em.contiguous(args[0], node, k), *args[1:])
    return em.emit(node.target, args, kwargs, node, k, copy=True)


def _reassemble(em: _Emitter, node: fx.Node, parts: list[fx.Node]) -> fx.Node:
    """The full value of an exit from its chunks: a sum of partial sums, or a cat along the split."""
    lay = em.plan.layouts[node]
    if lay is PARTIAL:
        acc = parts[0]
        for part in parts[1:]:
            acc = em.emit(aten.add.Tensor, (acc, part), None, node, None)
        return acc
    if lay.outer == 1 and lay.inner == 1:
        return em.emit(aten.cat.default, (parts, lay.dim), None, node, None)
    cs = lay.size // em.degree
    chunk_dims = _chunk_shape(node, lay, em.degree)
    views = [
        em.emit(aten.view.default, (em.contiguous(p, node, None), _exposed(chunk_dims, lay, cs)), None, node, None)
        for p in parts
    ]
    joined = em.emit(aten.cat.default, (views, lay.dim + 1), None, node, None)
    return em.emit(aten.view.default, (joined, list(static_shape(node))), None, node, None)


def _reads_shape_only(user: fx.Node, value: fx.Node, lay: Layout) -> bool:
    """``user`` reads only a size of ``value`` that every chunk has too, or only its dtype and device."""
    if user.target in overloads(aten.sym_size) and len(user.args) > 1:
        return not isinstance(lay, Split) or user.args[1] % max(len(loose_shape(value)), 1) != lay.dim
    return user.target in SHAPE_ONLY_RULE_OPS and user.args[0] is value and value not in user.args[1:]


def rewrite(gm: fx.GraphModule, plan: ChunkPlan, degree: int, memo: dict | None = None) -> int:
    """Replace ``plan``'s subgraph by ``degree`` chunk copies; returns the number of nodes created.

    Copies of a node go where the node was, entry slices before the entry's first
    user in the subgraph and the reassembled value of a chunked node (for users
    outside the subgraph, unsplit users inside it, and ops that read a partial
    sum whole) where the node was, so the graph stays in topological order.
    Unsplit nodes of the subgraph stay as they are and are shared by every chunk;
    a size query or an allocation that only takes dtype and device from a
    chunked value reads its first chunk.
    """
    em = _Emitter(gm, plan, degree, memo)
    graph, layouts, sub = gm.graph, plan.layouts, plan.sub
    members = set(sub.nodes)
    copies: dict[fx.Node, list[fx.Node]] = {}
    wholes: dict[fx.Node, fx.Node] = {}

    def whole(node: fx.Node) -> fx.Node:
        if node not in wholes:
            with graph.inserting_before(node):
                wholes[node] = _reassemble(em, node, copies[node])
        return wholes[node]

    for entry in sub.entries:
        if isinstance(layouts.get(entry), Split):
            with graph.inserting_before(next(u for u in sub.nodes if entry in u.all_input_nodes)):
                copies[entry] = _slice_entry(em, entry, layouts[entry])
    chunked = [n for n in sub.nodes if layouts[n] is not UNSPLIT]
    for node in chunked:
        with graph.inserting_before(node):
            copies[node] = [_copy_node(em, node, copies, k, whole) for k in range(degree)]
    for node in chunked:
        for user in list(node.users):
            if user in members and layouts.get(user) is not UNSPLIT:
                continue  # a chunked user: its copies read the chunks (or the whole value) already
            if _reads_shape_only(user, node, layouts[node]):
                user.replace_input_with(node, copies[node][0])
            else:
                user.replace_input_with(node, whole(node))
    for node in reversed(chunked):
        graph.erase_node(node)
    return em.created


# ----------------------------------------------------------------------------------------------
# the pass


def _tag_region(gm: fx.GraphModule, region: MoERegion, degree: int) -> None:
    """Write ``{"layer", "role", "degree"}`` on the region's nodes and refresh ``region.nodes`` from the tags."""
    names = {n for members in region.nodes.values() for n in members}
    for node in gm.graph.nodes:
        tag = node.meta.get("fsmoe")
        if node.name in names or (tag and tag.get("layer") == region.layer and "chunk" in tag):
            # a new dict: a graph copied for another degree may share the old one (shallow meta copies)
            node.meta["fsmoe"] = {"layer": region.layer, "role": region.role_of(node.name), **(tag or {}),
                                  "degree": degree}
    if degree > 1:
        mine = [n for n in gm.graph.nodes if n.meta.get("fsmoe", {}).get("layer") == region.layer]
        region.nodes = {role: [n.name for n in mine if n.meta["fsmoe"].get("role") == role] for role in ROLES}
        region.all_to_all = [n.name for n in mine if is_op(n, ALL_TO_ALL_OPS)]


def _forget_removed(gm: fx.GraphModule, regions: list[MoERegion]) -> None:
    """Drop names of nodes no longer in ``gm`` (removed as dead code) from the regions."""
    alive = {n.name for n in gm.graph.nodes}
    for region in regions:
        region.nodes = {role: [n for n in names if n in alive] for role, names in region.nodes.items()}
        region.all_to_all = [n for n in region.all_to_all if n in alive]


def _refuse(ctx: PassContext, region: MoERegion, requested: int, reason: str) -> "ChunkInfo":
    """Leave ``region`` unchunked and say why (or raise when strict)."""
    kind = ctx.graph_kind
    msg = f"{kind}: MoE layer {region.layer}: chunk degree {requested} not applied, r = 1 ({reason})"
    if ctx.strict:
        raise ChunkError(msg)
    ctx.notes.append(msg)
    return ChunkInfo(region.layer, 1, requested, reason, graph=kind)


@graph_pass(reads=("regions",), writes=("chunking",))
def chunk(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The chunk pass: split each expert-parallel region into ``ctx.degrees[layer]`` chunks, in place.

    Reads ``ctx.regions[ctx.graph_kind]`` (and renames its chunked nodes) and
    ``ctx.degrees``; writes ``ctx.chunking[layer]`` (a ``ChunkInfo``), a note per region left at r = 1
    although more was asked, and ``node.meta["fsmoe"]`` on every region node.
    Dead pure nodes are removed first (the backward graph holds dead
    recomputations of forward nodes). Graph inputs and outputs are unchanged.
    """
    kind = ctx.graph_kind
    regions = ctx.regions_here
    degrees = ctx.degrees
    if any(degrees.get(r.layer, 1) > 1 for r in regions):
        gm.graph.eliminate_dead_code()
        _forget_removed(gm, regions)
    memo: dict = {}  # fake results shared by identical layers
    for region in regions:
        requested = int(degrees.get(region.layer, 1))
        info = ChunkInfo(region.layer, 1, requested, graph=kind)
        if requested > 1:
            try:
                plan = plan_region(gm, region, requested)
            except Unchunkable as exc:
                info = _refuse(ctx, region, requested, str(exc))
            except Exception as exc:  # noqa: BLE001 - planning only reads the graph: refuse, never half-edit
                info = _refuse(ctx, region, requested, f"chunking analysis failed: {type(exc).__name__}: {exc}")
            else:
                created = rewrite(gm, plan, requested, memo)
                info = ChunkInfo(region.layer, requested, requested, None, created, plan.anchor, kind,
                                 [n.name for n in plan.sub.entries], [n.name for n in plan.sub.exits], plan.along)
                ctx.notes.append(f"{kind}: MoE layer {region.layer}: {requested} chunks along {plan.anchor}")
        _tag_region(gm, region, info.degree)
        ctx.chunking[region.layer] = info
    if any(info.degree > 1 for info in ctx.chunking.values()):  # else only node meta changed: no new code
        gm.graph.lint()
        gm.recompile()
    return gm

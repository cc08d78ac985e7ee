"""Split each expert-parallel MoE region into r chunks along the capacity dimension.

For a region with all-to-alls and a requested degree ``r = ctx.degrees[layer] > 1``
the pass takes the part of the region between its all-to-alls and its experts
(dispatch all-to-all -> expert compute -> combine all-to-all; in the backward
graph the reverse, weight gradients included), finds how each tensor of it is
split along the capacity dimension by propagating layouts through per-op rules
(``passes.chunk_rules``), and rewrites it as r copies working on 1/r of the
capacity each: entries are sliced, shape arguments rescaled, all-to-alls send
1/r of every expert's buffer, and the exits are put back together (``cat`` of
split outputs, ``add`` of partial sums such as expert weight gradients). The
scheduler can then overlap chunk i's compute with chunk i±1's communication.

A region that cannot be split (dropless dispatch, an op without a rule, a
degree larger than the capacity) is left as it is with the reason in
``ctx.chunking`` and ``ctx.notes``; ``ctx.strict`` raises ``ChunkError``
instead. Graph inputs and outputs are never changed: aot_autograd links the
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
from torch._subclasses.fake_tensor import FakeTensorMode

from fsmoe_compiler.ops import ALL_TO_ALL_OPS, TRANSPOSE_OPS, WAIT_OPS, is_op
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.chunk_rules import PARTIAL, UNSPLIT, Layout, Split, Unchunkable, rule_for, static_shape
from fsmoe_compiler.passes.graph_utils import ancestors_of_set, to_digraph
from fsmoe_compiler.passes.region import ROLES, MoERegion

aten = torch.ops.aten

__all__ = ["ChunkError", "ChunkInfo", "ChunkPlan", "chunk", "plan_region", "region_subgraph"]

DROPLESS_REASON = "dropless layer: splits change every step"


class ChunkError(ValueError):
    """A requested chunk degree cannot be applied (raised only with ``ctx.strict``)."""


@dataclass
class ChunkInfo:
    """What the chunk pass did for one layer of one graph.

    ``degree`` is the applied degree (1 when left alone, with ``reason``);
    ``nodes`` counts the nodes the pass created; ``split`` describes the anchor
    split, e.g. ``"dim 1 of view_3 [4, 10, 32]"``; ``entries``/``exits`` name the
    values that cross the chunked subgraph's boundary.
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


# ----------------------------------------------------------------------------------------------
# the subgraph


def _descendants_of_set(dg: nx.DiGraph, names: set[str]) -> set[str]:
    """Every node reachable from some node of ``names`` (one search)."""
    return ancestors_of_set(dg.reverse(copy=False), names)


def _a2a_and_waits(gm: fx.GraphModule, region: MoERegion) -> list[fx.Node]:
    """The region's all_to_all_single nodes and the wait_tensor nodes that complete them."""
    by_name = {n.name: n for n in gm.graph.nodes}
    out = [by_name[a] for a in region.all_to_all if a in by_name]
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

    Any node on a path between two of them joins too, so no value computed from
    the subgraph flows back into it from outside. Transposes whose users all lie
    in the subgraph join it (the backward graph transposes saved activations and
    weights right before the expert matmuls), so a saved activation itself is the
    entry.
    """
    comm = {n.name for n in _a2a_and_waits(gm, region)}
    members = {n for names in region.nodes.values() for n in names} | comm
    dg = _window_digraph(gm, members)
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


def infer_layouts(sub: Subgraph, seeds: dict[fx.Node, Layout]) -> dict[fx.Node, Layout]:
    """Layouts of every value of ``sub`` implied by ``seeds``: a worklist over the op rules, both directions.

    Values nothing constrains are unsplit. A final pass re-applies every rule to
    the complete assignment, so each op sees consistent layouts. Raises
    ``Unchunkable`` on a contradiction.
    """
    members = set(sub.nodes)
    known: dict[fx.Node, Layout] = dict(seeds)
    queue, queued = deque(sub.nodes), set(sub.nodes)
    while queue:
        node = queue.popleft()
        queued.discard(node)
        for value, layout in rule_for(node)(node, known.get).items():
            if layout is None or known.get(value) == layout:
                continue
            if value in known:
                raise Unchunkable(f"{value.name} would be both {known[value]} and {layout} (at {node.name})")
            known[value] = layout
            for n in [value, *value.users]:
                if n in members and n not in queued:
                    queue.append(n)
                    queued.add(n)
    for value in [*sub.entries, *sub.nodes]:
        if isinstance(value.meta.get("val"), torch.Tensor):
            known.setdefault(value, UNSPLIT)
    for node in sub.nodes:
        for value, layout in rule_for(node)(node, known.get).items():
            if layout is not None and known.get(value) != layout:
                raise Unchunkable(f"{value.name} is {known.get(value)} but {node.name} needs {layout}")
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


def plan_region(gm: fx.GraphModule, region: MoERegion, degree: int) -> ChunkPlan:
    """How to chunk ``region`` of ``gm`` into ``degree`` chunks; raises ``Unchunkable`` with the reason."""
    if region.dropless or region.capacity is None:
        raise Unchunkable(DROPLESS_REASON)
    if not region.all_to_all:
        raise Unchunkable("no all-to-all: the layer is not expert parallel")
    cap = region.capacity
    if degree > cap:
        raise Unchunkable(f"degree {degree} is larger than the capacity {cap}")
    if cap % degree:
        raise Unchunkable(f"degree {degree} does not divide the capacity {cap}")
    sub = region_subgraph(gm, region)
    for node in sub.nodes:
        if _symbolic(node):
            raise Unchunkable(DROPLESS_REASON)
        if rule_for(node) is None:
            raise Unchunkable(f"no chunking rule for {node.target} (node {node.name})")
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
        if node.meta["val"].is_contiguous():
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


def _copy_args(node: fx.Node, args: tuple, layouts: dict, degree: int) -> tuple:
    """``node``'s arguments for one chunk: shape arguments rescaled to the chunk."""
    lay = layouts[node]
    if node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default):
        return (args[0], _chunk_shape(node, lay, degree), *args[2:])
    if is_op(node, ALL_TO_ALL_OPS) and isinstance(lay, Split) and lay.dim == 0:
        return (args[0], [s // degree for s in args[1]], [s // degree for s in args[2]], *args[3:])
    return args


VIEW_TARGETS = (aten.view.default, aten._unsafe_view.default)


def _copy_node(em: _Emitter, node: fx.Node, copies: dict, k: int) -> fx.Node:
    """Chunk ``k`` of ``node``: its inputs' chunk-``k`` copies (unsplit inputs as they are), shapes rescaled.

    All-to-all inputs are made contiguous, and so is a view's input when its
    chunk (a slice) cannot be viewed without a copy.
    """
    pick = lambda a: copies[a][k] if a in copies else a  # noqa: E731
    args = _copy_args(node, fx.node.map_arg(node.args, pick), em.plan.layouts, em.degree)
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


def rewrite(gm: fx.GraphModule, plan: ChunkPlan, degree: int, memo: dict | None = None) -> int:
    """Replace ``plan``'s subgraph by ``degree`` chunk copies; returns the number of nodes created.

    Copies of a node go where the node was, entry slices before the entry's first
    user in the subgraph and the reassembled exits where the exit was, so the
    graph stays in topological order. Unsplit nodes of the subgraph stay as they
    are and are shared by every chunk.
    """
    em = _Emitter(gm, plan, degree, memo)
    graph, layouts, sub = gm.graph, plan.layouts, plan.sub
    members = set(sub.nodes)
    copies: dict[fx.Node, list[fx.Node]] = {}
    for entry in sub.entries:
        if isinstance(layouts.get(entry), Split):
            with graph.inserting_before(next(u for u in sub.nodes if entry in u.all_input_nodes)):
                copies[entry] = _slice_entry(em, entry, layouts[entry])
    chunked = [n for n in sub.nodes if layouts[n] is not UNSPLIT]
    for node in chunked:
        with graph.inserting_before(node):
            copies[node] = [_copy_node(em, node, copies, k) for k in range(degree)]
    for node in chunked:
        if any(u not in members for u in node.users):
            with graph.inserting_before(node):
                node.replace_all_uses_with(_reassemble(em, node, copies[node]))
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
                                 [n.name for n in plan.sub.entries], [n.name for n in plan.sub.exits])
                ctx.notes.append(f"{kind}: MoE layer {region.layer}: {requested} chunks along {plan.anchor}")
        _tag_region(gm, region, info.degree)
        ctx.chunking[region.layer] = info
    if any(info.degree > 1 for info in ctx.chunking.values()):  # else only node meta changed: no new code
        gm.graph.lint()
        gm.recompile()
    return gm

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
states, in graph (topological) order: routing metadata (``routing``),
dispatched token data (``dispatched``), expert-side data (``expert``, after an
expert matmul) and combined data (``combined``, once expert data meets routing
data); they become the router, dispatch, expert and combine roles. Combined
data only flows on through ops a combine is made of (an opaque op too when
its signature is a scatter back to token order: routing index in, token rows
out), and no state flows into
another router or into a residual (a tensor computed before the router input),
which bounds each region. A topk that yields no expert matmul, no combine or a
single dense lane is not MoE.

Soft routing (SoftMoE) has no topk; its anchor is a softmax over the token
dimension of ``[tokens, experts, slots]`` scores, and the same states follow.

In the backward graph the anchor is the gradient of ``topk`` (a ``scatter`` into
a ``[tokens, experts]`` or ``[batch, seq, experts]`` zero tensor at the saved topk indices, which are inputs
of the backward graph), followed by the softmax/sigmoid backward; for soft
routing it is the combine softmax's backward, and for argmax routers (no topk
gradient) the score softmax/sigmoid backward itself. The dominator of the anchor that
also leads to matmuls elsewhere is the fork where the layer's output gradient
splits into the gate gradient and the experts' gradient. Walking on from the
fork, gradient nodes are ``forked`` (still in token order), ``permuted`` (into
expert space by saved indices, an all-to-all or the combine matmul), ``expert
gradient`` (after an expert matmul: the transposed expert matmuls and the
weight gradients) and ``un-permuted`` (back in token order: the dispatch's
gradient). A node that meets any other gradient (the router's, a shared
expert's, a residual) ends the walk. The forked gradient that leads to the
experts, the output gradient's views above the fork and the permuted gradient
form the combine role, expert gradients the expert role, the un-permuted
gradient the dispatch role; the gate gradient from the fork to the anchor and
below it is the router's.
Saved-tensor names tie a backward region to its forward layer when the forward
regions are at hand.

Sizes are compared as sympy expressions when they are symbolic, so graphs
compiled with dynamic shapes are recognised too (the sizes reported are then
None). What the recogniser does not understand (an opaque custom op, a topk
that is not followed by expert matmuls) it leaves out of every region.

Each walk is an explicit transition table of ``Rule`` rows (a name, a
predicate over what the walk sees at a node, the state the node takes),
evaluated in order, first match wins: ``FORWARD_RULES`` in
``recognize_forward`` and ``BACKWARD_RULES`` in ``recognize_backward``; the
backward anchors are a table too (``ANCHOR_FINDERS``). Walking yields states,
expert matmuls and their depths; separate small steps then read the router
kind, top-k, experts, capacity, sizes, all-to-alls and the shared expert off
them. Both walks read the graph through one ``GraphIndex`` (data-flow digraph,
positions, gradient nodes, cached ancestors and descendants) from
``recognize_common``, which also holds the vocabulary they share
(``COMBINE_OPS``). A new upstream style is a new row or predicate in a table,
or a new step; op families it needs go to ``fsmoe_compiler.ops``.

``find_moe_regions`` only reads the graph; ``recognize`` is the pass that stores
the regions on the pass context and tags region nodes with
``node.meta["fsmoe"] = {"role": ..., "layer": ...}``.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx

from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.recognize_backward import find_backward_regions
from fsmoe_compiler.passes.recognize_forward import find_forward_regions
from fsmoe_compiler.passes.region import ROLES, MoERegion

__all__ = ["MoERegion", "ROLES", "find_moe_regions", "recognize"]

# ----------------------------------------------------------------------------------------------
# public entry points


def find_moe_regions(
    gm: fx.GraphModule,
    graph: str = "forward",
    forward_regions: list[MoERegion] | None = None,
    notes: list[str] | None = None,
) -> list[MoERegion]:
    """All MoE regions of ``gm``, a forward or backward ATen graph of aot_autograd; reads only.

    Regions come in layer order: forward regions in order of appearance;
    backward regions carry the index of the forward layer they belong to
    (backward runs the layers in reverse, so the first region found in a
    backward graph of L layers is layer L-1). Given the forward graph's
    regions, a backward region takes the layer of the forward region whose
    saved topk indices it reads, which also holds when some forward layer was
    not found. ``notes``, if given, receives why routing-like anchors that
    formed no region were left alone (e.g. a top-k sampling head).
    """
    if graph not in ("forward", "backward"):
        raise ValueError(f"graph must be 'forward' or 'backward', got {graph!r}")
    if graph == "backward":
        regions = find_backward_regions(gm, forward_regions)
    else:
        regions = find_forward_regions(gm, notes)
    return _without_shared_nodes(regions)


def _without_shared_nodes(regions: list[MoERegion]) -> list[MoERegion]:
    """Give no region a node that two regions claim: it is model-level glue (e.g. a running aux-loss sum)."""
    claims = Counter(name for r in regions for name in {n for members in r.nodes.values() for n in members})
    shared = {name for name, count in claims.items() if count > 1}
    if not shared:
        return regions
    for r in regions:
        mine = {n for members in r.nodes.values() for n in members} & shared
        if mine:
            r.nodes = {role: [n for n in members if n not in shared] for role, members in r.nodes.items()}
            r.all_to_all = [n for n in r.all_to_all if n not in shared]
            r.notes.append(f"{len(mine)} node(s) also reached from another layer left outside: {', '.join(sorted(mine))}")
    return regions


@graph_pass(uses=("regions",), writes=("regions",))
def recognize(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The recognition pass: store regions on ``ctx.regions[ctx.graph_kind]`` and tag region nodes.

    In the backward graph it reads the forward's regions, when present, to name
    each region's layer. Writes ``node.meta["fsmoe"]["role"]`` and ``["layer"]``
    for every node of every region; changes nothing else in the graph.
    """
    kind = ctx.graph_kind
    regions = find_moe_regions(gm, kind, ctx.regions.get("forward") if kind == "backward" else None, ctx.notes)
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



"""Split an MoE layer's tokens into chunks before routing, in the Dynamo graph, before autograd sees it.

A dropless layer whose all-to-alls cannot be chunked after dispatch (its
row counts are data-dependent and its expert GEMMs contract the hidden dim in
bf16, so a hidden-dim split would round differently) can still be pipelined by
running it on token ranges: each range routes, exchanges its own counts,
dispatches, computes and combines on its own, and the outputs are
concatenated. Every token's output depends only on that token in a dropless
layer, so the result is the same; weight gradients become sums over the
ranges. Done on the Dynamo graph (torch-level ops, modules inlined), the
split reaches both ATen graphs: aot_autograd traces the copies' forward and
backward, and recognition finds one region per range in each.

The layer is the module that holds a forward region's router and experts
(``meta["nn_module_stack"]``, which aot_autograd carries from the Dynamo
nodes to the ATen nodes): :func:`splits_for` names it from the forward
graph's regions, and :func:`split_tokens` rewrites the Dynamo graph's node
range of that module. The range must read one activation (the layer's
input, split along its batch dim, else its sequence dim) besides parameters
and buffers, and hand one activation of the same shape on (the output, so
the copies' outputs concatenate back); anything else is left alone with a
note, and ``strict`` raises.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from fsmoe_compiler.passes.chunk import Unchunkable, plan_region
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.region import MoERegion


class TokenSplitError(ValueError):
    """A layer's node range in the Dynamo graph cannot be run on token ranges (the message says why)."""


@dataclass(frozen=True)
class TokenSplit:
    """Run the module ``module`` (a ``nn_module_stack`` key; ``path`` is its readable name) on ``chunks``
    token ranges; ``layer`` is the forward region it was found as."""

    module: str
    path: str
    chunks: int
    layer: int


#: Global-state calls Dynamo keeps in a graph (``with torch.no_grad()`` inside a layer): every range repeats them.
_STATE_CALLS = (torch._C._set_grad_enabled, torch.amp.autocast_mode._enter_autocast,
                torch.amp.autocast_mode._exit_autocast)


def layer_module(gm: fx.GraphModule, region: MoERegion) -> tuple[str, str] | None:
    """``(key, path)`` of the innermost module holding all of ``region``'s router, expert and combine
    nodes in ``gm`` (an ATen graph), or None when the nodes carry no module stack."""
    by_name = {n.name: n for n in gm.graph.nodes}
    names = [name for role in ("router", "dispatch", "expert", "combine") for name in region.nodes.get(role, [])]
    stacks = []
    for name in names:
        node = by_name.get(name)
        stack = node.meta.get("nn_module_stack") if node is not None else None
        if stack:
            stacks.append(list(stack.items()))
    if not stacks:
        return None
    common = stacks[0]
    for s in stacks[1:]:
        n = 0
        while n < min(len(common), len(s)) and common[n][0] == s[n][0]:
            n += 1
        common = common[:n]
    if not common:
        return None
    key, (path, _type) = common[-1]
    return key, str(path)


#: ``split_tokens="auto"``: at most this many ranges, each of at least this many tokens.
MAX_RANGES, MIN_RANGE_TOKENS = 8, 256


def auto_ranges(tokens: int | None) -> int:
    """How many token ranges ``"auto"`` splits a layer of ``tokens`` tokens into: the largest power of two up
    to ``MAX_RANGES`` that leaves every range ``MIN_RANGE_TOKENS`` tokens (1: too few to split, or a token
    count that is not static). Fewer, larger messages waste less on per-message latency; more ranges hide
    more of each range's all-to-alls behind the others' compute (8 ranges of 256 tokens measured fastest on
    the torchtitan bench layer over a 300 Mbit/s link)."""
    if tokens is None:  # a dynamic token count: the split needs static sizes
        return 1
    r = 1
    while r * 2 <= MAX_RANGES and tokens // (r * 2) >= MIN_RANGE_TOKENS:
        r *= 2
    return r


def candidate_ranges(most: int) -> list[int]:
    """The range counts ``"auto"`` measures against the whole graph: powers of two from 2 up to ``most``."""
    out, r = [], 2
    while r <= most:
        out.append(r)
        r *= 2
    return out


def splits_for(gm: fx.GraphModule, regions: list[MoERegion], setting: int | str) -> tuple[list[TokenSplit], list[str]]:
    """Which forward regions of ``gm`` to split, for the ``split_tokens`` option ``setting``, and notes.

    ``"auto"``: :func:`auto_ranges` for an expert-parallel dropless region that cannot be chunked after dispatch;
    an int > 1: that many ranges for every expert-parallel dropless region; 1: none.
    """
    out: list[TokenSplit] = []
    notes: list[str] = []
    if setting == 1:
        return out, notes
    for region in regions:
        if not region.dropless or not region.all_to_all:
            continue
        chunks = auto_ranges(region.tokens) if setting == "auto" else int(setting)
        if chunks < 2:
            continue
        if setting == "auto":
            try:
                plan_region(gm, region, 2)
                continue  # chunks after dispatch: the chunk pass does it
            except Unchunkable as exc:
                why = str(exc)
            except Exception as exc:  # noqa: BLE001 - an analysis failure: the chunk pass will say so too
                why = f"{type(exc).__name__}: {exc}"
        else:
            why = f"split_tokens={setting}"
        module = layer_module(gm, region)
        if module is None:
            notes.append(f"forward: MoE layer {region.layer}: tokens not split ({why}; its nodes name no module)")
            continue
        if any(s.module == module[0] for s in out):
            continue
        out.append(TokenSplit(module[0], module[1], chunks, region.layer))
        notes.append(f"forward: MoE layer {region.layer} ({module[1]}): tokens split into {chunks} ranges before "
                     f"routing ({why})")
    return out, notes


def _value(node: object) -> object:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _is_static_input(node: fx.Node) -> bool:
    """A parameter or buffer of the compiled module (Dynamo marks them on their placeholders)."""
    return node.op in ("placeholder", "get_attr") and (
        node.op == "get_attr" or "_dynamo_static_input_type" in (node.meta.get("tensor_dict") or {}))


def _split_dim(x: fx.Node, chunks: int) -> int:
    """The token dim of ``x`` to split: the first (batch, then sequence) whose static size divides into
    ``chunks``."""
    val = _value(x)
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        raise TokenSplitError(f"its input {x.name} is not a tensor of token rows")
    if not all(isinstance(d, int) for d in val.shape[:-1]):  # the layer's token counts are symbolic: not rescaled
        raise TokenSplitError(f"its input {x.name} {list(val.shape)} has a dynamic token dim (static sizes only)")
    for d in range(val.dim() - 1):
        if isinstance(val.shape[d], int) and val.shape[d] >= chunks and val.shape[d] % chunks == 0:
            return d
    raise TokenSplitError(f"no token dim of its input {x.name} {list(val.shape)} splits into {chunks} "
                          "(static sizes only)")


#: Calls whose arguments after the tensor are a size; Dynamo bakes static sizes into them (``view(2048, 256)``).
_SIZED_METHODS = frozenset({"view", "reshape", "expand", "new_empty", "new_zeros", "new_ones", "new_full"})
_SIZED_FUNCTIONS = (torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full)


_COMPARISONS = (operator.eq, operator.ne, operator.ge, operator.gt, operator.le, operator.lt)


def _rescale_sizes(node: fx.Node, counts: Callable[[object], bool], chunks: int, tokens: int) -> None:
    """In a range's copy, divide a baked token count (``counts(v)``) by ``chunks``: in a sizing call whose result
    holds token rows (``tokens`` x m elements), in one position, the first but the last (the hidden size's); in
    a comparison (Dynamo's checks on data-dependent row counts, ``u0 + u1 == 4096``), anywhere. A result of
    other sizes (the expert-parallel count exchange's ``view(ep, -1)``) keeps its sizes, even one that equals
    the batch size."""
    if node.op == "call_function" and node.target in _COMPARISONS:
        node.args = tuple(a // chunks if counts(a) else a for a in node.args)
        return
    if node.op == "call_method" and node.target in _SIZED_METHODS:
        head, sizes = node.args[:1], list(node.args[1:])
    elif node.op == "call_function" and node.target in _SIZED_FUNCTIONS:
        head, sizes = (node.args[:1], list(node.args[1:])) if node.target is torch.reshape else ((), list(node.args))
    else:
        return
    rest: list = []
    if node.target == "new_full" or node.target is torch.full:  # (size, fill): only the size
        sizes, rest = sizes[:1], sizes[1:]
    nested = len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
    dims = list(sizes[0]) if nested else sizes
    val = _value(node)
    numel = val.numel() if isinstance(val, torch.Tensor) else None
    if isinstance(numel, int) and not isinstance(numel, bool):
        if numel % tokens:  # not token rows: nothing of it is a token count
            return
        first = next((i for i, d in enumerate(dims[:-1]) if counts(d)), None)
        scaled = [d // chunks if i == first else d for i, d in enumerate(dims)]
    else:  # a data-dependent size: every count but the last
        scaled = [d // chunks if counts(d) and i < len(dims) - 1 else d for i, d in enumerate(dims)]
    if scaled != dims:
        node.args = tuple(head) + ((tuple(scaled),) if nested else tuple(scaled)) + tuple(rest)


def split_layer(gm: fx.GraphModule, split: TokenSplit) -> str:
    """Rewrite ``gm`` (a Dynamo graph) so ``split.module`` runs on ``split.chunks`` token ranges; returns
    what was split. Raises ``TokenSplitError`` (graph unchanged) when the module's node range does not fit."""
    graph = gm.graph
    nodes = list(graph.nodes)
    inside = [i for i, n in enumerate(nodes) if n.op in ("call_function", "call_method", "call_module")
              and split.module in (n.meta.get("nn_module_stack") or {})]
    if not inside:
        raise TokenSplitError("no node of the module in the Dynamo graph")
    span = nodes[inside[0]: inside[-1] + 1]
    members = set(span)
    strangers = [n.name for n in span if split.module not in (n.meta.get("nn_module_stack") or {})
                 and n.target not in _STATE_CALLS]
    if strangers:
        raise TokenSplitError(f"nodes of other code sit between its nodes: {', '.join(strangers[:4])}")
    activations = []
    for n in span:
        for a in n.all_input_nodes:
            if a not in members and isinstance(_value(a), torch.Tensor) and not _is_static_input(a) \
                    and a not in activations:
                activations.append(a)
    if len(activations) != 1:
        raise TokenSplitError(f"it reads {len(activations)} activations ({', '.join(a.name for a in activations)}), "
                              "not one")
    x = activations[0]
    per_range = set()  # nodes every range runs: those that read the input, and global-state calls
    for n in span:
        if n.target in _STATE_CALLS or any(a is x or a in per_range for a in n.all_input_nodes):
            per_range.add(n)
    dim = _split_dim(x, split.chunks)
    leaving = [n for n in span if any(u not in members for u in n.users)]
    outputs = [n for n in leaving if n in per_range]
    if len(outputs) != 1:
        raise TokenSplitError(f"{len(outputs)} of its results that depend on its input are used after it "
                              f"({', '.join(n.name for n in outputs)}), not one")
    out = outputs[0]
    out_val, x_val = _value(out), _value(x)
    if not isinstance(out_val, torch.Tensor) or tuple(out_val.shape) != tuple(x_val.shape):
        raise TokenSplitError(f"its output {out.name} is not shaped like its input {x.name} {list(x_val.shape)}")
    with graph.inserting_before(span[0]):
        parts = graph.call_function(torch.tensor_split, (x, split.chunks), {"dim": dim})
        ranges = [graph.call_function(operator.getitem, (parts, k)) for k in range(split.chunks)]
        if dim > 0:  # a range of positions is strided: the layer may view its input (torchtitan's x.view(T, D))
            ranges = [graph.call_method("contiguous", (r,)) for r in ranges]
    shape = [int(d) for d in x_val.shape[:-1]]
    tokens = math.prod(shape)

    def counts(v: object) -> bool:  # a token count baked from x: the split dim's size, or rows = tokens x m
        return isinstance(v, int) and not isinstance(v, bool) and v > 0 and (v == shape[dim] or v % tokens == 0)

    for n in span:
        n.replace_input_with(x, ranges[0])
        if n in per_range:
            _rescale_sizes(n, counts, split.chunks, tokens)
    outs, cursor = [out], span[-1]
    for k in range(1, split.chunks):
        env: dict[fx.Node, fx.Node] = {ranges[0]: ranges[k]}
        for n in span:
            if n not in per_range:
                continue
            with graph.inserting_after(cursor):
                copy = graph.node_copy(n, lambda a: env.get(a, a))
            env[n] = cursor = copy
        outs.append(env[out])
    with graph.inserting_after(cursor):
        joined = graph.call_function(torch.cat, (outs,), {"dim": dim})
    for user in list(out.users):
        if user not in members and user is not joined:
            user.replace_input_with(out, joined)
    graph.lint()
    gm.recompile()
    return f"{split.path}: {split.chunks} token ranges along dim {dim} of {x.name} {list(x_val.shape)}"


@graph_pass(uses=("token_splits",), writes=("token_splits",))
def split_tokens(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The token-split pass over the Dynamo graph: apply ``ctx.token_splits`` and keep there the ones applied; a
    layer that does not fit is left whole with a note (``strict``: ``TokenSplitError``)."""
    applied = []
    for split in ctx.token_splits or []:
        try:
            done = split_layer(gm, split)
        except TokenSplitError as exc:
            msg = f"dynamo: MoE layer {split.layer} ({split.path}): tokens not split ({exc})"
            if ctx.strict:
                raise TokenSplitError(msg) from None
            ctx.notes.append(msg)
        else:
            applied.append(split)
            ctx.notes.append(f"dynamo: MoE layer {split.layer}: {done}")
    ctx.token_splits = applied
    return gm

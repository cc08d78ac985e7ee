"""Send an all-to-all's payload in the half-precision dtype it is cast to or from, where that is exact.

torchtitan's MoE layer dispatches fp32 activations and casts them to bf16 only after the exchange, for its
grouped GEMMs, and casts the GEMM output back to fp32 before the combine exchange: half of every byte on
the link carries bits that are dropped on arrival or were zero from the start. Moving the cast across the
all-to-all gives the same bits in two cases, both checked on the graph:

* receiver side: every use of the received tensor ends, through pure data movement (views, row gathers,
  transposes, copies), in a cast to one half dtype: rounding before the exchange gives the same values;
* sender side: the sent tensor is, through pure data movement (including rows written into a blank buffer
  without accumulation), a cast from a half dtype: every value is exact in that dtype.

The rewrite casts the payload before the collective and back to its dtype after the wait, and leaves the
rest of the graph alone. Any arithmetic on the path keeps the payload as it is: torchtitan's expert-input
gradient is the fp32 sum of two bf16 gradients (the input feeds two GEMMs), so that exchange stays fp32.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fsmoe_compiler.ops import collective_op, is_collective, is_wait
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.graph_utils import val
from fsmoe_compiler.passes.verify import graph_signature

__all__ = ["narrow_comm", "narrowed_dtype"]

aten = torch.ops.aten
HALF = (torch.bfloat16, torch.float16)
#: Collectives that only move data (a reduction would sum in the narrow dtype).
MOVING = ("all_to_all_single",)
#: Ops whose first argument's values reach the output unchanged, only moved, viewed or copied.
_MOVES = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
    aten.alias.default, aten.detach.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.index.Tensor,
    aten.index_select.default, aten.gather.default,
}
#: Ops that read only a tensor's shape.
_SHAPE_READS = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}
#: Fresh buffers whose untouched elements are zero or unset (an index_put into one moves only its values).
_BLANK = {
    aten.new_empty.default, aten.new_zeros.default, aten.empty.memory_format, aten.zeros.default,
    aten.zeros_like.default, aten.empty_like.default, aten.new_empty_strided.default,
}


def _cast_to(node: fx.Node) -> torch.dtype | None:
    """The dtype ``node`` casts its first argument to, when it is a pure dtype cast (same device, layout)."""
    if node.op != "call_function":
        return None
    if node.target is aten._to_copy.default:
        kw = dict(node.kwargs)
        dtype = kw.pop("dtype", None)
        src = val(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        same_device = src is not None and kw.pop("device", src.device) == src.device
        if same_device and kw.pop("layout", torch.strided) == torch.strided and not kw.pop("pin_memory", False) \
                and not kw:
            return dtype
        return None
    if node.target is torch.ops.prims.convert_element_type.default:
        return node.args[1]
    return None


def _moves(node: fx.Node, source: fx.Node) -> bool:
    """Does ``node`` only move ``source``'s values (``source`` its data argument, nowhere else)?"""
    if node.op != "call_function" or not node.args or node.args[0] is not source:
        return False
    if node.target in _MOVES or is_wait(node):
        rest = [*node.args[1:], *node.kwargs.values()]
        return all(source is not a and not (isinstance(a, (list, tuple)) and source in a) for a in rest)
    return False


def _received_as(start: fx.Node) -> torch.dtype | None:
    """The half dtype that every use of ``start`` is cast to after pure data movement, or None."""
    found: set[torch.dtype] = set()
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "call_function" and user.target in _SHAPE_READS:
                continue
            dtype = _cast_to(user)
            if dtype in HALF:
                found.add(dtype)
            elif _moves(user, n):
                stack.append(user)
            else:  # arithmetic, a graph output (saved for backward), or anything else: the wide values are used
                return None
    return found.pop() if len(found) == 1 else None


def _sent_from(node: fx.Node, wide: torch.dtype) -> torch.dtype | None:
    """The half dtype that ``node``'s values were all cast from, through pure data movement, or None."""
    if node.op != "call_function":
        return None
    dtype = _cast_to(node)
    if dtype is not None:
        src = val(node.args[0])
        return src.dtype if dtype == wide and src is not None and src.dtype in HALF else None
    if node.target in (aten.index_put.default, aten.index_put_.default):
        base, _, values, *rest = node.args
        accumulate = rest[0] if rest else node.kwargs.get("accumulate", False)
        if accumulate or not isinstance(base, fx.Node) or base.target not in _BLANK:
            return None
        return _sent_from(values, wide) if isinstance(values, fx.Node) else None
    if node.target in _MOVES and isinstance(node.args[0], fx.Node):
        return _sent_from(node.args[0], wide)
    return None


def _wait_chain(coll: fx.Node) -> list[fx.Node]:
    """The wait of ``coll`` and any waits on that wait (torchtitan waits twice), in order."""
    chain, n = [], coll
    while True:
        waits = [u for u in n.users if is_wait(u)]
        if len(waits) != 1:
            return chain
        n = waits[0]
        chain.append(n)


def narrowed_dtype(coll: fx.Node) -> tuple[torch.dtype, str] | None:
    """The half dtype ``coll`` can send exactly, and why (``"received"`` or ``"sent"`` side), or None."""
    if not is_collective(coll) or collective_op(coll) not in MOVING or not isinstance(coll.args[0], fx.Node):
        return None
    payload, chain = val(coll.args[0]), _wait_chain(coll)
    if payload is None or not chain or not payload.is_floating_point() or payload.dtype in HALF:
        return None
    dtype = _received_as(chain[-1])
    if dtype is not None:
        return dtype, "received"
    dtype = _sent_from(coll.args[0], payload.dtype)
    return (dtype, "sent") if dtype is not None else None


def _narrow(graph: fx.Graph, coll: fx.Node, dtype: torch.dtype) -> None:
    """Cast ``coll``'s payload to ``dtype`` before it and back after its last wait."""
    src, chain = coll.args[0], _wait_chain(coll)
    wide = val(src).dtype
    keep = {k: coll.meta[k] for k in ("stack_trace", "nn_module_stack", "source_fn_stack") if k in coll.meta}
    with graph.inserting_before(coll):
        down = graph.call_function(aten._to_copy.default, (src,), {"dtype": dtype})
    down.meta.update(keep, val=val(src).to(dtype))
    coll.update_arg(0, down)
    last = chain[-1]
    wide_val = val(last)
    for n in (coll, *chain):
        n.meta["val"] = val(n).to(dtype)
    with graph.inserting_after(last):
        up = graph.call_function(aten._to_copy.default, (last,), {"dtype": wide})
    up.meta.update(keep, val=wide_val)
    last.replace_all_uses_with(up, delete_user_cb=lambda user: user is not up)


@graph_pass(writes=("original",))
def narrow_comm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Send each all-to-all whose payload is exact in bf16/fp16 in that dtype (option ``narrow_comm``); a note
    names each one. The collectives the later passes must keep are those of the narrowed graph."""
    if not ctx.config.narrow_comm:
        return gm
    changed = False
    for coll in [n for n in gm.graph.nodes if is_collective(n)]:
        found = narrowed_dtype(coll)
        if found is None:
            continue
        dtype, side = found
        wide = val(coll.args[0]).dtype
        _narrow(gm.graph, coll, dtype)
        changed = True
        why = "every use of it is cast to" if side == "received" else "its values were all cast from"
        ctx.notes.append(f"{ctx.graph_kind}: {coll.name} sends {str(dtype).removeprefix('torch.')} instead of "
                         f"{str(wide).removeprefix('torch.')} ({why} {str(dtype).removeprefix('torch.')}; "
                         f"exact, half the bytes)")
    if changed:
        gm.graph.lint()
        gm.recompile()
        ctx.original = graph_signature(gm)
    return gm

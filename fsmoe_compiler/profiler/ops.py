"""How the profiler names, sizes and groups collective nodes of an ATen graph.

Functional collectives are priced by a ``LinearCost`` per ``"{kind}/{group_size}"``
(``kind`` one of :data:`KINDS` where the op maps to one, else the op name) and
by the bytes *this rank sends*: the input tensor's ``numel * element_size``
(summed over the inputs of a coalesced op). The same rule sizes a live tensor
(profiling) and a node's ``meta["val"]`` (pricing a graph that was never run),
so measured samples and predictions use one unit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fsmoe_compiler.passes.collectives import collective_group, collective_kind, is_collective, is_wait

#: The collective kinds the cost model fits, keyed in ``CostModel.comm`` as ``f"{kind}/{group_size}"``.
KINDS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")

_KIND_OF_OP = {
    "all_to_all_single": "all_to_all",
    "all_to_all": "all_to_all",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce",
}

__all__ = ["KINDS", "comm_key", "node_kind", "value_bytes", "node_bytes", "node_group_size", "is_collective", "is_wait"]


def comm_key(kind: str, group_size: int) -> str:
    """The ``CostModel.comm`` key of a collective kind on a group of ``group_size`` ranks."""
    return f"{kind}/{int(group_size)}"


def node_kind(node: fx.Node) -> str:
    """The cost-model kind of a collective node (``all_to_all`` ...), or its op name if it has none."""
    op = collective_kind(node)
    return _KIND_OF_OP.get(op, op)


def value_bytes(value: Any) -> int:
    """Bytes of a tensor (``numel * element_size``), or the sum over a list/tuple of them; 0 otherwise.

    Works on real tensors and FakeTensors alike. Symbolic sizes that cannot be
    made concrete count as 0 bytes.
    """
    if isinstance(value, torch.Tensor):
        try:
            return int(value.numel()) * value.element_size()
        except Exception:  # noqa: BLE001 - unbacked symbolic numel
            return 0
    if isinstance(value, (list, tuple)):
        return sum(value_bytes(v) for v in value)
    return 0


def node_bytes(node: fx.Node) -> int:
    """Bytes a collective node sends, read from ``meta["val"]`` of its first argument (the input)."""
    arg = node.args[0] if node.args else None
    if isinstance(arg, fx.Node):
        return value_bytes(arg.meta.get("val"))
    if isinstance(arg, (list, tuple)):
        return sum(value_bytes(a.meta.get("val")) for a in arg if isinstance(a, fx.Node))
    return 0


def _resolve_group_size(group_name: str | None) -> int | None:
    if group_name is None:
        return None
    try:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        return int(_resolve_process_group(group_name).size())
    except Exception:  # noqa: BLE001 - unknown name (graph captured in another run)
        return None


def node_group_size(node: fx.Node) -> int | None:
    """Ranks in the collective's process group, or None if it cannot be told.

    Read from the op's own ``group_size`` argument (all-gather, reduce-scatter),
    else from the length of the all-to-all split sizes, else by resolving the
    ``group_name`` argument against the live process groups.
    """
    op = collective_kind(node)
    if "group_size" in node.kwargs:
        return int(node.kwargs["group_size"])
    if op.startswith("all_gather_into_tensor") and len(node.args) > 1 and isinstance(node.args[1], int):
        return node.args[1]
    if op.startswith("reduce_scatter_tensor") and len(node.args) > 2 and isinstance(node.args[2], int):
        return node.args[2]
    if op == "all_to_all_single":
        for splits in node.args[1:3]:
            if isinstance(splits, (list, tuple)) and splits:
                return len(splits)
    return _resolve_group_size(collective_group(node))

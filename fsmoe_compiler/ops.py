"""The op and collective vocabulary of ATen graphs: what every pass, the profiler and the runtime call an op.

One home for "what is a matmul", "what only views a tensor", "what is a
collective, of which kind, on which group, how many bytes": recognition,
chunking, the task graph, verification, the profiler and the runtime import
it, and nothing else defines these sets. The kind *names* live in
:mod:`fsmoe_compiler.names` (pure Python, shared with the scheduler and the
simulator). Imports torch and ``fsmoe_compiler.names`` only, so every layer
may import it.

Op families are sets of ``OpOverload``s and ``OpOverloadPacket``s (every
overload of each op), so a check works whatever overload a graph uses:

* ``ALIAS_OPS`` return a view of their input and do no work;
  ``RESHAPE_OPS`` (``reshape``, ``flatten``) view when they can and copy
  otherwise; ``COPY_OPS`` (``clone``, ``_to_copy``, ``contiguous``) copy or
  cast. ``LAYOUT_OPS`` is the three together: data passes through unchanged
  in value, only its layout (or dtype) changes.
* ``ALLOC_OPS`` take only a shape, dtype and device from their input;
  ``SIZE_QUERY_OPS`` read a size; together ``SHAPE_ONLY_OPS``: they carry
  no data of their input.
* Matmuls: ``PLAIN_MATMUL_OPS`` multiply two operands (``mm``, ``bmm``,
  ``matmul``); ``MATMUL_OPS`` adds ``addmm``/``baddbmm`` and the grouped
  GEMMs (``GROUPED_MM_OPS``).

Collectives are told by namespace (``_c10d_functional`` and the other
communication namespaces in :data:`COLLECTIVE_NAMESPACES`): a collective
issues communication, a ``wait_tensor`` completes one. ``collective_op`` is
the op's ATen name, ``collective_kind`` its kind in
:data:`fsmoe_compiler.names.COLLECTIVE_KINDS`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fsmoe_compiler.names import KIND_OF_OP, MODELED_OPS

aten = torch.ops.aten


def overloads(*packets) -> frozenset:
    """Every overload of the given op packets (and the packets), so a check works whatever overload is used."""
    out = set()
    for packet in packets:
        out.add(packet)
        for name in packet.overloads():
            out.add(getattr(packet, name))
    return frozenset(out)


def _present(ns, *names) -> list:
    """Op packets of namespace ``ns`` that exist in this torch build (some are newer than others)."""
    return [getattr(ns, n) for n in names if hasattr(ns, n)]


# ----------------------------------------------------------------------------------------------
# op families

ALIAS_OPS = overloads(
    aten.view, aten._unsafe_view, aten.t, aten.transpose, aten.permute, aten.expand, aten.unsqueeze, aten.squeeze,
    aten.select, aten.slice, aten.alias, aten.detach, aten.unbind, aten.split, aten.split_with_sizes, aten.as_strided,
    aten.unflatten,
)
RESHAPE_OPS = overloads(aten.reshape, aten.flatten)
COPY_OPS = overloads(aten.clone, aten._to_copy, aten.contiguous)
LAYOUT_OPS = ALIAS_OPS | RESHAPE_OPS | COPY_OPS
TRANSPOSE_OPS = overloads(aten.t, aten.transpose, aten.permute)

ALLOC_OPS = overloads(
    aten.new_zeros, aten.new_empty, aten.new_full, aten.new_ones, aten.zeros_like, aten.empty_like, aten.ones_like,
    aten.full_like,
)
SIZE_QUERY_OPS = overloads(aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset)
SHAPE_ONLY_OPS = ALLOC_OPS | SIZE_QUERY_OPS

GROUPED_MM_OPS = overloads(*_present(aten, "_grouped_mm", "_scaled_grouped_mm"))
PLAIN_MATMUL_OPS = overloads(aten.mm, aten.bmm, aten.matmul)
BIAS_MATMUL_OPS = overloads(aten.addmm, aten.baddbmm)
MATMUL_OPS = PLAIN_MATMUL_OPS | BIAS_MATMUL_OPS | GROUPED_MM_OPS

TOPK_OPS = overloads(aten.topk)
ARGMAX_OPS = overloads(aten.argmax, aten.max)  # top-1 selection: argmax(dim), max(dim) -> (values, indices)
SOFTMAX_OPS = overloads(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax)
SIGMOID_OPS = overloads(aten.sigmoid)
SOFTMAX_BACKWARD_OPS = overloads(aten._softmax_backward_data, aten._log_softmax_backward_data)
SIGMOID_BACKWARD_OPS = overloads(aten.sigmoid_backward)
NORM_OPS = overloads(aten.linalg_vector_norm, aten.norm, aten.rsqrt, aten.sqrt)
SCATTER_OPS = overloads(aten.scatter, aten.scatter_add, aten.index_put, aten.index_add, aten.index_put_, aten.index_add_,
                        aten.scatter_add_, aten.scatter_)
GATHER_OPS = overloads(aten.index_select, aten.gather, aten.index)
REDUCE_OPS = frozenset({aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default})
#: Side-effectful ops that only check a condition: ordinary compute, never barriers.
ASSERT_OPS = overloads(aten._assert_async, aten._assert_scalar, aten.sym_constrain_range,
                       aten.sym_constrain_range_for_size, aten._assert_tensor_metadata)


def is_op(node: fx.Node, ops: frozenset) -> bool:
    """``node`` calls one of ``ops``."""
    return node.op == "call_function" and node.target in ops


def is_getitem(node: fx.Node) -> bool:
    """``node`` takes one output of a multi-output op (``operator.getitem``)."""
    return node.op == "call_function" and node.target is operator.getitem


def is_pointwise(target: Any) -> bool:
    """An ATen overload tagged pointwise (elementwise over broadcast operands)."""
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def is_mutating(node: fx.Node) -> bool:
    """A call whose schema says it writes one of its arguments (``copy_``, ``index_put_``...)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def is_random(node: fx.Node) -> bool:
    """A call that draws random numbers (their order must be kept)."""
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def namespace(node: fx.Node) -> str | None:
    """The op namespace of a ``call_function`` node (``aten``, ``_c10d_functional``...), or None."""
    name = getattr(node.target, "name", None)
    if node.op != "call_function" or not callable(name):
        return None
    qualified = node.target.name()
    return qualified.split("::", 1)[0] if "::" in qualified else None


def is_opaque(node: fx.Node) -> bool:
    """A call into an op that is not ATen, prims or a functional collective (e.g. a library's custom kernel)."""
    name = getattr(node.target, "namespace", None)
    return node.op == "call_function" and name is not None and name not in ("aten", "prims", "_c10d_functional")


# ----------------------------------------------------------------------------------------------
# collectives

#: Namespaces whose ops communicate between ranks.
COLLECTIVE_NAMESPACES = frozenset(
    {"_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d", "_dtensor", "symm_mem"}
)
#: The functional collectives' namespaces: an op there returns a tensor a ``wait_tensor`` completes.
FUNCTIONAL_NAMESPACES = frozenset({"_c10d_functional", "c10d_functional"})
#: Namespaces of distributed or stream machinery whose effects the scheduler does not model.
DISTRIBUTED_NAMESPACES = COLLECTIVE_NAMESPACES | {"fsdp", "streams", "nvshmem", "distributed"}
_WAIT = "wait_tensor"


def _functional(*names: str) -> frozenset:
    ns = getattr(torch.ops, "_c10d_functional", None)
    return overloads(*_present(ns, *names)) if ns is not None else frozenset()


ALL_TO_ALL_OPS = _functional("all_to_all_single")
WAIT_OPS = _functional(_WAIT)
COLLECTIVE_OPS = _functional(*MODELED_OPS)


def _parts(node: fx.Node) -> tuple[str, str] | None:
    """``(namespace, op name without overload)`` of a ``call_function`` on a registered op."""
    ns = namespace(node)
    if ns is None:
        return None
    return ns, node.target.name().split("::", 1)[1].split(".")[0]


def is_wait(node: fx.Node) -> bool:
    """A ``wait_tensor`` that completes an asynchronous collective."""
    parts = _parts(node)
    return parts is not None and parts[0] in COLLECTIVE_NAMESPACES and parts[1] == _WAIT


def is_redundant_wait(node: fx.Node) -> bool:
    """A ``wait_tensor`` of what another ``wait_tensor`` returned: the tensor is already complete, so it is the
    identity (tracing ``wait_tensor(all_reduce(x))`` records two waits: funcol adds its own)."""
    src = node.args[0] if node.args else None
    return is_wait(node) and isinstance(src, fx.Node) and is_wait(src)


def is_collective(node: fx.Node) -> bool:
    """A node that communicates (issues a collective); waits are not collectives."""
    parts = _parts(node)
    return parts is not None and parts[0] in COLLECTIVE_NAMESPACES and parts[1] != _WAIT


def is_communication(node: fx.Node) -> bool:
    """A collective or a wait: a node of the communication side."""
    parts = _parts(node)
    return parts is not None and parts[0] in COLLECTIVE_NAMESPACES


def collective_op(node: fx.Node) -> str:
    """The collective's ATen op name without namespace or overload, e.g. ``all_to_all_single``."""
    parts = _parts(node)
    if parts is None:
        raise ValueError(f"node {node.name} is not an operator call")
    return parts[1]


def collective_kind(node: fx.Node) -> str:
    """The collective's kind (``all_to_all`` ...; see ``fsmoe_compiler.names``), or its op name if it has none."""
    op = collective_op(node)
    return KIND_OF_OP.get(op, op)


def is_modeled_collective(node: fx.Node) -> bool:
    """A functional collective the task graph models as one task with its wait (``names.MODELED_OPS``)."""
    return is_collective(node) and namespace(node) in FUNCTIONAL_NAMESPACES and collective_op(node) in MODELED_OPS


def collective_group(node: fx.Node) -> str | None:
    """The process-group name a functional collective runs on (its ``group_name`` argument)."""
    if "group_name" in node.kwargs:
        return str(node.kwargs["group_name"])
    strings = [a for a in node.args if isinstance(a, str)]
    return strings[-1] if strings else None


def collective_sequence(graph: fx.Graph) -> list[tuple[str, str | None]]:
    """Collectives in issue order as ``(op, group)``: what every rank must agree on."""
    return [(collective_op(n), collective_group(n)) for n in graph.nodes if is_collective(n)]


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


def collective_bytes(node: fx.Node) -> int:
    """Bytes a collective node sends (this rank's input), from ``meta["val"]``; 0 when symbolic.

    The same unit the profiler measures live tensors in (``value_bytes``), so
    samples and predictions agree.
    """
    arg = node.args[0] if node.args else None
    if isinstance(arg, fx.Node):
        return value_bytes(arg.meta.get("val"))
    if isinstance(arg, (list, tuple)):
        return sum(value_bytes(a.meta.get("val")) for a in arg if isinstance(a, fx.Node))
    return 0


def _live_group(group_name: str | None) -> Any:
    """The live process group named ``group_name``, or None (no torch.distributed, or a name from another run)."""
    if group_name is None:
        return None
    try:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group_name)
    except Exception:  # noqa: BLE001 - unknown name (graph captured in another run)
        return None


def _resolve_group_size(group_name: str | None) -> int | None:
    group = _live_group(group_name)
    return None if group is None else int(group.size())


def collective_group_size(node: fx.Node) -> int | None:
    """Ranks in the collective's process group, or None if it cannot be told.

    Read from the op's own ``group_size`` argument (all-gather, reduce-scatter),
    else from the length of the all-to-all split sizes, else by resolving the
    ``group_name`` argument against the live process groups.
    """
    op = collective_op(node)
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


#: Functional collectives that must be the only collective in flight on a gloo (CPU) process group.
#: ``all_gather_into_tensor`` (and its coalesced form) runs through ProcessGroupGloo's
#: ``allgather_into_tensor_coalesced``, which corrupts the heap when another collective is in flight beside it:
#: on torch 2.13 with 2 ranks, 8 B - 4 KiB all-gathers issued two at a time (or beside an all-to-all)
#: crashed the process with SIGSEGV or SIGABRT ("malloc(): unaligned tcache chunk detected") within 2000
#: repetitions in 5 runs of 5, and never one at a time. The ``_out`` form (``_allgather_base``) and
#: ``dist.all_gather_into_tensor`` did not crash with four in flight.
GLOO_ALONE_OPS = frozenset({"all_gather_into_tensor", "all_gather_into_tensor_coalesced"})


def is_gloo_group(group: Any, device_type: str = "cpu") -> bool:
    """Whether collectives on ``group`` (a process group or its name) with tensors on ``device_type`` run on
    gloo; False when torch.distributed is not initialised or the name is unknown."""
    import torch.distributed as dist

    if isinstance(group, str):
        group = _live_group(group)
    if group is None or not dist.is_available() or not dist.is_initialized():
        return False
    try:
        backend = str(dist.get_backend(group)).lower()
    except Exception:  # noqa: BLE001 - a group this process is not in
        return False
    if ":" in backend:  # "cpu:gloo,cuda:nccl": the tensors' device picks the backend
        parts = dict(p.split(":", 1) for p in backend.split(",") if ":" in p)
        return parts.get(device_type) == "gloo"
    return backend == "gloo" and device_type == "cpu"


def flies_alone(node: fx.Node) -> bool:
    """A collective that no other collective may be in flight beside (:data:`GLOO_ALONE_OPS` on gloo)."""
    if not is_collective(node) or namespace(node) not in FUNCTIONAL_NAMESPACES:
        return False
    if collective_op(node) not in GLOO_ALONE_OPS:
        return False
    arg = node.args[0] if node.args else None
    first = arg[0] if isinstance(arg, (list, tuple)) and arg else arg
    value = first.meta.get("val") if isinstance(first, fx.Node) else None
    device = value.device.type if isinstance(value, torch.Tensor) else "cpu"
    return is_gloo_group(collective_group(node), device)

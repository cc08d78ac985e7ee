"""Small helpers over ATen FX graphs used by MoE recognition: op families, shapes, networkx views.

Everything here reads a graph and never edits it.
"""

from __future__ import annotations

import operator
from typing import Iterable

import networkx as nx
import torch
import torch.fx as fx

aten = torch.ops.aten


def overloads(*packets) -> frozenset:
    """Every overload of the given op packets, so a check works whatever overload the graph uses."""
    out = set()
    for packet in packets:
        out.add(packet)
        for name in packet.overloads():
            out.add(getattr(packet, name))
    return frozenset(out)


def _optional(namespace, *names) -> list:
    """Op packets that exist in this torch build (some are newer than others)."""
    return [getattr(namespace, n) for n in names if hasattr(namespace, n)]


MATMUL_OPS = overloads(aten.mm, aten.addmm, aten.bmm, aten.baddbmm, *_optional(aten, "_grouped_mm", "_scaled_grouped_mm"))
GROUPED_MM_OPS = overloads(*_optional(aten, "_grouped_mm", "_scaled_grouped_mm"))
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
VIEW_OPS = overloads(
    aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.expand, aten.unsqueeze,
    aten.squeeze, aten.select, aten.slice, aten.alias, aten.clone, aten._to_copy, aten.contiguous, aten.detach,
    aten.unbind, aten.split, aten.split_with_sizes, aten.as_strided, aten.unflatten, aten.flatten,
)


def _c10d_ops(*names: str) -> frozenset:
    ns = getattr(torch.ops, "_c10d_functional", None)
    return overloads(*_optional(ns, *names)) if ns is not None else frozenset()


ALL_TO_ALL_OPS = _c10d_ops("all_to_all_single")
WAIT_OPS = _c10d_ops("wait_tensor")
COLLECTIVE_OPS = _c10d_ops("all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")


def is_op(node: fx.Node, ops: frozenset) -> bool:
    """``node`` calls one of ``ops``."""
    return node.op == "call_function" and node.target in ops


def is_getitem(node: fx.Node) -> bool:
    """``node`` takes one output of a multi-output op (``operator.getitem``)."""
    return node.op == "call_function" and node.target is operator.getitem


def val(node) -> object:
    """The fake value aot_autograd recorded for ``node`` (tensor, SymInt, tuple) or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor(node) -> bool:
    """``node``'s recorded value is a tensor."""
    return isinstance(val(node), torch.Tensor)


def static_int(x) -> int | None:
    """``x`` as a Python int if it is one or a SymInt with a fixed value, else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            expr = x.node.expr
            if expr.is_number:
                return int(expr)
        except Exception:  # noqa: BLE001 - anything odd is "not static"
            return None
    return None


def shape(node) -> tuple | None:
    """The shape of a tensor-valued node with each size an int or None when symbolic."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(static_int(s) for s in v.shape)


def numel(node) -> int | None:
    """Element count of a tensor-valued node, None when any size is symbolic."""
    s = shape(node)
    if s is None or any(d is None for d in s):
        return None
    n = 1
    for d in s:
        n *= d
    return n


def nbytes(node) -> int | None:
    """Bytes of a tensor-valued node, None when any size is symbolic."""
    n = numel(node)
    if n is None:
        return None
    return n * val(node).element_size()


def to_digraph(graph: fx.Graph, nodes: Iterable[fx.Node] | None = None) -> nx.DiGraph:
    """The data-flow graph: an edge from each input node to each user, keyed by node name.

    With ``nodes``, only those nodes and the edges between them.
    """
    g = nx.DiGraph()
    chosen = list(graph.nodes if nodes is None else nodes)
    keep = None if nodes is None else set(chosen)
    for node in chosen:
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            if keep is None or inp in keep:
                g.add_edge(inp.name, node.name)
    return g


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes of ``node`` whose values are tensors (not SymInts or tuples)."""
    return [a for a in node.all_input_nodes if is_tensor(a)]


def matmul_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two multiplied operands (left, right) of a matmul-family node."""
    if not is_op(node, MATMUL_OPS):
        return None
    target = node.target
    if target in overloads(aten.addmm, aten.baddbmm):
        a, b = node.args[1], node.args[2]
    else:
        a, b = node.args[0], node.args[1]
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return a, b
    return None


def in_order(names: Iterable[str], graph: fx.Graph) -> list[str]:
    """``names`` sorted in the graph's node order."""
    wanted = set(names)
    return [n.name for n in graph.nodes if n.name in wanted]


def size_key(x) -> object:
    """A comparable stand-in for one size: the int, or a SymInt's sympy expression (so ``12*s0 == 12*s0``)."""
    i = static_int(x)
    if i is not None:
        return i
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return None


def shape_keys(node) -> tuple | None:
    """The shape of a tensor-valued node as ``size_key``s, symbolic sizes included."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(size_key(s) for s in v.shape)


def prod_key(keys) -> object:
    """The product of size keys (int or sympy expression)."""
    out = 1
    for k in keys:
        if k is None:
            return None
        out = out * k
    return out


def ancestors_of_set(dg: nx.DiGraph, names) -> set[str]:
    """Every node with a path to some node of ``names`` (one reverse search, not one per node)."""
    seen: set[str] = set()
    stack = [p for n in names for p in dg.predecessors(n)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(dg.predecessors(n))
    return seen


TRANSPOSE_OPS = overloads(aten.t, aten.transpose, aten.permute)


def dim_through_transpose(node: fx.Node, dim: int, upward: bool) -> int | None:
    """Where dimension ``dim`` of a transpose-like ``node``'s output is in its input (``upward``) or the reverse.

    None when ``node`` is not ``t``/``transpose``/``permute`` or ``dim`` is out of range.
    """
    out = shape(node)
    if out is None or not is_op(node, TRANSPOSE_OPS):
        return None
    rank = len(out)
    if rank == 0:
        return None
    dim %= rank
    if node.target in overloads(aten.t):
        return dim if rank < 2 else 1 - dim
    if node.target in overloads(aten.transpose):
        a, b = node.args[1] % rank, node.args[2] % rank
        return b if dim == a else a if dim == b else dim
    perm = [p % rank for p in node.args[1]]
    return perm[dim] if upward else perm.index(dim)

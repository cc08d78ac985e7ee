"""Small helpers over ATen FX graphs for the passes: recorded values and shapes, size keys, networkx views, copies.

Everything here reads a graph and never edits it (``copy_graph_module`` makes a copy to edit). Op families and what counts
as a collective live in ``fsmoe_compiler.ops``.
"""

from __future__ import annotations

import copy
from typing import Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from fsmoe_compiler.ops import BIAS_MATMUL_OPS, MATMUL_OPS, TRANSPOSE_OPS, is_op, overloads

aten = torch.ops.aten


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
    if target in BIAS_MATMUL_OPS:
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


def apply_order(gm: fx.GraphModule, order: list[fx.Node]) -> None:
    """Move ``gm``'s nodes into ``order`` (placeholders stay first), lint and recompile."""
    output = gm.graph.output_node()
    for n in order:
        if n.op != "placeholder" and n is not output:
            output.prepend(n)
    gm.graph.lint()
    gm.recompile()


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph passes may edit while ``gm`` stays intact (node names and meta kept).

    The copy is a ``_LazyGraphModule`` (as Inductor's passes use): its Python
    code is generated when first needed, not on every copy and every pass's
    ``recompile()``; variants are profiled through an interpreter and most are
    thrown away, so for them it never is.
    """
    graph = fx.Graph()
    graph._codegen = copy.copy(gm.graph._codegen)
    out_value = graph.graph_copy(gm.graph, {})
    old_output = gm.graph.output_node()
    graph.output(out_value, type_expr=old_output.type).meta = copy.copy(old_output.meta)
    out = _LazyGraphModule(gm, graph)
    out.meta = dict(getattr(gm, "meta", {}))
    return out

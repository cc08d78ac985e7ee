"""What forward and backward recognition share: the graph index, transition tables, the combine's ops.

Both walks label nodes in graph order with states from a transition table: a
sequence of ``Rule`` rows, each a named predicate over what the walk sees at
one node and the state the node then takes. The first row that holds decides,
so a new upstream style is a new row (or a new predicate) in the table of its
direction. ``recognize`` documents the whole scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx

from fsmoe_compiler.ops import (
    ALL_TO_ALL_OPS,
    COLLECTIVE_OPS,
    GATHER_OPS,
    LAYOUT_OPS,
    SCATTER_OPS,
    WAIT_OPS,
    is_op,
    is_opaque,
    overloads,
)
from fsmoe_compiler.passes.graph_utils import nbytes, prod_key, shape_keys, size_key, to_digraph

aten = torch.ops.aten

# Ops that combined data may flow through and still be part of the combine: un-permuting, weighting,
# summing over the k choices, reshaping, communication. The backward's forked gradient flows through the same.
COMBINE_OPS = (
    LAYOUT_OPS
    | SCATTER_OPS
    | GATHER_OPS
    | COLLECTIVE_OPS  # all-to-all, and the all-gather / reduce-scatter of expert sharding
    | WAIT_OPS
    | overloads(
        aten.add, aten.sub, aten.mul, aten.div, aten.sum, aten.cat, aten.stack, aten.where, aten.masked_fill,
        aten.new_zeros, aten.zeros_like, aten.index_copy, aten.copy, aten.copy_, aten.fill, aten.neg,
        aten.masked_scatter, aten.new_empty, aten.empty_like,
    )
)


@dataclass
class GraphIndex:
    """One graph's lookup tables, built once and handed to every recognition step.

    ``dg`` is the data-flow digraph keyed by node name, ``nodes`` the nodes in
    graph (topological) order and ``pos`` each node's index there; ``grad``
    (backward graphs) names the nodes that carry an incoming gradient.
    Ancestor and descendant sets are cached, as several steps ask for the same
    ones; they are frozen so no caller can change the cache.
    """

    gm: fx.GraphModule
    dg: nx.DiGraph
    nodes: list[fx.Node]
    by_name: dict[str, fx.Node]
    pos: dict[str, int]
    grad: frozenset[str] = frozenset()
    _ancestors: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    _descendants: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, gm: fx.GraphModule, grad: Iterable[str] = ()) -> GraphIndex:
        """The index of ``gm``'s graph; ``grad`` names the gradient-carrying nodes of a backward graph."""
        nodes = list(gm.graph.nodes)
        return cls(
            gm=gm,
            dg=to_digraph(gm.graph),
            nodes=nodes,
            by_name={n.name: n for n in nodes},
            pos={n.name: i for i, n in enumerate(nodes)},
            grad=frozenset(grad),
        )

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def ancestors(self, name: str) -> frozenset[str]:
        """Every node with a path to ``name`` (cached)."""
        if name not in self._ancestors:
            self._ancestors[name] = frozenset(nx.ancestors(self.dg, name))
        return self._ancestors[name]

    def descendants(self, name: str) -> frozenset[str]:
        """Every node ``name`` has a path to (cached)."""
        if name not in self._descendants:
            self._descendants[name] = frozenset(nx.descendants(self.dg, name))
        return self._descendants[name]

    def after(self, node: fx.Node) -> list[fx.Node]:
        """The nodes after ``node`` in graph order."""
        return self.nodes[self.pos[node.name] + 1:]

    def in_order(self, names: Iterable[str]) -> list[str]:
        """``names`` in graph order (names of no node are dropped)."""
        return sorted({n for n in names if n in self.pos}, key=self.pos.__getitem__)


# ----------------------------------------------------------------------------------------------
# transition tables

#: ``Rule.to`` for "the state the node's labelled inputs carry" (a getitem of a labelled tuple, or any
#: op that neither permutes nor multiplies in the backward).
SAME = "same as its inputs"

#: ``Rule.mark``s: what else a walk records when the row fires.
EXPERT_MATMUL = "expert matmul"  # one of the experts' matmuls: counted, and one level deeper
OPAQUE = "opaque"  # an op outside ATen the combine runs into: named in the region's notes
DISPATCH_WEIGHTS = "dispatch weights"  # the gradient of soft dispatch weights: router work


@dataclass(frozen=True)
class Rule:
    """One row of a transition table: at a node where ``when(seen)`` holds the node takes state ``to``.

    ``to`` None gives the node no state (the region ends before it); ``SAME``
    passes its inputs' state on. ``mark`` asks the walk to record the node too.
    """

    name: str
    when: Callable[[Any], bool]
    to: str | None
    mark: str | None = None


def first_match(rules: Sequence[Rule], seen: Any) -> Rule:
    """The first rule of ``rules`` whose predicate holds for ``seen`` (every table ends with a catch-all)."""
    for rule in rules:
        if rule.when(seen):
            return rule
    raise LookupError(f"no transition rule matches {seen!r}")


def always(seen: Any) -> bool:
    """The catch-all predicate that ends a table."""
    return True


# ----------------------------------------------------------------------------------------------
# sizes both directions read the same way


def expert_buffer(index: GraphIndex, names: Iterable[str], num_experts: object,
                  hidden: object) -> tuple[int | None, bool]:
    """The first ``[experts, capacity, hidden]`` buffer among ``names`` (graph order): ``(capacity, found)``.

    The experts may be spread over leading dimensions (Megatron's ``[ranks, local experts, capacity, hidden]``).
    The capacity is None when it is symbolic (dynamic shapes).
    """
    for name in index.in_order(names):
        sk = shape_keys(index.by_name[name])
        if sk and len(sk) >= 3 and prod_key(sk[:-2]) == num_experts and sk[-1] == hidden:
            return (sk[-2] if isinstance(sk[-2], int) else None), True
    return None, False


def all_to_alls(index: GraphIndex, names: Iterable[str]) -> tuple[list[str], int | None]:
    """The ``all_to_all_single`` nodes among ``names`` in graph order, and the bytes they send.

    The bytes are None when there are none or some size is symbolic.
    """
    a2a = index.in_order(n for n in names if is_op(index.by_name[n], ALL_TO_ALL_OPS))
    total: int | None = 0 if a2a else None
    for name in a2a:
        b = nbytes(index.by_name[name].args[0])
        total = None if (b is None or total is None) else total + b
    return a2a, total


# ----------------------------------------------------------------------------------------------
# expert GEMMs done by an opaque custom op (a library's fallback for ``_grouped_mm``), told by signature


def _trailing_pair(node: fx.Node) -> tuple | None:
    """The last two sizes of a floating-point tensor of rank 2 or 3 (a weight, or a stack of per-expert weights)."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point or v.dim() not in (2, 3):
        return None
    return tuple(shape_keys(node)[-2:])


def opaque_gemm_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(rows, weight)`` of an opaque op whose signature is a GEMM of rows by a weight, else None.

    The op is outside ATen (``is_opaque``) and returns one tensor ``[..., N]``;
    among its tensor inputs are rows ``[..., K]`` with the output's leading
    sizes and a floating-point weight ``[K, N]`` or ``[E, K, N]`` (either
    order of K and N: a transposed view). Integer inputs (group offsets) may
    come along. Whether the rows are routed tokens and the weight a constant
    is for the caller to ask (data flow), not this signature.
    """
    if not is_opaque(node):
        return None
    out = shape_keys(node)
    if not out or len(out) < 2:
        return None
    ins = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    for rows in ins:
        rk = shape_keys(rows)
        if not rk or len(rk) != len(out) or rk[:-1] != out[:-1]:
            continue
        for weight in ins:
            pair = _trailing_pair(weight) if weight is not rows else None
            if pair is not None and sorted(map(str, pair)) == sorted(map(str, (rk[-1], out[-1]))):
                return rows, weight
    return None


def opaque_gemm_backward_operands(node: fx.Node, grad: frozenset[str]) -> tuple[fx.Node, fx.Node] | None:
    """``(gradient, weight)`` of an opaque op whose signature is the backward of a GEMM of rows by a weight.

    The op is outside ATen, takes a gradient ``[..., N]`` (a node of ``grad``)
    and a weight ``[K, N]`` or ``[E, K, N]`` that is no gradient, and returns
    (among its outputs) the weight's gradient (the weight's shape) or the rows'
    gradient ``[..., K]`` with the gradient's leading sizes.
    """
    if not is_opaque(node):
        return None
    v = node.meta.get("val")
    outs = [o for o in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(o, torch.Tensor)]
    out_keys = {tuple(size_key(d) for d in o.shape) for o in outs}
    ins = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    for g in (a for a in ins if a.name in grad):
        gk = shape_keys(g)
        if not gk or len(gk) < 2:
            continue
        for weight in ins:
            pair = _trailing_pair(weight) if weight.name not in grad else None
            if pair is None or gk[-1] not in pair:
                continue
            k = pair[0] if pair[1] == gk[-1] else pair[1]
            if shape_keys(weight) in out_keys or gk[:-1] + (k,) in out_keys:
                return g, weight
    return None

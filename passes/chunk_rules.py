"""Per-op layout rules for ``passes.chunk``: how a split along the capacity dimension flows through an op.

A tensor of a chunked region has one of three layouts:

* ``Split(dim, outer, size, inner)``: ``shape[dim] == outer * size * inner`` and
  the chunked factor is the middle one (``size`` is the capacity ``C``). Chunk
  ``k`` of ``r`` holds, along ``dim``, the indices whose middle factor lies in
  ``[k * size / r, (k + 1) * size / r)``. A pure dimension has ``outer == inner == 1``;
  ``[W, C, M]`` viewed as ``[W * C, M]`` is ``Split(0, W, C, 1)``.
* ``UNSPLIT``: every chunk uses the whole tensor (a weight, a routing tensor).
* ``PARTIAL``: each chunk computes a tensor of the full shape and the value is
  the sum over chunks (a contraction over the split dimension: expert weight
  gradients).

A rule looks at the layouts known so far for one node's tensor inputs and its
output (``None`` when unknown) and returns the layouts they imply, in both
directions: from inputs to the output, and from the output or one operand to
the other operands (a saved activation in the backward graph learns its split
from the gradient it is multiplied with). ``Unchunkable`` says the known
layouts contradict each other or the op cannot carry the split.

The rules only read shapes from ``node.meta["val"]``; they never edit a graph.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from fsmoe_compiler.ops import (ALL_TO_ALL_OPS, COPY_OPS, PLAIN_MATMUL_OPS, REDUCE_OPS, TRANSPOSE_OPS, WAIT_OPS,
                                is_pointwise, overloads)
from fsmoe_compiler.passes.graph_utils import shape

aten = torch.ops.aten


class Unchunkable(Exception):
    """The op cannot carry the split as the known layouts ask; the message says why."""


@dataclass(frozen=True)
class Split:
    """``shape[dim] == outer * size * inner``; chunks cut the ``size`` factor."""

    dim: int
    outer: int
    size: int
    inner: int

    def describe(self) -> str:
        if self.outer == 1 and self.inner == 1:
            return f"dim {self.dim}"
        return f"dim {self.dim} (outer {self.outer} x {self.size} x inner {self.inner})"


@dataclass(frozen=True)
class _Whole:
    """A layout without a split: ``UNSPLIT`` (each chunk uses all of it) or ``PARTIAL`` (sum over chunks)."""

    name: str

    def __repr__(self) -> str:
        return self.name


UNSPLIT = _Whole("UNSPLIT")
PARTIAL = _Whole("PARTIAL")
Layout = Union[Split, _Whole]
Lookup = Callable[[fx.Node], Optional[Layout]]
Rule = Callable[[fx.Node, Lookup], dict]


# ----------------------------------------------------------------------------------------------
# shape helpers


def static_shape(node: fx.Node) -> tuple[int, ...]:
    """``node``'s shape as ints; symbolic or missing shapes cannot be chunked."""
    s = shape(node)
    if s is None or any(d is None for d in s):
        raise Unchunkable(f"node {node.name} has a symbolic or unknown shape")
    return s


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The positional tensor operands of ``node`` in order (lists of tensors flattened)."""
    out: list[fx.Node] = []
    for a in node.args:
        items = a if isinstance(a, (list, tuple)) else [a]
        out.extend(x for x in items if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor))
    return out


def map_factor(src: tuple[int, ...], lay: Split, dst: tuple[int, ...], what: str) -> Split:
    """Where the split factor of ``lay`` over row-major ``src`` lands in ``dst`` (same elements, new shape).

    The factor occupies flat strides ``[lo, lo * size)`` with ``lo = inner *
    prod(src[dim+1:])``; it lands in the one dimension ``e`` of ``dst`` whose
    stride divides ``lo`` and whose span is a multiple of ``lo * size``.
    """
    lo = lay.inner * math.prod(src[lay.dim + 1 :])
    hi = lo * lay.size
    for e in range(len(dst)):
        stride = math.prod(dst[e + 1 :])
        span = stride * dst[e]
        if lo % stride == 0 and span % hi == 0:
            return Split(e, span // hi, lay.size, lo // stride)
    raise Unchunkable(f"the split factor {lay.size} of {list(src)} straddles two dims of {list(dst)} ({what})")


def _same(lay: Optional[Layout], *others: Optional[Layout]) -> Optional[Layout]:
    """The first known layout among ``lay`` and ``others``."""
    for x in (lay, *others):
        if x is not None:
            return x
    return None


# ----------------------------------------------------------------------------------------------
# rules


def reshape_rule(node: fx.Node, lay: Lookup) -> dict:
    """view / _unsafe_view / reshape / squeeze / unsqueeze: track the split factor through merged and split dims."""
    (src,) = tensor_args(node)[:1]
    s_in, s_out = static_shape(src), static_shape(node)
    li, lo = lay(src), lay(node)
    if isinstance(li, Split):
        return {node: map_factor(s_in, li, s_out, node.name)}
    if isinstance(lo, Split):
        return {src: map_factor(s_out, lo, s_in, node.name)}
    known = _same(li, lo)
    return {src: known, node: known} if known is not None else {}


def _transpose_perm(node: fx.Node, rank: int) -> list[int]:
    """Output dim i of a transpose-like node is input dim ``perm[i]``."""
    if node.target in overloads(aten.t):
        return [1, 0] if rank == 2 else list(range(rank))
    if node.target in overloads(aten.transpose):
        a, b = node.args[1] % rank, node.args[2] % rank
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return [p % rank for p in node.args[1]]


def transpose_rule(node: fx.Node, lay: Lookup) -> dict:
    """t / transpose / permute: the split moves with its dimension."""
    src = node.args[0]
    perm = _transpose_perm(node, len(static_shape(node)))
    li, lo = lay(src), lay(node)
    if isinstance(li, Split):
        return {node: replace(li, dim=perm.index(li.dim))}
    if isinstance(lo, Split):
        return {src: replace(lo, dim=perm[lo.dim])}
    known = _same(li, lo)
    return {src: known, node: known} if known is not None else {}


def identity_rule(node: fx.Node, lay: Lookup) -> dict:
    """Same layout in and out (clone, contiguous, detach, alias, wait_tensor, a linear unary op)."""
    src = tensor_args(node)[0]
    known = _same(lay(src), lay(node))
    return {src: known, node: known} if known is not None else {}


def nonlinear_unary_rule(node: fx.Node, lay: Lookup) -> dict:
    """A pointwise function of one tensor (gelu, silu, ...): a split carries over, a partial sum does not."""
    out = identity_rule(node, lay)
    if out.get(node) is PARTIAL:
        raise Unchunkable(f"{node.name} is not linear, so it cannot take a partial sum")
    return out


def expand_rule(node: fx.Node, lay: Lookup) -> dict:
    """expand: the split must be on a dimension that is not broadcast."""
    src = node.args[0]
    s_in, s_out = static_shape(src), static_shape(node)
    lead = len(s_out) - len(s_in)
    li, lo = lay(src), lay(node)
    if isinstance(li, Split):
        if s_in[li.dim] != s_out[li.dim + lead]:
            raise Unchunkable(f"{node.name} expands the split dim")
        return {node: replace(li, dim=li.dim + lead)}
    if isinstance(lo, Split):
        if lo.dim < lead or s_in[lo.dim - lead] != s_out[lo.dim]:
            raise Unchunkable(f"{node.name} splits a broadcast dim")
        return {src: replace(lo, dim=lo.dim - lead)}
    known = _same(li, lo)
    return {src: known, node: known} if known is not None else {}


def _broadcast_dim(operand: tuple[int, ...], out: tuple[int, ...], out_dim: int) -> Optional[int]:
    """The operand dim aligned with ``out_dim`` under broadcasting, or None when broadcast there."""
    d = out_dim - (len(out) - len(operand))
    if d < 0 or operand[d] != out[out_dim]:
        return None
    return d


LINEAR_POINTWISE = overloads(aten.add, aten.sub, aten.mul, aten.div, aten.neg)


def pointwise_rule(node: fx.Node, lay: Lookup) -> dict:
    """A pointwise op of several tensors with broadcasting (mul, add, where, gelu_backward, ...).

    Operands that span the output's split dim are split alike, the others (broadcast
    there) are unsplit. A partial sum passes through add/sub of partial sums and
    through mul/div by an unsplit tensor.
    """
    ops = tensor_args(node)
    s_out = static_shape(node)
    lays = {x: lay(x) for x in ops}
    lo = lay(node)
    split = next((l for l in [lo, *lays.values()] if isinstance(l, Split)), None)
    if split is not None:
        out_split = split if split is lo else None
        if out_split is None:
            src = next(x for x in ops if lays[x] is split)
            out_split = replace(split, dim=split.dim + len(s_out) - len(static_shape(src)))
        implied: dict = {node: out_split}
        for x in ops:
            d = _broadcast_dim(static_shape(x), s_out, out_split.dim)
            implied[x] = UNSPLIT if d is None else replace(out_split, dim=d)
        return implied
    if any(l is PARTIAL for l in [lo, *lays.values()]):
        return _pointwise_partial(node, ops, lays, lo)
    if lo is UNSPLIT:
        return {x: UNSPLIT for x in ops}
    if ops and all(l is UNSPLIT for l in lays.values()):
        return {node: UNSPLIT}
    return {}


def _pointwise_partial(node: fx.Node, ops: list[fx.Node], lays: dict, lo: Optional[Layout]) -> dict:
    """Partial sums through add/sub (all partial) and mul/div (one partial numerator, the rest unsplit)."""
    if node.target not in LINEAR_POINTWISE:
        raise Unchunkable(f"{node.name} is not linear, so it cannot take a partial sum")
    if node.target in overloads(aten.add, aten.sub, aten.neg):
        scalars = [a for a in node.args if not isinstance(a, fx.Node)]
        if scalars or any(l is not None and l is not PARTIAL for l in lays.values()):
            raise Unchunkable(f"{node.name} adds a partial sum to a whole tensor or a number")
        return {node: PARTIAL, **{x: PARTIAL for x in ops}}
    partial = [x for x in ops if lays[x] is PARTIAL]
    if len(partial) > 1 or (partial and node.target in overloads(aten.div) and partial[0] is not ops[0]):
        raise Unchunkable(f"{node.name} multiplies partial sums")
    if not partial:
        return {}  # only the output is known to be partial: which operand is, is ambiguous
    return {node: PARTIAL, **{x: UNSPLIT for x in ops if x is not partial[0]}}


def _matmul_roles(node: fx.Node) -> tuple[str, str, str]:
    """Dimension roles of (A, B, out): batch b, rows n, contraction k, columns m."""
    return ("bnk", "bkm", "bnm") if len(static_shape(node)) == 3 else ("nk", "km", "nm")


def matmul_rule(node: fx.Node, lay: Lookup) -> dict:
    """mm / bmm (and matmul of 2-D or 3-D operands): a split on rows, columns or batch carries to the output;
    a split of the contraction dim in both operands makes the output a partial sum."""
    a, b = node.args[0], node.args[1]
    ra, rb, ro = _matmul_roles(node)
    la, lb, lo = lay(a), lay(b), lay(node)
    for x, roles, l in ((a, ra, la), (b, rb, lb), (node, ro, lo)):
        if isinstance(l, Split):
            role = roles[l.dim]
            implied = {t: (replace(l, dim=rr.index(role)) if role in rr else UNSPLIT)
                       for t, rr in ((a, ra), (b, rb), (node, ro))}
            if role == "k":
                implied[node] = PARTIAL
            return implied
    if la is PARTIAL or lb is PARTIAL:
        if la is PARTIAL and lb is PARTIAL:
            raise Unchunkable(f"{node.name} multiplies two partial sums")
        return {node: PARTIAL, (b if la is PARTIAL else a): UNSPLIT}
    if la is UNSPLIT and lb is UNSPLIT:
        return {node: UNSPLIT}
    if lo is UNSPLIT:
        return {a: UNSPLIT, b: UNSPLIT}
    return {}


def _reduced_dims(node: fx.Node, rank: int) -> tuple[list[int], bool]:
    """The dims a sum/mean reduces and its keepdim flag."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank)), bool(keep)
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(d % rank for d in dims), bool(keep)


def reduce_rule(node: fx.Node, lay: Lookup) -> dict:
    """sum / mean over dims: the split dim survives (renumbered); a sum over it is a partial sum."""
    src = node.args[0]
    rank = len(static_shape(src))
    dims, keep = _reduced_dims(node, rank)
    kept = [d for d in range(rank) if d not in dims or keep]
    li, lo = lay(src), lay(node)
    is_sum = node.target in overloads(aten.sum)
    if isinstance(li, Split):
        if li.dim in dims:
            if not is_sum:
                raise Unchunkable(f"{node.name} averages over the split dim")
            return {node: PARTIAL}
        return {node: replace(li, dim=kept.index(li.dim))}
    if isinstance(lo, Split):
        return {src: replace(lo, dim=kept[lo.dim])}
    if li is PARTIAL:
        if not is_sum:
            raise Unchunkable(f"{node.name} averages a partial sum")
        return {node: PARTIAL}
    if li is UNSPLIT or lo is UNSPLIT:
        return {src: UNSPLIT, node: UNSPLIT} if lo is UNSPLIT else {node: UNSPLIT}
    return {}


def all_to_all_rule(node: fx.Node, lay: Lookup) -> dict:
    """all_to_all_single: a split off dim 0 passes unchanged; on dim 0 every rank's rows must be whole
    ``size * inner`` blocks, so each chunk sends 1/r of every block (the split sizes are scaled)."""
    src = node.args[0]
    li, lo = lay(src), lay(node)
    known = _same(li, lo)
    if known is PARTIAL:
        raise Unchunkable(f"{node.name} would send a partial sum")
    if not isinstance(known, Split) or known.dim != 0:
        return {src: known, node: known} if known is not None else {}
    block = known.size * known.inner
    out_sizes, in_sizes = node.args[1], node.args[2]
    for sizes in (out_sizes, in_sizes):
        if not sizes or any(not isinstance(s, int) or s % block for s in sizes):
            raise Unchunkable(f"{node.name}: split sizes {sizes} are not whole blocks of {block} rows")
    rows_in, rows_out = static_shape(src)[0], static_shape(node)[0]
    return {src: replace(known, outer=rows_in // block), node: replace(known, outer=rows_out // block)}


# ----------------------------------------------------------------------------------------------
# the table


# which rule takes which ops (built from the vocabulary in ``fsmoe_compiler.ops``)
_RESHAPE_RULE_OPS = overloads(aten.view, aten._unsafe_view, aten.reshape, aten.squeeze, aten.unsqueeze)
_IDENTITY_RULE_OPS = COPY_OPS | overloads(aten.detach, aten.alias) | WAIT_OPS
_EXPAND_RULE_OPS = overloads(aten.expand)


def rule_for(node: fx.Node) -> Optional[Rule]:
    """The layout rule of ``node``'s op, or None when chunking has no rule for it."""
    t = node.target
    if node.op != "call_function" or t is operator.getitem:
        return None
    if t in _RESHAPE_RULE_OPS:
        return reshape_rule
    if t in TRANSPOSE_OPS:
        return transpose_rule
    if t in _IDENTITY_RULE_OPS:
        return identity_rule
    if t in _EXPAND_RULE_OPS:
        return expand_rule
    if t in PLAIN_MATMUL_OPS:
        ranks = {len(static_shape(a)) for a in node.args[:2]}
        if t in overloads(aten.matmul) and ranks not in ({2}, {3}):
            return None  # a matmul that broadcasts has no rule
        return matmul_rule
    if t in REDUCE_OPS:
        return reduce_rule
    if t in ALL_TO_ALL_OPS:
        return all_to_all_rule
    if is_pointwise(t):
        if t in LINEAR_POINTWISE or len(tensor_args(node)) > 1:
            return pointwise_rule
        return nonlinear_unary_rule
    return None

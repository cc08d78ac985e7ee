"""Per-op layout rules for ``passes.chunk``: how a split flows through an op.

The split starts at an all-to-all: along the capacity dimension (capacity
dispatch) or along the hidden dimension (dropless dispatch, whose split sizes
are data-dependent: a hidden split keeps them, see ``passes.chunk``).

A tensor of a chunked region has one of three layouts:

* ``Split(dim, outer, size, inner)``: ``shape[dim] == outer * size * inner`` and
  the chunked factor is the middle one (``size`` is the capacity ``C``, or the
  hidden size ``M``). Chunk
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

Where the chunk pass allows it (the hidden split of dropless dispatch), any op
may read a ``PARTIAL`` input whole: its chunks are summed first (the
activation after a hidden-split first expert GEMM). ``apply_rule`` tries a
rule with the partial sums as they are, and, when that contradicts, with them
read whole; ``reads_whole`` tells the rewrite which it chose.

The rules only read shapes from ``node.meta["val"]``; they never edit a graph.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from fsmoe_compiler.ops import (ALL_TO_ALL_OPS, COPY_OPS, GROUPED_MM_OPS, PLAIN_MATMUL_OPS, REDUCE_OPS,
                                TRANSPOSE_OPS, WAIT_OPS, is_pointwise, overloads)
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


def loose_shape(node: fx.Node) -> tuple[Optional[int], ...]:
    """``node``'s shape with ``None`` for symbolic sizes (a split dim must still be an int)."""
    s = shape(node)
    if s is None:
        raise Unchunkable(f"node {node.name} has no known shape")
    return s


def rank(node: fx.Node) -> int:
    return len(loose_shape(node))


def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _arg(node: fx.Node, pos: int, name: str, default):
    """Argument ``pos`` (or keyword ``name``) of ``node``, else ``default``."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


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


def _pass_through(a: fx.Node, b: fx.Node, lay: Lookup) -> dict:
    """``a`` and ``b`` have the same layout (whichever is known)."""
    known = _same(lay(a), lay(b))
    return {a: known, b: known} if known is not None else {}


def reshape_rule(node: fx.Node, lay: Lookup) -> dict:
    """view / _unsafe_view / reshape / squeeze / unsqueeze: track the split factor through merged and split dims."""
    (src,) = tensor_args(node)[:1]
    li, lo = lay(src), lay(node)
    if isinstance(li, Split):
        return {node: map_factor_loose(loose_shape(src), li, loose_shape(node), node.name)}
    if isinstance(lo, Split):
        return {src: map_factor_loose(loose_shape(node), lo, loose_shape(src), node.name)}
    return _pass_through(src, node, lay)


def map_factor_loose(src: tuple[Optional[int], ...], lay: Split, dst: tuple[Optional[int], ...], what: str) -> Split:
    """``map_factor`` where leading sizes may be data-dependent (dropless rows, an unpadded capacity).

    Row-major reshapes keep the flat index modulo the product of any trailing
    block; so when ``src`` and ``dst`` end in static blocks of equal size and the
    split lies inside ``src``'s, it lands inside ``dst``'s, wherever the
    leading (symbolic) dims go.
    """
    if all(d is not None for d in src) and all(d is not None for d in dst):
        return map_factor(src, lay, dst, what)  # type: ignore[arg-type]
    for k in range(lay.dim, -1, -1):  # src[k:] static, holds the split
        if any(d is None for d in src[k:]):
            break
        block, q = math.prod(src[k:]), 1  # type: ignore[arg-type]
        for m in range(len(dst) - 1, -1, -1):
            if dst[m] is None or q * dst[m] > block:
                break
            q *= dst[m]
            if q == block:
                try:
                    split = map_factor(src[k:], replace(lay, dim=lay.dim - k), dst[m:], what)  # type: ignore[arg-type]
                except Unchunkable:
                    break
                return replace(split, dim=split.dim + m)
    raise Unchunkable(f"the split of {list(src)} at dim {lay.dim} cannot be followed into {list(dst)} "
                      f"({what}: symbolic sizes around it)")


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
    perm = _transpose_perm(node, rank(node))
    li, lo = lay(src), lay(node)
    if isinstance(li, Split):
        return {node: replace(li, dim=perm.index(li.dim))}
    if isinstance(lo, Split):
        return {src: replace(lo, dim=perm[lo.dim])}
    return _pass_through(src, node, lay)


def identity_rule(node: fx.Node, lay: Lookup) -> dict:
    """Same layout in and out (clone, contiguous, detach, alias, wait_tensor, a linear unary op)."""
    return _pass_through(tensor_args(node)[0], node, lay)


def nonlinear_unary_rule(node: fx.Node, lay: Lookup) -> dict:
    """A pointwise function of one tensor (gelu, silu, ...): a split carries over, a partial sum does not."""
    out = identity_rule(node, lay)
    if out.get(node) is PARTIAL:
        raise Unchunkable(f"{node.name} is not linear, so it cannot take a partial sum")
    return out


def expand_rule(node: fx.Node, lay: Lookup) -> dict:
    """expand: the split must be on a dimension that is not broadcast."""
    src = node.args[0]
    s_in, s_out = loose_shape(src), loose_shape(node)
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
    return _pass_through(src, node, lay)


def _broadcast_dim(operand: tuple, out: tuple, out_dim: int) -> Optional[int]:
    """The operand dim aligned with ``out_dim`` under broadcasting, or None when broadcast there."""
    d = out_dim - (len(out) - len(operand))
    if d < 0 or operand[d] != out[out_dim]:
        return None
    return d


LINEAR_POINTWISE = overloads(aten.add, aten.sub, aten.mul, aten.div, aten.neg)


def _pointwise(node: fx.Node, ops: list[fx.Node], lay: Lookup, linear: bool) -> dict:
    """Layouts of a pointwise op of ``ops`` with broadcasting.

    Operands that span the output's split dim are split alike, the others (broadcast
    there) are unsplit. A partial sum passes through add/sub of partial sums and
    through mul/div by an unsplit tensor (``linear``: the op is one of those).
    """
    s_out = loose_shape(node)
    lays = {x: lay(x) for x in ops}
    lo = lay(node)
    split = next((l for l in [lo, *lays.values()] if isinstance(l, Split)), None)
    if split is not None:
        out_split = split if split is lo else None
        if out_split is None:
            src = next(x for x in ops if lays[x] is split)
            out_split = replace(split, dim=split.dim + len(s_out) - rank(src))
        implied: dict = {node: out_split}
        for x in ops:
            d = _broadcast_dim(loose_shape(x), s_out, out_split.dim)
            implied[x] = UNSPLIT if d is None else replace(out_split, dim=d)
        return implied
    if any(l is PARTIAL for l in [lo, *lays.values()]):
        if not linear:
            raise Unchunkable(f"{node.name} is not linear, so it cannot take a partial sum")
        return _pointwise_partial(node, ops, lays, lo)
    if lo is UNSPLIT:
        return {x: UNSPLIT for x in ops}
    if ops and all(l is UNSPLIT for l in lays.values()):
        return {node: UNSPLIT}
    return {}


def pointwise_rule(node: fx.Node, lay: Lookup) -> dict:
    """A pointwise op of several tensors with broadcasting (mul, add, where, gelu_backward, ...)."""
    return _pointwise(node, tensor_args(node), lay, node.target in LINEAR_POINTWISE)


def _pointwise_partial(node: fx.Node, ops: list[fx.Node], lays: dict, lo: Optional[Layout]) -> dict:
    """Partial sums through add/sub (all partial) and mul/div (one partial numerator, the rest unsplit)."""
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


def copy_rule(node: fx.Node, lay: Lookup) -> dict:
    """copy(dst, src) (an in-place ``dst.copy_(src)`` after functionalization): the result is ``src``
    broadcast into ``dst``'s shape, so it is laid out like ``src``; ``dst`` only lends its shape."""
    dst, src = node.args[0], node.args[1]
    if lay(src) is PARTIAL or lay(node) is PARTIAL:  # each chunk writes its partial sum into a whole dst
        return {node: PARTIAL, src: PARTIAL, dst: UNSPLIT}
    return _pointwise(node, [dst, src], lay, linear=False)


def _matmul_roles(node: fx.Node) -> tuple[str, str, str]:
    """Dimension roles of (A, B, out): batch b, rows n, contraction k, columns m."""
    return ("bnk", "bkm", "bnm") if rank(node) == 3 else ("nk", "km", "nm")


def _matmul(node: fx.Node, a: fx.Node, b: fx.Node, roles: tuple[str, str, str], lay: Lookup) -> dict:
    """A split on rows, columns or batch carries to the output; a split of the contraction dim in both
    operands makes the output a partial sum."""
    ra, rb, ro = roles
    la, lb, lo = lay(a), lay(b), lay(node)
    for x, rr, l in ((a, ra, la), (b, rb, lb), (node, ro, lo)):
        if isinstance(l, Split):
            role = rr[l.dim]
            implied = {t: (replace(l, dim=tr.index(role)) if role in tr else UNSPLIT)
                       for t, tr in ((a, ra), (b, rb), (node, ro))}
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


#: Result dtypes whose GEMMs are never split along the contraction dim: each partial product would be rounded to
#: the low precision before the sum, where the unsplit GEMM rounds its float32 accumulator once (CPU grouped GEMMs
#: take no float32 result dtype for bf16 operands), so the chunked layer would not compute eager's result.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _exact_partials(node: fx.Node, implied: dict) -> dict:
    """``implied``, or Unchunkable when it makes a low-precision GEMM's result a partial sum."""
    val = node.meta.get("val")
    if implied.get(node) is PARTIAL and isinstance(val, torch.Tensor) and val.dtype in LOW_PRECISION:
        raise Unchunkable(f"{node.name}: a {str(val.dtype).removeprefix('torch.')} GEMM split along its contraction "
                          "dim would add rounded partial products (not eager's result)")
    return implied


def matmul_rule(node: fx.Node, lay: Lookup) -> dict:
    """mm / bmm (and matmul of 2-D or 3-D operands)."""
    return _exact_partials(node, _matmul(node, node.args[0], node.args[1], _matmul_roles(node), lay))


def addmm_rule(node: fx.Node, lay: Lookup) -> dict:
    """addmm(bias, a, b) = bias + a @ b: as mm, the bias broadcast like a pointwise operand; the bias
    would be added once per chunk to a partial sum, so the contraction dim stays whole."""
    bias, a, b = node.args[0], node.args[1], node.args[2]
    implied = _matmul(node, a, b, ("nk", "km", "nm"), lay)
    out = implied.get(node, lay(node))
    if out is PARTIAL:
        raise Unchunkable(f"{node.name} adds a bias to a partial sum")
    if isinstance(out, Split):
        d = _broadcast_dim(loose_shape(bias), loose_shape(node), out.dim)
        implied[bias] = UNSPLIT if d is None else replace(out, dim=d)
    elif out is UNSPLIT:
        implied[bias] = UNSPLIT
    elif isinstance(lay(bias), Split):
        raise Unchunkable(f"{node.name}: a split bias with an unsplit product")
    return implied


def grouped_mm_rule(node: fx.Node, lay: Lookup) -> dict:
    """_grouped_mm(a [N, K], b [G, K, H], offs): rows N are grouped by ``offs`` (whole); a split of K in
    both operands makes a partial sum, a split of H carries to the output's columns."""
    a, b = node.args[0], node.args[1]
    if rank(a) == 2 and rank(b) == 2 and rank(node) == 3:
        return _grouped_mm_2d_rule(node, a, b, lay)
    if rank(a) != 2 or rank(b) != 3 or rank(node) != 2:
        raise Unchunkable(f"{node.name}: grouped GEMM of ranks {rank(a)} x {rank(b)} has no rule")
    others = [x for x in tensor_args(node) if x is not a and x is not b]
    for x, l in ((a, lay(a)), (b, lay(b)), (node, lay(node))):
        if isinstance(l, Split) and l.dim == 0:
            raise Unchunkable(f"{node.name}: the grouped rows (or the groups) cannot be split")
    implied = _exact_partials(node, _matmul(node, a, b, ("nk", "gkm", "nm"), lay))
    implied.update({x: UNSPLIT for x in others})
    return implied


def _grouped_mm_2d_rule(node: fx.Node, a: fx.Node, b: fx.Node, lay: Lookup) -> dict:
    """_grouped_mm(a [M, K], b [K, H], offs) -> [G, M, H] (a weight gradient: the contraction K grouped by
    ``offs``): a split of M or H carries to the output's dim 1 or 2; K stays whole."""
    for x, l in ((a, lay(a)), (b, lay(b))):
        if l is PARTIAL:
            raise Unchunkable(f"{node.name}: a partial sum in a grouped contraction")
    if isinstance(lay(a), Split) and lay(a).dim == 1 or isinstance(lay(b), Split) and lay(b).dim == 0:
        raise Unchunkable(f"{node.name}: the grouped contraction dim cannot be split")
    if isinstance(lay(node), Split) and lay(node).dim == 0:
        raise Unchunkable(f"{node.name}: the groups cannot be split")
    implied = _matmul(node, a, b, ("mk", "kh", "gmh"), lay)
    implied.update({x: UNSPLIT for x in tensor_args(node) if x is not a and x is not b})
    return implied


def _reduced_dims(node: fx.Node, ndim: int) -> tuple[list[int], bool]:
    """The dims a sum/mean reduces and its keepdim flag."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim)), bool(keep)
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(d % ndim for d in dims), bool(keep)


def reduce_rule(node: fx.Node, lay: Lookup) -> dict:
    """sum / mean over dims: the split dim survives (renumbered); a sum over it is a partial sum."""
    src = node.args[0]
    ndim = rank(src)
    dims, keep = _reduced_dims(node, ndim)
    kept = [d for d in range(ndim) if d not in dims or keep]
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
    """all_to_all_single: a split off dim 0 passes unchanged (the split sizes stay: the hidden split of
    dropless dispatch); on dim 0 every rank's rows must be whole ``size * inner`` blocks, so each chunk
    sends 1/r of every block (the split sizes are scaled)."""
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


# -- indexing: the split must lie on another dim than the one indexed


def _removed(l: Optional[Layout], dim: int, node: fx.Node) -> Optional[Layout]:
    """``l`` of a tensor after ``dim`` is removed (select), or Unchunkable when the split is on it."""
    if not isinstance(l, Split):
        return l
    if l.dim == dim:
        raise Unchunkable(f"{node.name} picks one index of the split dim")
    return replace(l, dim=l.dim - (l.dim > dim))


def _inserted(l: Optional[Layout], dim: int) -> Optional[Layout]:
    """``l`` of a tensor after a dim is inserted at ``dim`` (the inverse of ``_removed``)."""
    return replace(l, dim=l.dim + (l.dim >= dim)) if isinstance(l, Split) else l


def _not_on(l: Optional[Layout], dim: int, node: fx.Node, what: str) -> Optional[Layout]:
    if isinstance(l, Split) and l.dim == dim:
        raise Unchunkable(f"{node.name} {what} along the split dim")
    return l


def select_rule(node: fx.Node, lay: Lookup) -> dict:
    """select(x, dim, i) (``x[i]``, a per-expert slice of a received buffer): the other dims keep their split."""
    src = node.args[0]
    dim = _dim(node.args[1], rank(src))
    li, lo = lay(src), lay(node)
    if li is not None:
        return {node: _removed(li, dim, node)}
    if lo is not None:
        return {src: _inserted(lo, dim)}
    return {}


def select_backward_rule(node: fx.Node, lay: Lookup) -> dict:
    """select_backward(grad, sizes, dim, i): ``grad`` written into zeros at index i of a new dim."""
    grad = node.args[0]
    dim = _dim(node.args[2], len(node.args[1]))
    lg, lo = lay(grad), lay(node)
    if lg is not None:
        return {node: _inserted(lg, dim)}
    if lo is not None:
        return {grad: _removed(lo, dim, node)}
    return {}


def select_scatter_rule(node: fx.Node, lay: Lookup) -> dict:
    """select_scatter(x, src, dim, i) (``y[i] = src`` after functionalization): out like x, src like x[i]."""
    x, src = node.args[0], node.args[1]
    dim = _dim(node.args[2], rank(x))
    known = _same(lay(x), lay(node), _inserted(lay(src), dim))
    if known is None:
        return {}
    return {x: known, node: known, src: _removed(known, dim, node)}


def _slice_whole(node: fx.Node, src_dims: tuple, dim: int) -> bool:
    start = _arg(node, 2, "start", None)
    end = _arg(node, 3, "end", None)
    step = _arg(node, 4, "step", 1)
    size = src_dims[dim]
    return (start in (None, 0)) and step == 1 and (end is None or (isinstance(size, int) and end >= size))


def slice_rule(node: fx.Node, lay: Lookup) -> dict:
    """slice(x, dim, start, end): the split must lie on another dim (or the slice takes all of it)."""
    src = node.args[0]
    dim = _dim(_arg(node, 1, "dim", 0), rank(src))
    known = _same(lay(src), lay(node))
    if isinstance(known, Split) and known.dim == dim and not _slice_whole(node, loose_shape(src), dim):
        raise Unchunkable(f"{node.name} slices the split dim")
    return {src: known, node: known} if known is not None else {}


def slice_backward_rule(node: fx.Node, lay: Lookup) -> dict:
    """slice_backward(grad, sizes, dim, start, end, step): the split must lie on another dim."""
    grad = node.args[0]
    dim = _dim(node.args[2], len(node.args[1]))
    known = _not_on(_same(lay(grad), lay(node)), dim, node, "scatters")
    return {grad: known, node: known} if known is not None else {}


def split_rule(node: fx.Node, lay: Lookup) -> dict:
    """split / split_with_sizes(x, sizes, dim): every piece keeps the split of x (the layout of the
    node is the layout of each of its pieces); unbind drops ``dim``."""
    src = node.args[0]
    ndim = rank(src)
    dim = _dim(_arg(node, 1 if node.target in overloads(aten.unbind) else 2, "dim", 0), ndim)
    li, lo = lay(src), lay(node)
    if node.target in overloads(aten.unbind):
        if li is not None:
            return {node: _removed(li, dim, node)}
        return {src: _inserted(lo, dim)} if lo is not None else {}
    known = _not_on(_same(li, lo), dim, node, "splits")
    return {src: known, node: known} if known is not None else {}


def getitem_rule(node: fx.Node, lay: Lookup) -> dict:
    """One piece of a split-like op: the piece's layout is the op's."""
    return _pass_through(node.args[0], node, lay)


def cat_rule(node: fx.Node, lay: Lookup) -> dict:
    """cat(tensors, dim): every input carries the output's split (off ``dim``), or all are partial sums."""
    parts = [x for x in node.args[0] if isinstance(x, fx.Node)]
    dim = _dim(_arg(node, 1, "dim", 0), rank(node))
    known = _not_on(_same(lay(node), *(lay(x) for x in parts)), dim, node, "concatenates")
    return {x: known for x in [node, *parts]} if known is not None else {}


def stack_rule(node: fx.Node, lay: Lookup) -> dict:
    """stack(tensors, dim): a new dim at ``dim``; every input carries the split."""
    parts = [x for x in node.args[0] if isinstance(x, fx.Node)]
    dim = _dim(_arg(node, 1, "dim", 0), rank(node))
    known_in = _same(*(lay(x) for x in parts)) if parts else None
    if known_in is not None:
        return {node: _inserted(known_in, dim), **{x: known_in for x in parts}}
    lo = lay(node)
    if lo is not None:
        return {x: _removed(lo, dim, node) for x in parts}
    return {}


def index_select_rule(node: fx.Node, lay: Lookup) -> dict:
    """index_select(x, dim, index) (a row permutation of dispatched tokens): the split off ``dim`` carries."""
    src, index = node.args[0], node.args[2]
    dim = _dim(node.args[1], rank(src))
    known = _not_on(_same(lay(src), lay(node)), dim, node, "gathers")
    if known is PARTIAL:
        return {src: PARTIAL, node: PARTIAL, index: UNSPLIT}
    return {src: known, node: known, index: UNSPLIT} if known is not None else {}


def index_rule(node: fx.Node, lay: Lookup) -> dict:
    """index(x, [rows]) (``x[perm]``): one 1-D index tensor on dim 0; the split of another dim carries."""
    src, indices = node.args[0], node.args[1]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node) or rank(indices[0]) != 1:
        raise Unchunkable(f"{node.name}: advanced indexing other than x[rows] has no rule")
    known = _not_on(_same(lay(src), lay(node)), 0, node, "gathers")
    return {src: known, node: known, indices[0]: UNSPLIT} if known is not None else {}


def index_put_rule(node: fx.Node, lay: Lookup) -> dict:
    """index_put(x, [rows], values) (``out[perm] = y``, an un-permute into a fresh buffer): one 1-D index
    tensor on dim 0; x, values and the result share a split of another dim. A partial sum is read whole."""
    src, indices, values = node.args[0], node.args[1], node.args[2]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node) or rank(indices[0]) != 1:
        raise Unchunkable(f"{node.name}: advanced indexing other than x[rows] = y has no rule")
    if not isinstance(values, fx.Node) or rank(values) != rank(src):
        raise Unchunkable(f"{node.name}: the values are not whole rows of the target")
    known = _not_on(_same(lay(src), lay(node), lay(values)), 0, node, "scatters")
    if known is PARTIAL:
        raise Unchunkable(f"{node.name} would write a partial sum")
    return {src: known, node: known, values: known, indices[0]: UNSPLIT} if known is not None else {}


def like_rule(node: fx.Node, lay: Lookup) -> dict:
    """empty_like / zeros_like / ...: shaped like the input, so split like it; a partial sum of zeros is zero."""
    src = node.args[0]
    known = _same(lay(src), lay(node))
    if known is PARTIAL and node.target not in overloads(aten.zeros_like, aten.empty_like):
        raise Unchunkable(f"{node.name} would fill a partial sum with a constant")
    return {src: known, node: known} if known is not None else {}


def new_alloc_rule(node: fx.Node, lay: Lookup) -> dict:
    """new_empty / new_zeros / new_empty_strided(x, size, ...): x lends only dtype and device; the new
    tensor is split like its users want (its size argument is rescaled)."""
    lo = lay(node)
    if lo is PARTIAL and node.target not in overloads(aten.new_zeros, aten.new_empty, aten.new_empty_strided):
        raise Unchunkable(f"{node.name} would fill a partial sum with a constant")
    if isinstance(lo, Split):
        size = node.args[1] if len(node.args) > 1 else None
        if not isinstance(size, (list, tuple)) or not isinstance(size[lo.dim], int):
            raise Unchunkable(f"{node.name}: the size of the split dim is not a number")
        if node.target in overloads(aten.new_empty_strided) and not all(isinstance(x, int) for x in node.args[2]):
            raise Unchunkable(f"{node.name}: symbolic strides")
    return {}


# ----------------------------------------------------------------------------------------------
# reading a partial sum whole


def _partial_inputs(node: fx.Node, lay: Lookup) -> list[fx.Node]:
    return [x for x in node.all_input_nodes if lay(x) is PARTIAL]


def _conflicts(node: fx.Node, implied: dict, lay: Lookup) -> dict:
    """The claims of ``implied`` that contradict known layouts. An op making its own result a partial sum
    where its users asked for it whole is none: they will read it summed."""
    return {k: v for k, v in implied.items()
            if v is not None and lay(k) is not None and lay(k) != v
            and not (k is node and v is PARTIAL and lay(k) is UNSPLIT)}


def apply_rule(rule: Rule, node: fx.Node, lay: Lookup, read_whole: bool = True) -> dict:
    """``rule`` at ``node``, reading its partial-sum inputs whole where their partial form contradicts.

    First the rule sees the inputs as they are; if that raises or contradicts a
    known layout, and some input is a partial sum (and ``read_whole``), it sees
    those inputs as unsplit (they will be summed before the op) and its claims
    about them are dropped. The op's result is then never a partial sum.
    Without ``read_whole`` the first answer stands (or raises).
    """
    if not read_whole:
        implied = rule(node, lay)
        bad = {k: v for k, v in implied.items() if v is not None and lay(k) is not None and lay(k) != v}
        if bad:
            raise Unchunkable("; ".join(f"{k.name} would be both {lay(k)} and {v} (at {node.name})"
                                        for k, v in bad.items()))
        return implied
    try:
        implied = rule(node, lay)
        bad = _conflicts(node, implied, lay)
        if not bad:
            return implied
        first: Exception = Unchunkable(
            "; ".join(f"{k.name} would be both {lay(k)} and {v} (at {node.name})" for k, v in bad.items()))
    except Unchunkable as exc:
        first = exc
    partial = _partial_inputs(node, lay)
    if not partial or lay(node) is PARTIAL:
        raise first
    whole = set(partial)
    seen = lambda v: UNSPLIT if v in whole else lay(v)  # noqa: E731
    implied = {k: v for k, v in rule(node, seen).items() if k not in whole}
    if implied.get(node) is PARTIAL:
        raise first
    return implied


def reads_whole(node: fx.Node, value: fx.Node, layouts: dict) -> bool:
    """``node`` reads its input ``value`` (a partial sum) whole: summed first. A node whose own result is
    a partial sum reads its partial inputs chunk by chunk; any other reads them whole."""
    return layouts.get(value) is PARTIAL and layouts.get(node) is not PARTIAL


# ----------------------------------------------------------------------------------------------
# the table


# which rule takes which ops (built from the vocabulary in ``fsmoe_compiler.ops``)
_RESHAPE_RULE_OPS = overloads(aten.view, aten._unsafe_view, aten.reshape, aten.squeeze, aten.unsqueeze)
_IDENTITY_RULE_OPS = COPY_OPS | overloads(aten.detach, aten.alias) | WAIT_OPS
_EXPAND_RULE_OPS = overloads(aten.expand)
_TABLE: dict = {
    **dict.fromkeys(overloads(aten.copy), copy_rule),
    **dict.fromkeys(overloads(aten.addmm), addmm_rule),
    **dict.fromkeys(GROUPED_MM_OPS, grouped_mm_rule),
    **dict.fromkeys(overloads(aten.select), select_rule),
    **dict.fromkeys(overloads(aten.select_backward), select_backward_rule),
    **dict.fromkeys(overloads(aten.select_scatter), select_scatter_rule),
    **dict.fromkeys(overloads(aten.slice), slice_rule),
    **dict.fromkeys(overloads(aten.slice_backward), slice_backward_rule),
    **dict.fromkeys(overloads(aten.split, aten.split_with_sizes, aten.unbind), split_rule),
    **dict.fromkeys(overloads(aten.cat), cat_rule),
    **dict.fromkeys(overloads(aten.stack), stack_rule),
    **dict.fromkeys(overloads(aten.index_select), index_select_rule),
    **dict.fromkeys(overloads(aten.index), index_rule),
    **dict.fromkeys(overloads(aten.index_put), index_put_rule),
    **dict.fromkeys(overloads(aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like), like_rule),
    **dict.fromkeys(overloads(aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty_strided),
                    new_alloc_rule),
}
#: ops whose output is a list of tensors a ``getitem`` picks from
MULTI_OUTPUT_RULE_OPS = overloads(aten.split, aten.split_with_sizes, aten.unbind)
#: ops whose first argument lends only its dtype and device (the rewrite never reassembles it for them)
SHAPE_ONLY_RULE_OPS = overloads(aten.new_empty, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty_strided)


def rule_for(node: fx.Node) -> Optional[Rule]:
    """The layout rule of ``node``'s op, or None when chunking has no rule for it."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is operator.getitem:
        src = node.args[0]
        ok = isinstance(src, fx.Node) and src.op == "call_function" and src.target in MULTI_OUTPUT_RULE_OPS
        return getitem_rule if ok else None
    if t in _TABLE:
        return _TABLE[t]
    if t in _RESHAPE_RULE_OPS:
        return reshape_rule
    if t in TRANSPOSE_OPS:
        return transpose_rule
    if t in _IDENTITY_RULE_OPS:
        return identity_rule
    if t in _EXPAND_RULE_OPS:
        return expand_rule
    if t in PLAIN_MATMUL_OPS:
        ranks = {rank(a) for a in node.args[:2]}
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

"""Dispatch tokens to experts and combine them back: capacity-based and dropless, local or expert-parallel.

Expert parallelism (EP): the ``E`` experts are split evenly over the
``ep_size`` ranks of the EP group, rank ``r`` owning global experts
``r*E_local .. (r+1)*E_local - 1``. Tokens travel to the ranks owning their
experts by ``all_to_all_single_autograd`` (dispatch) and come back by a second
one (combine), written with ``torch.distributed._functional_collectives`` so
that Dynamo traces them into the graph without a break. With ``ep_size == 1``
(or no process group) no collective is issued.

Capacity dispatch (GShard/Switch/Tutel style)
    Capacity ``C = ceil(k*T*cf/E)`` rounded up to ``capacity_multiple``. A
    choice's position in its expert's buffer is the cumulative sum of the
    one-hot expert mask, first choices of all tokens before second choices;
    choices at positions ``>= C`` are dropped (they contribute zero). The
    expert input is a dense ``[E, C, M]`` buffer, so the all-to-alls have
    equal splits and static shapes.

Dropless dispatch (Megatron style)
    Choices are sorted by expert (stable ``argsort``), nothing is dropped.
    With EP, per-expert token counts are exchanged with a small integer
    all-to-all first, then the data all-to-all uses those (uneven) splits.
    The splits and the per-expert slice sizes come from ``.tolist()`` and are
    data-dependent: under ``torch.compile`` they are unbacked SymInts, which
    needs ``torch._dynamo.config.capture_scalar_outputs = True``. Importing
    this module sets that flag (see ``enable_dropless_tracing``), so dropless
    layers trace with zero graph breaks.

In both, the un-permute weights each choice's expert output by its gate and
scatter-adds (``index_add``) over the k choices of a token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from .experts import Experts
from .routers import RouterOutput, compute_capacity

DISPATCHERS = ("capacity", "dropless")


def enable_dropless_tracing() -> None:
    """Let Dynamo turn ``.tolist()`` of token counts into unbacked SymInts instead of breaking the graph.

    Dropless dispatch needs it for its split sizes; it is harmless for other
    code (``.item()``/``.tolist()`` are traced instead of breaking the graph).
    """
    torch._dynamo.config.capture_scalar_outputs = True


enable_dropless_tracing()


def _a2a(x: Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group: dist.ProcessGroup) -> Tensor:
    return funcol.all_to_all_single_autograd(x, out_splits, in_splits, group)


# ---------------------------------------------------------------- capacity


def capacity_positions(indices: Tensor, num_experts: int) -> Tensor:
    """Position of each choice ``[T, k]`` in its expert's buffer: cumsum of the one-hot mask, choice-major.

    All tokens' first choices are placed before any second choice (GShard's
    priority), in token order within a choice rank.
    """
    t, k = indices.shape
    mask = torch.nn.functional.one_hot(indices.t().reshape(-1), num_experts)  # [k*T, E], choice-major
    pos = (torch.cumsum(mask, dim=0) - 1) * mask
    return pos.sum(dim=-1).view(k, t).t()


def capacity_dispatch(x: Tensor, gates: Tensor, indices: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Token-choice routing -> expert buffer ``[E, C, M]``, the flat slot of each choice, and its combine weight.

    Dropped choices (position ``>= C``) go to a spare slot ``E*C`` that is cut
    off, and get weight 0.
    """
    t, k = indices.shape
    m = x.shape[-1]
    pos = capacity_positions(indices, num_experts)
    keep = pos < capacity
    spare = num_experts * capacity
    slot = torch.where(keep, indices * capacity + pos, torch.full_like(pos, spare)).reshape(-1)
    x_rep = x.unsqueeze(1).expand(t, k, m).reshape(t * k, m)
    buf = x.new_zeros(spare + 1, m).index_add(0, slot, x_rep)
    weights = gates * keep.to(gates.dtype)
    return buf[:spare].view(num_experts, capacity, m), slot, weights


def capacity_combine(out: Tensor, slot: Tensor, weights: Tensor) -> Tensor:
    """Inverse of ``capacity_dispatch``: gather each choice's output, weight it by its gate, sum over the k choices."""
    e, c, m = out.shape
    t, k = weights.shape
    flat = torch.cat([out.reshape(e * c, m), out.new_zeros(1, m)], dim=0)
    per_choice = flat.index_select(0, slot).view(t, k, m)
    return (per_choice * weights.unsqueeze(-1)).sum(dim=1)


def run_experts_capacity(buf: Tensor, experts: Experts, group: dist.ProcessGroup | None, ep_size: int) -> Tensor:
    """Apply the experts to ``[E, C, M]``; with EP, all-to-all to the owners and back (equal splits)."""
    if ep_size == 1:
        return experts.forward_capacity(buf)
    e, c, m = buf.shape
    e_local = e // ep_size
    recv = _a2a(buf.contiguous(), None, None, group)  # [ep, E_local, C, M]: source rank major
    local_in = recv.view(ep_size, e_local, c, m).transpose(0, 1).reshape(e_local, ep_size * c, m)
    local_out = experts.forward_capacity(local_in)
    send = local_out.view(e_local, ep_size, c, m).transpose(0, 1).reshape(e, c, m)
    return _a2a(send.contiguous(), None, None, group)


# ---------------------------------------------------------------- dropless


def sort_by_expert(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of the ``T*k`` choices by expert: ``(order, token_of_sorted, counts [E])``."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add(0, flat, torch.ones_like(flat))
    return order, torch.div(order, k, rounding_mode="floor"), counts


def run_experts_dropless(
    x_sorted: Tensor, counts: Tensor, experts: Experts, group: dist.ProcessGroup | None, ep_size: int
) -> Tensor:
    """Apply experts to rows sorted by expert (``counts [E]`` rows each); with EP, uneven all-to-alls.

    EP: counts go first (integer all-to-all, equal splits), then the rows with
    per-rank splits; the received rows are (source rank, local expert) major
    and are regrouped per local expert, computed, put back in arrival order
    and returned by the reverse all-to-all.
    """
    n = x_sorted.shape[0]
    if ep_size == 1:
        sizes = counts.tolist()
        torch._check(sum(sizes) == n)
        outs = [experts.forward_expert(j, chunk) for j, chunk in enumerate(torch.split(x_sorted, sizes))]
        return torch.cat(outs, dim=0)
    e = counts.shape[0]
    e_local = e // ep_size
    counts_recv = _a2a(counts, None, None, group)  # [ep * E_local]: from rank r for local expert j
    send_sizes = counts.tolist()
    recv_sizes = counts_recv.tolist()
    for s in send_sizes + recv_sizes:
        torch._check(s >= 0)
    torch._check(sum(send_sizes) == n)
    in_splits = [sum(send_sizes[r * e_local : (r + 1) * e_local]) for r in range(ep_size)]
    out_splits = [sum(recv_sizes[r * e_local : (r + 1) * e_local]) for r in range(ep_size)]
    recv = _a2a(x_sorted, out_splits, in_splits, group)
    pieces = list(torch.split(recv, recv_sizes))  # index r*E_local + j
    results: list[Tensor | None] = [None] * len(pieces)
    for j in range(e_local):
        mine = [pieces[r * e_local + j] for r in range(ep_size)]
        y = experts.forward_expert(j, torch.cat(mine, dim=0))
        for r, part in enumerate(torch.split(y, [recv_sizes[r * e_local + j] for r in range(ep_size)])):
            results[r * e_local + j] = part
    back = torch.cat(results, dim=0)  # type: ignore[arg-type]
    return _a2a(back, in_splits, out_splits, group)


# ---------------------------------------------------------------- modules


class CapacityDispatcher(nn.Module):
    """Capacity-based dispatch for every router kind: token choice, expert choice, SoftMoE."""

    def __init__(
        self,
        num_experts: int,
        capacity_factor: float = 1.25,
        capacity_multiple: int = 1,
        group: dist.ProcessGroup | None = None,
        ep_size: int = 1,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.capacity_multiple = capacity_multiple
        self.group = group
        self.ep_size = ep_size

    def capacity(self, num_tokens: int, top_k: int) -> int:
        """``C`` for token-choice routing of ``num_tokens`` tokens with ``top_k`` choices each."""
        return compute_capacity(num_tokens, self.num_experts, top_k, self.capacity_factor, self.capacity_multiple)

    def forward(self, x: Tensor, routing: RouterOutput, experts: Experts) -> Tensor:
        if routing.kind == "topk":
            cap = self.capacity(x.shape[0], routing.indices.shape[1])
            buf, slot, weights = capacity_dispatch(x, routing.gates, routing.indices, self.num_experts, cap)
            out = run_experts_capacity(buf, experts, self.group, self.ep_size)
            return capacity_combine(out, slot, weights)
        if routing.kind == "expert_choice":
            e, c = routing.indices.shape
            tok = routing.indices.reshape(-1)
            buf = x.index_select(0, tok).view(e, c, x.shape[-1])
            out = run_experts_capacity(buf, experts, self.group, self.ep_size)
            weighted = (out * routing.gates.unsqueeze(-1)).reshape(e * c, -1)
            return x.new_zeros(x.shape).index_add(0, tok, weighted)
        if routing.kind == "soft":
            buf = torch.einsum("tes,tm->esm", routing.dispatch_weights, x)
            out = run_experts_capacity(buf, experts, self.group, self.ep_size)
            return torch.einsum("tes,esm->tm", routing.gates, out)
        raise ValueError(f"unknown routing kind {routing.kind!r}")


class DroplessDispatcher(nn.Module):
    """Dropless (sort-based) dispatch for token-choice routers; uneven all-to-alls under EP."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None, ep_size: int = 1) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.group = group
        self.ep_size = ep_size

    def forward(self, x: Tensor, routing: RouterOutput, experts: Experts) -> Tensor:
        if routing.kind != "topk":
            raise ValueError(f"dropless dispatch needs token-choice (top-k) routing, got {routing.kind!r}")
        order, token_of, counts = sort_by_expert(routing.indices, self.num_experts)
        x_sorted = x.index_select(0, token_of)
        y_sorted = run_experts_dropless(x_sorted, counts, experts, self.group, self.ep_size)
        w = routing.gates.reshape(-1).index_select(0, order).unsqueeze(-1)
        return x.new_zeros(x.shape).index_add(0, token_of, y_sorted * w)

"""Routers: map tokens ``[T, M]`` to a ``RouterOutput`` that every dispatcher understands.

Three kinds of routing exist, and ``RouterOutput.kind`` says which one a router
produced, so a dispatcher can be written once for all routers of a kind:

* ``"topk"`` (token choice: GShard, Switch, Sigmoid, X-MoE, Mixtral, DeepSeek):
  ``gates`` ``[T, k]`` combine weights and ``indices`` ``[T, k]`` expert ids.
  Works with capacity and dropless dispatch.
* ``"expert_choice"``: each expert picks its top-``C`` tokens; ``gates``
  ``[E, C]`` and ``indices`` ``[E, C]`` token ids. Capacity dispatch only.
* ``"soft"`` (SoftMoE): no discrete choice; ``dispatch_weights`` and
  ``gates`` are dense ``[T, E, p]`` (softmax over tokens / over slots).
  Capacity dispatch only (``C = p``, always full).

Every router also returns ``aux_loss`` (a scalar tensor, zero where the router
defines none) and ``probs``, its full score matrix, for diagnostics.

The auxiliary load-balancing loss follows FSMoE's statement of GShard's:
``E * mean_e(P_e * f_e)`` with ``P_e`` the mean routing probability of expert
``e`` over tokens and ``f_e`` the fraction of (first-choice, for GShard-style
routers; all-k, for Mixtral) assignments that go to ``e``. It equals ``1/E``
when routing is perfectly balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ROUTER_KINDS = ("topk", "expert_choice", "soft")


@dataclass
class RouterOutput:
    """What a router decided for a batch of tokens (shapes depend on ``kind``, see module doc)."""

    kind: str
    gates: Tensor
    indices: Tensor | None
    aux_loss: Tensor
    probs: Tensor
    dispatch_weights: Tensor | None = None


def compute_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, multiple: int = 1
) -> int:
    """Expert buffer capacity ``C = ceil(k * T * cf / E)`` rounded up to a multiple of ``multiple``.

    The multiple lets a compiler split ``C`` evenly into pipeline chunks (FSMoE
    rounds to lcm(r_fwd, r_bwd)). At least ``multiple`` so no buffer is empty.
    """
    if multiple < 1:
        raise ValueError(f"capacity_multiple must be >= 1, got {multiple}")
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    cap = math.ceil(top_k * num_tokens * capacity_factor / num_experts)
    cap = max(cap, 1)
    return ((cap + multiple - 1) // multiple) * multiple


def load_balancing_loss(probs: Tensor, indices: Tensor, num_experts: int) -> Tensor:
    """``E * mean_e(P_e * f_e)``: ``P_e`` mean probability, ``f_e`` fraction of the given assignments to ``e``.

    ``probs`` is ``[T, E]``; ``indices`` is ``[T]`` or ``[T, j]`` (the choices
    counted in ``f``). The fraction is not differentiable; the gradient flows
    through ``P``, pushing probability away from overloaded experts.
    """
    idx = indices.reshape(-1)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device).scatter_add(
        0, idx, torch.ones_like(idx, dtype=probs.dtype)
    )
    frac = counts / idx.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.mean(mean_prob * frac)


def _zero(x: Tensor) -> Tensor:
    return x.new_zeros(())


def _check_topk(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")


class Router(nn.Module):
    """Base class: ``forward(x [T, M]) -> RouterOutput``. ``kind`` is a class constant."""

    kind: str = "topk"

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k


class GShardRouter(Router):
    """GShard top-k (default 2): softmax over experts, top-k, renormalise the k gates; GShard aux loss on first choices."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2) -> None:
        super().__init__(d_model, num_experts, top_k)
        _check_topk(top_k, num_experts)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    #: whether the aux loss counts all k choices (Mixtral) or first choices only (GShard)
    aux_counts_all_choices = False

    def forward(self, x: Tensor) -> RouterOutput:
        probs = torch.softmax(self.gate(x), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        counted = top_i if self.aux_counts_all_choices else top_i[:, 0]
        aux = load_balancing_loss(probs, counted, self.num_experts)
        return RouterOutput("topk", gates, top_i, aux, probs)


class SwitchRouter(Router):
    """Switch Transformer top-1: softmax, argmax; the gate is the chosen probability (not renormalised, so the router learns)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1) -> None:
        if top_k != 1:
            raise ValueError(f"the switch router is top-1, got top_k={top_k}")
        super().__init__(d_model, num_experts, 1)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: Tensor) -> RouterOutput:
        probs = torch.softmax(self.gate(x), dim=-1)
        top_p, top_i = torch.topk(probs, 1, dim=-1)
        aux = load_balancing_loss(probs, top_i[:, 0], self.num_experts)
        return RouterOutput("topk", top_p, top_i, aux, probs)


class MixtralRouter(GShardRouter):
    """Mixtral: softmax over experts, top-k, renormalise; aux loss counts all k choices (as HF's Mixtral does)."""

    aux_counts_all_choices = True


class SigmoidRouter(Router):
    """Independent sigmoid score per expert, top-k; gates are the scores, optionally renormalised to sum to 1. No aux loss."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, renormalize: bool = False) -> None:
        super().__init__(d_model, num_experts, top_k)
        _check_topk(top_k, num_experts)
        self.renormalize = renormalize
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: Tensor) -> RouterOutput:
        scores = torch.sigmoid(self.gate(x))
        top_s, top_i = torch.topk(scores, self.top_k, dim=-1)
        gates = top_s / top_s.sum(dim=-1, keepdim=True) if self.renormalize else top_s
        return RouterOutput("topk", gates, top_i, _zero(x), scores)


class XMoERouter(Router):
    """X-MoE: project to ``d_route`` dims, L2-normalise, cosine similarity to normalised expert embeddings / temperature, then GShard.

    The temperature is learnable and clamped to ``[min_temperature, inf)`` so
    the logits cannot blow up.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        d_route: int = 8,
        init_temperature: float = 0.3,
        min_temperature: float = 0.01,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        _check_topk(top_k, num_experts)
        if d_route < 1:
            raise ValueError(f"d_route must be >= 1, got {d_route}")
        self.proj = nn.Linear(d_model, d_route, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, d_route).normal_(0.0, 0.32))
        self.temperature = nn.Parameter(torch.tensor(float(init_temperature)))
        self.min_temperature = min_temperature

    def forward(self, x: Tensor) -> RouterOutput:
        h = F.normalize(self.proj(x), dim=-1)
        emb = F.normalize(self.expert_embeddings, dim=-1)
        logits = (h @ emb.t()) / self.temperature.clamp(min=self.min_temperature)
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        aux = load_balancing_loss(probs, top_i[:, 0], self.num_experts)
        return RouterOutput("topk", gates, top_i, aux, probs)


class DeepSeekRouter(Router):
    """DeepSeek-V3-style: sigmoid scores, a load-balancing bias used only for selection, group-limited top-k.

    Selection: ``s + bias`` (bias is a buffer, never differentiated); experts
    are split into ``num_groups`` groups, each group scored by the sum of its
    top-2 biased scores, the best ``topk_groups`` groups kept, and the top-k
    experts picked inside them. Gates come from the *unbiased* scores of the
    picked experts, normalised to sum to 1 and scaled by ``routed_scaling``.

    The bias is auxiliary-loss-free balancing: forward accumulates per-expert
    token counts in the ``expert_load`` buffer, and ``update_bias()`` (called
    by the training loop after the optimizer step, outside autograd) moves the
    bias of overloaded experts down and of underloaded ones up by
    ``bias_update_rate``, then clears the counts. ``aux_alpha > 0`` adds the
    small sequence-wise balance loss (``alpha * E * mean_e(P_e f_e)``) on
    normalised scores; it is 0 by default, as in DeepSeek-V3.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        num_groups: int = 1,
        topk_groups: int = 1,
        routed_scaling: float = 1.0,
        bias_update_rate: float = 1e-3,
        aux_alpha: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        _check_topk(top_k, num_experts)
        if num_groups < 1 or num_experts % num_groups != 0:
            raise ValueError(f"num_experts={num_experts} must split evenly into num_groups={num_groups}")
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(
                f"top_k={top_k} exceeds the {topk_groups * (num_experts // num_groups)} experts "
                f"in the {topk_groups} selected groups"
            )
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        self.routed_scaling = routed_scaling
        self.bias_update_rate = bias_update_rate
        self.aux_alpha = aux_alpha
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("expert_load", torch.zeros(num_experts))

    def select(self, scores: Tensor) -> Tensor:
        """Group-limited top-k over biased scores ``[T, E]`` -> expert ids ``[T, k]`` (no gradient)."""
        biased = scores.detach() + self.expert_bias
        if self.num_groups > 1:
            t = biased.shape[0]
            per_group = self.num_experts // self.num_groups
            grouped = biased.view(t, self.num_groups, per_group)
            group_score = torch.topk(grouped, min(2, per_group), dim=-1).values.sum(dim=-1)
            keep_groups = torch.topk(group_score, self.topk_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_score).scatter(1, keep_groups, 1.0)
            expert_mask = group_mask.unsqueeze(-1).expand(t, self.num_groups, per_group).reshape(t, -1)
            biased = biased.masked_fill(expert_mask == 0, float("-inf"))
        return torch.topk(biased, self.top_k, dim=-1).indices

    def forward(self, x: Tensor) -> RouterOutput:
        scores = torch.sigmoid(self.gate(x))
        top_i = self.select(scores)
        top_s = scores.gather(1, top_i)
        gates = top_s / (top_s.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling
        flat = top_i.reshape(-1)
        counts = torch.zeros_like(self.expert_load).scatter_add(0, flat, torch.ones_like(flat, dtype=scores.dtype))
        self.expert_load.add_(counts.detach())
        if self.aux_alpha > 0:
            norm = scores / scores.sum(dim=-1, keepdim=True)
            aux = self.aux_alpha * load_balancing_loss(norm, top_i, self.num_experts)
        else:
            aux = _zero(x)
        return RouterOutput("topk", gates, top_i, aux, scores)

    @torch.no_grad()
    def update_bias(self, group: dist.ProcessGroup | None = None) -> Tensor:
        """Move the selection bias toward balance from the counts since the last call; returns the counts used.

        With ``group`` (e.g. the DP or world group), counts are summed over its
        ranks first so every replica applies the same update.
        """
        load = self.expert_load.clone()
        if group is not None and dist.is_initialized():
            dist.all_reduce(load, group=group)
        self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        self.expert_load.zero_()
        return load


class ExpertChoiceRouter(Router):
    """Expert choice: softmax over experts, then each expert takes its top-``C`` tokens by score.

    ``C = compute_capacity(T, E, top_k, capacity_factor, capacity_multiple)``
    capped at ``T``. Balanced by construction, so no aux loss; a token may be
    taken by zero or several experts.
    """

    kind = "expert_choice"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.0,
        capacity_multiple: int = 1,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        self.capacity_factor = capacity_factor
        self.capacity_multiple = capacity_multiple
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes from a batch of ``num_tokens``."""
        cap = compute_capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor, self.capacity_multiple)
        return min(cap, num_tokens)

    def forward(self, x: Tensor) -> RouterOutput:
        probs = torch.softmax(self.gate(x), dim=-1)
        gates, token_idx = torch.topk(probs.t(), self.capacity(x.shape[0]), dim=-1)
        return RouterOutput("expert_choice", gates, token_idx, _zero(x), probs)


class SoftMoERouter(Router):
    """SoftMoE: ``slots_per_expert`` soft slots per expert; dispatch = softmax over tokens, combine = softmax over all slots.

    Dense, no top-k, nothing dropped. The token group is the flattened batch
    given to ``forward`` (on each rank, its local tokens). With
    ``normalize=True`` tokens and slot embeddings are L2-normalised and scaled
    by a learnable scalar, as the SoftMoE paper recommends at large width.
    """

    kind = "soft"

    def __init__(
        self, d_model: int, num_experts: int, top_k: int = 1, slots_per_expert: int = 1, normalize: bool = False
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        self.slots_per_expert = slots_per_expert
        self.normalize = normalize
        self.slot_embeddings = nn.Parameter(
            torch.empty(d_model, num_experts, slots_per_expert).normal_(0.0, d_model**-0.5)
        )
        self.scale = nn.Parameter(torch.tensor(1.0)) if normalize else None

    def forward(self, x: Tensor) -> RouterOutput:
        phi = self.slot_embeddings
        if self.scale is not None:
            x = F.normalize(x, dim=-1)
            phi = self.scale * F.normalize(phi, dim=0)
        logits = torch.einsum("tm,mes->tes", x, phi)
        t = logits.shape[0]
        dispatch = torch.softmax(logits, dim=0)
        combine = torch.softmax(logits.reshape(t, -1), dim=-1).reshape(logits.shape)
        return RouterOutput("soft", combine, None, _zero(x), logits, dispatch_weights=dispatch)


ROUTERS: dict[str, type[Router]] = {
    "gshard": GShardRouter,
    "switch": SwitchRouter,
    "sigmoid": SigmoidRouter,
    "xmoe": XMoERouter,
    "softmoe": SoftMoERouter,
    "mixtral": MixtralRouter,
    "deepseek": DeepSeekRouter,
    "expert_choice": ExpertChoiceRouter,
}


def make_router(name: str, d_model: int, num_experts: int, top_k: int | None = None, **kwargs: object) -> Router:
    """Build a router by name (see ``ROUTERS``); ``top_k=None`` takes the router's default; ``kwargs`` go to its constructor."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid choices: {sorted(ROUTERS)}")
    cls = ROUTERS[name]
    if top_k is None:
        return cls(d_model, num_experts, **kwargs)  # type: ignore[arg-type]
    return cls(d_model, num_experts, top_k, **kwargs)  # type: ignore[arg-type]

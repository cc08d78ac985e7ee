"""Expert FFNs whose weights are stacked over the local experts: ``[E_local, M, H]``.

Two ways to apply them, one per dispatch style:

* ``forward_capacity(x [E_local, N, M])``: one ``bmm`` per weight over the
  expert dimension (capacity dispatch, every expert has the same N).
* ``forward_expert(j, x [n_j, M])``: expert ``j``'s weights as a plain ``mm``
  on its own slice of tokens (dropless dispatch, uneven n_j).

Weights are initialised for all ``num_experts`` experts from the default RNG
(like ``nn.Linear``: uniform in ``±1/sqrt(fan_in)``) and the local slice kept,
so ranks seeded alike hold disjoint slices of one and the same full model —
an expert-parallel model equals the single-process one with the same seed.
Experts have no biases (as in most MoE models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _init_stacked(num_experts: int, fan_in: int, fan_out: int, first: int, count: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    full = torch.empty(num_experts, fan_in, fan_out).uniform_(-bound, bound)
    return nn.Parameter(full[first : first + count].clone())


class Experts(nn.Module):
    """Base: ``num_local`` experts (global ids ``first_expert ..``) of width ``d_model -> d_ff -> d_model``."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, num_local: int | None = None, first_expert: int = 0):
        super().__init__()
        num_local = num_experts if num_local is None else num_local
        if first_expert < 0 or num_local < 1 or first_expert + num_local > num_experts:
            raise ValueError(f"local experts {first_expert}..{first_expert + num_local - 1} not in 0..{num_experts - 1}")
        self.d_model = d_model
        self.d_ff = d_ff
        self.num_experts = num_experts
        self.num_local = num_local
        self.first_expert = first_expert

    def forward_capacity(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_expert(self, j: int, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Same as ``forward_capacity``."""
        return self.forward_capacity(x)


class GeluExperts(Experts):
    """GPT-style FFN per expert: ``gelu(x @ w1) @ w2`` with ``w1 [E_local, M, H]``, ``w2 [E_local, H, M]``."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, num_local: int | None = None, first_expert: int = 0):
        super().__init__(d_model, d_ff, num_experts, num_local, first_expert)
        self.w1 = _init_stacked(num_experts, d_model, d_ff, first_expert, self.num_local)
        self.w2 = _init_stacked(num_experts, d_ff, d_model, first_expert, self.num_local)

    def forward_capacity(self, x: Tensor) -> Tensor:
        return torch.bmm(F.gelu(torch.bmm(x, self.w1)), self.w2)

    def forward_expert(self, j: int, x: Tensor) -> Tensor:
        return F.gelu(x @ self.w1[j]) @ self.w2[j]


class SwiGLUExperts(Experts):
    """SwiGLU FFN per expert (Llama/Mixtral): ``(silu(x @ w1) * (x @ w3)) @ w2``."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, num_local: int | None = None, first_expert: int = 0):
        super().__init__(d_model, d_ff, num_experts, num_local, first_expert)
        self.w1 = _init_stacked(num_experts, d_model, d_ff, first_expert, self.num_local)
        self.w3 = _init_stacked(num_experts, d_model, d_ff, first_expert, self.num_local)
        self.w2 = _init_stacked(num_experts, d_ff, d_model, first_expert, self.num_local)

    def forward_capacity(self, x: Tensor) -> Tensor:
        return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2)

    def forward_expert(self, j: int, x: Tensor) -> Tensor:
        return (F.silu(x @ self.w1[j]) * (x @ self.w3[j])) @ self.w2[j]


EXPERTS: dict[str, type[Experts]] = {"gelu": GeluExperts, "swiglu": SwiGLUExperts}


class DenseFFN(nn.Module):
    """A dense FFN of the same kind, for the shared expert (applied to every token)."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu") -> None:
        super().__init__()
        if kind not in EXPERTS:
            raise ValueError(f"unknown expert kind {kind!r}; valid choices: {sorted(EXPERTS)}")
        self.kind = kind
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False) if kind == "swiglu" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


def make_experts(kind: str, d_model: int, d_ff: int, num_experts: int, num_local: int, first_expert: int) -> Experts:
    """Build stacked experts by name (``"gelu"`` or ``"swiglu"``)."""
    if kind not in EXPERTS:
        raise ValueError(f"unknown expert {kind!r}; valid choices: {sorted(EXPERTS)}")
    return EXPERTS[kind](d_model, d_ff, num_experts, num_local, first_expert)

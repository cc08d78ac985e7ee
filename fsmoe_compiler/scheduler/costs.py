"""Linear cost models and MoE layer specs: the numbers a TaskGraph is built from.

Every operation costs ``alpha + beta * n`` milliseconds (FSMoE's model): ``n`` is
elements for a collective and multiply-accumulates for a GEMM. A ``LayerSpec``
turns one MoE layer's shape into those ``n`` (``../shared/FSMOE.md``, "Cost
model"). Pure Python: the scheduler never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FFN_GEMMS = {"gpt": 2, "swiglu": 3}


@dataclass(frozen=True)
class LinearCost:
    """t(n) = alpha + beta * n, in milliseconds."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or not (math.isfinite(self.alpha) and math.isfinite(self.beta)):
            raise ValueError(f"LinearCost needs finite alpha >= 0 and beta >= 0, got alpha={self.alpha}, beta={self.beta}")

    def __call__(self, n: float) -> float:
        return self.alpha + self.beta * n


@dataclass(frozen=True)
class ClusterCosts:
    """Cost models of one cluster: collectives per element, GEMMs per MAC.

    ``a2a`` and ``allreduce`` use the inter-node link; ``allgather`` and
    ``reducescatter`` the intra-node link (expert sharding within a node).
    ``dense`` prices the attention / dense block's compute per MAC.
    """

    name: str
    a2a: LinearCost
    allgather: LinearCost
    reducescatter: LinearCost
    allreduce: LinearCost
    gemm: dict[str, LinearCost]  # keyed by FFN type: "gpt", "swiglu"
    dense: LinearCost
    gpus: int = 16
    gpus_per_node: int = 8


@dataclass(frozen=True)
class LayerSpec:
    """One transformer block with an MoE FFN, as FSMoE parameterises it.

    B batch per GPU, L sequence length, M hidden, H FFN hidden, f = top-k x
    capacity factor, esp = expert-sharding degree (GPUs of a node), ffn "gpt"
    (2 GEMMs) or "swiglu" (3 GEMMs). ``dense_params`` are the parameters whose
    gradients need the data-parallel all-reduce (attention + gate), elements.
    """

    B: int
    L: int
    M: int
    H: int
    f: float
    gpus: int = 16
    gpus_per_node: int = 8
    esp: int = 8
    ffn: str = "gpt"
    num_experts: int | None = None
    dense_params: int | None = None
    signature_extra: tuple = field(default=())

    def __post_init__(self) -> None:
        if self.ffn not in FFN_GEMMS:
            raise ValueError(f"ffn must be one of {sorted(FFN_GEMMS)}, got {self.ffn!r}")
        for name in ("B", "L", "M", "H", "gpus", "gpus_per_node", "esp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LayerSpec.{name} must be positive, got {getattr(self, name)}")
        if self.f <= 0:
            raise ValueError(f"LayerSpec.f must be positive, got {self.f}")

    # Element / MAC counts per layer and rank (FSMOE.md "Cost model").
    @property
    def a2a_elems(self) -> float:
        return self.f * self.B * self.L * self.M / self.esp

    @property
    def ag_elems(self) -> float:
        return self.f * self.B * self.L * self.M

    @property
    def rs_elems(self) -> float:
        return self.f * self.B * self.L * self.M

    @property
    def expert_macs(self) -> float:
        return self.f * self.B * self.L * self.M * self.H / self.esp * FFN_GEMMS[self.ffn]

    @property
    def attention_macs(self) -> float:
        """QKV + output projections and the two L x L products of self-attention."""
        return self.B * self.L * 4 * self.M * self.M + 2 * self.B * self.L * self.L * self.M

    @property
    def dense_grad_elems(self) -> float:
        """Elements of the dense (attention) gradients all-reduced over data parallel."""
        return float(self.dense_params if self.dense_params is not None else 4 * self.M * self.M)

    def signature(self) -> tuple:
        """Key for solve caches: identical layers are solved once."""
        return (self.B, self.L, self.M, self.H, self.f, self.gpus, self.gpus_per_node, self.esp, self.ffn,
                self.num_experts, self.dense_params, self.signature_extra)

"""The layer model's numbers: a cluster's cost models and an MoE layer's shape, what its task graphs are built from.

Every operation costs ``alpha + beta * n`` milliseconds (FSMoE's model,
:class:`~fsmoe_compiler.scheduler.costs.LinearCost`): ``n`` is elements for a
collective and multiply-accumulates for a GEMM. A :class:`ClusterCosts` holds
one such model per collective kind (the words of ``fsmoe_compiler.names``) and
per GEMM; a :class:`LayerSpec` turns one MoE layer's shape into those ``n``
(``../shared/FSMOE.md``, "Cost model"). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fsmoe_compiler.names import check_kind
from fsmoe_compiler.scheduler.costs import LinearCost

#: GEMMs in one expert FFN, by FFN type.
FFN_GEMMS = {"gpt": 2, "swiglu": 3}


@dataclass(frozen=True)
class ClusterCosts:
    """Cost models of one cluster: collectives per element, GEMMs per MAC.

    One field per collective kind, named by its word in
    ``fsmoe_compiler.names.COLLECTIVE_KINDS`` (``costs.collective(kind)``
    finds it): ``all_to_all`` and ``all_reduce`` use the inter-node link;
    ``all_gather`` and ``reduce_scatter`` the intra-node link (expert sharding
    within a node). ``dense`` prices the attention / dense block's compute per
    MAC.
    """

    name: str
    all_to_all: LinearCost
    all_gather: LinearCost
    reduce_scatter: LinearCost
    all_reduce: LinearCost
    gemm: dict[str, LinearCost]  # keyed by FFN type: "gpt", "swiglu"
    dense: LinearCost
    gpus: int = 16
    gpus_per_node: int = 8

    def collective(self, kind: str) -> LinearCost:
        """The cost model of collective ``kind`` (a word of ``names.COLLECTIVE_KINDS``); ValueError otherwise."""
        return getattr(self, check_kind(kind))


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

"""torchtitan's MoE layer at tiny sizes, as the upstream tests build it: cases, model, inputs, EP, expected facts.

The layer is torchtitan's own ``torchtitan.models.common.moe.MoE`` built from
its config helpers (``make_moe_config``, ``make_router_config``,
``make_routed_experts_config``, ``make_ffn_config``), unchanged:
``TokenChoiceTopKRouter`` (softmax, or sigmoid with group-limited routing and
an expert bias), ``RoutedExperts`` (the token dispatcher's argsort
permutation, ``GroupedExperts`` with ``torch._grouped_mm`` over cumulative
offsets, the combine through torchtitan's ``deterministic_scatter_add``
custom op), and an optional shared SwiGLU expert.

Precision: parameters and activations are fp32. ``GroupedExperts`` casts
tokens and expert weights to bf16 around ``_grouped_mm`` itself (upstream
code, kept); bf16 ``_grouped_mm`` runs on CPU in torch 2.13, forward and
backward, so nothing is patched for it.

Expert parallelism at 2 ranks is applied the way torchtitan applies it:
``ParallelDims(dp_shard=2, ep=2)`` builds the meshes,
``set_moe_sharding_config(enable_ep=True)`` puts the sharding configs on the
MoE config, and ``Module.parallelize`` shards the expert weights along the
expert dimension (DTensor ``Shard(0)`` on the EP mesh) and wires the EP mesh
into the ``AllToAllTokenDispatcher`` (count all-to-all, ``.tolist()`` split
sizes, data all-to-all, rank-major to expert-major permutation). That needs
two process-local settings, applied and undone by :func:`titan_ep` (the test
ranks are reused by later jobs):

* ``torchtitan.distributed.parallel_dims.device_type = "cpu"``: torchtitan
  takes the accelerator type at import and falls back to ``"cuda"`` when
  there is none, so ``init_device_mesh`` would call ``torch.cuda.set_device``
  on this CPU-only build.
* ``set_spmd_backend("partial_dtensor")`` (one of the documented values of
  ``ParallelismConfig.spmd_backend``): the default ``"spmd_types"`` backend
  reads a current SPMD mesh that only torchtitan's trainer sets; with it the
  dispatcher fails on ``current_spmd_mesh().get_group`` outside the trainer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
import torch.nn as nn

D, F, E = 64, 32, 8  # model dim, expert hidden dim, experts
BATCH, SEQ = 2, 8  # tokens per rank: 16


@dataclass(frozen=True)
class TitanCase:
    """One router configuration of torchtitan's MoE and what recognition must report for it."""

    name: str
    score_func: str  # "softmax" (Qwen3) or "sigmoid" (DeepSeek-V3)
    shared: bool
    num_expert_groups: int | None = None  # group-limited routing (DeepSeek-V3): topk over groups, then experts
    num_limited_groups: int | None = None
    route_scale: float = 1.0
    top_k: int = 2

    @property
    def router_kind(self) -> str:
        return f"{self.score_func}-topk"


# DeepSeek-V3 style routes top-3 (as torchtitan's DeepSeek-V3 debug model): its router calls topk three times,
# with k = 2 (best two experts in each group), 2 (groups kept) and 3 (experts), so the k reported shows which
# topk was taken as the routing anchor.
CASES = (
    TitanCase("qwen3-softmax", "softmax", shared=False),
    TitanCase("qwen3-softmax-shared", "softmax", shared=True),
    TitanCase("dsv3-sigmoid-grouped", "sigmoid", shared=False, num_expert_groups=4, num_limited_groups=2,
              route_scale=2.5, top_k=3),
    TitanCase("dsv3-sigmoid-grouped-shared", "sigmoid", shared=True, num_expert_groups=4, num_limited_groups=2,
              route_scale=2.5, top_k=3),
)
CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}


def expected(case: TitanCase) -> dict:
    """The facts every region of ``case`` must carry, forward and backward."""
    return {"router": case.router_kind, "top_k": case.top_k, "num_experts": E, "dropless": True, "capacity": None,
            "hidden": D, "shared_expert": case.shared}


# the region facts :func:`expected` names (``upstream_checks.region_facts``)
FACTS = ("router", "top_k", "num_experts", "dropless", "capacity", "hidden", "shared_expert")


# ------------------------------------------------------------------------------------------------ building


def _normal(std: float):
    return partial(nn.init.normal_, std=std)


def moe_config(case: TitanCase, comm_backend: str = "standard"):
    """torchtitan's ``MoE.Config`` for ``case`` at tiny sizes (seeded normal inits, route_norm as both models)."""
    from torchtitan.models.common import config_utils as cu

    linear = {"weight": _normal(0.1), "bias": nn.init.zeros_}
    experts = {name: _normal(0.1) for name in ("w1_EFD", "w2_EDF", "w3_EFD")}
    return cu.make_moe_config(
        num_experts=E,
        router=cu.make_router_config(
            dim=D, num_experts=E, gate_param_init=linear, top_k=case.top_k, score_func=case.score_func,
            route_norm=True,
            route_scale=case.route_scale, num_expert_groups=case.num_expert_groups,
            num_limited_groups=case.num_limited_groups),
        routed_experts=cu.make_routed_experts_config(
            dim=D, hidden_dim=F, num_experts=E, top_k=case.top_k, param_init=experts, comm_backend=comm_backend),
        shared_experts=(cu.make_ffn_config(dim=D, hidden_dim=F, w1_param_init=linear, w2w3_param_init=linear)
                        if case.shared else None),
    )


def build_moe(case: TitanCase, ep: object = None) -> nn.Module:
    """torchtitan's MoE layer for ``case``, initialised by its own ``init_states`` from the current seed.

    ``ep``, a ``ParallelDims`` from :func:`titan_ep`, parallelizes it with
    expert parallelism (torchtitan's sharding configs and ``parallelize``).
    The expert bias (a buffer torchtitan's optimizer hook updates between
    steps) is set to small seeded values so that it changes the routing.
    """
    cfg = moe_config(case)
    if ep is not None:
        import spmd_types as spmd
        from torchtitan.models.common.moe_sharding import set_moe_sharding_config

        set_moe_sharding_config(cfg, enable_ep=True, enable_sp=False,
                                expert_param_layout={"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)})
    moe = cfg.build()
    moe.init_states()
    with torch.no_grad():
        moe.expert_bias_E.copy_(0.05 * torch.randn(E))
    if ep is not None:
        moe.parallelize(ep)
    return moe


class Block(nn.Module):
    """A dense projection, then torchtitan MoE layers as its transformer blocks hold them (``h + moe(norm(h))``);
    returns a scalar loss."""

    def __init__(self, case: TitanCase, layers: int = 1, ep: object = None) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.norms = nn.ModuleList([nn.RMSNorm(D) for _ in range(layers)])
        self.moes = nn.ModuleList([build_moe(case, ep) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return h.pow(2).mean()


def make_block(name: str, layers: int = 1, seed: int = 0, ep: object = None) -> Block:
    torch.manual_seed(seed)
    return Block(BY_NAME[name], layers, ep)


def inputs(step: int = 0, rank: int = 0) -> torch.Tensor:
    """This rank's ``[batch, seq, dim]`` tokens for ``step`` (different on each rank, as EP ranks see)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, SEQ, D, generator=g).requires_grad_(True)


def update_expert_bias(model: nn.Module, coeff: float = 1e-3) -> None:
    """Auxiliary-loss-free load balancing between steps, as torchtitan's optimizer hook does it in spirit:
    move each expert's bias against its load (sign of mean load minus its load), then reset the counts.

    Not the hook itself (it needs torchtitan's optimizer container and model
    layout); on several ranks each rank updates from its own counts, which is
    enough here, as both the eager and the compiled run read the same bias.
    """
    with torch.no_grad():
        for m in model.modules():
            counts = getattr(m, "tokens_per_expert_E", None)
            bias = getattr(m, "expert_bias_E", None)
            if counts is None or bias is None:
                continue
            bias.add_(coeff * torch.sign(counts.mean() - counts))
            counts.zero_()


# ------------------------------------------------------------------------------------------------ expert parallel


@contextlib.contextmanager
def titan_ep(world_size: int = 2) -> Iterator[object]:
    """torchtitan's ``ParallelDims`` for EP over the default process group, with the two process-local settings
    of the module docstring applied for the block and undone after it."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - the "fake" backend of size-1 mesh axes
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.distributed import utils as titan_dist

    saved = parallel_dims.device_type, titan_dist.get_spmd_backend()
    parallel_dims.device_type = "cpu"  # torchtitan says "cuda" on a machine without an accelerator
    titan_dist.set_spmd_backend("partial_dtensor")  # "spmd_types" needs the trainer's current SPMD mesh
    try:
        dims = parallel_dims.ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=world_size,
                                          world_size=world_size, spmd_backend="partial_dtensor")
        dims.build_mesh()
        yield dims
    finally:
        parallel_dims.device_type = saved[0]
        titan_dist.set_spmd_backend(saved[1])


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (EP-sharded expert weights and their gradients), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t

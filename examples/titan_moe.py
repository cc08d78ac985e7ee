"""A GPT-2-style decoder whose FFNs are torchtitan's own MoE layer, expert-parallel over the process group.

Usage::

    from fsmoe_compiler.examples.titan_moe import build_model, make_batch
    model = build_model()            # after dist.init_process_group: experts sharded over every rank
    loss = model(*make_batch())

The MoE layer is ``torchtitan.models.common.moe.MoE``, built from torchtitan's
config helpers and unchanged: a softmax top-k router (``TokenChoiceTopKRouter``),
dropless ``RoutedExperts`` (argsort permutation, ``GroupedExperts`` with
``torch._grouped_mm``; upstream casts the GEMM operands to bf16), the combine
through torchtitan's ``deterministic_scatter_add`` and an optional shared
SwiGLU expert. torchtitan's layer is always dropless, so ``dispatch`` must be
``"dropless"`` and ``capacity_factor`` is accepted (the bench passes it) but unused.

Expert parallelism is applied as torchtitan applies it (``ParallelDims`` with
``ep`` = the world, ``set_moe_sharding_config(enable_ep=True)``,
``MoE.parallelize``): the expert weights become DTensors sharded along the
expert dim and the token dispatcher exchanges counts, then tokens, with
all-to-alls. Two process-wide settings make that work outside torchtitan's
trainer on a CPU-only build (:func:`_titan_cpu_settings`). The sharded expert
weights carry ``moe.parallel.EXPERT_PARALLEL``, so ``sync_gradients`` and
``sync_gradients_in_graph`` only average their gradients.

Needs the ``ecosystem`` extra (torchtitan installed with ``--no-deps``, with
``spmd_types``, ``tyro``, ``einops`` and ``triton``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._common import apply_overrides, config_batch, lm_loss
from .gpt2_moe import CausalSelfAttention


@dataclass
class TitanMoEConfig:
    """Model shape and MoE options; defaults are tiny (trains in seconds on a CPU)."""

    vocab_size: int = 128
    seq_len: int = 16
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 64
    num_experts: int = 4
    top_k: int = 2
    score_func: str = "softmax"  # torchtitan's router: "softmax" (Qwen3) or "sigmoid" (DeepSeek-V3)
    num_expert_groups: int | None = None  # DeepSeek-V3's group-limited routing: experts in this many groups,
    num_limited_groups: int | None = None  # the top-k taken over the experts of this many best groups
    dispatch: str = "dropless"  # torchtitan's MoE is always dropless
    capacity_factor: float = 1.25  # unused (dropless); accepted so the bench's options apply to every example
    shared_expert: bool = False
    aux_loss_weight: float = 0.0  # torchtitan balances load with an expert bias, not an auxiliary loss
    expert_parallel: bool = True  # shard the experts over the default process group when it has > 1 rank


def _titan_cpu_settings() -> None:
    """Process-wide settings torchtitan's expert parallelism needs outside its trainer, on a CPU-only build.

    * ``parallel_dims.device_type = "cpu"``: torchtitan takes the accelerator
      type at import and says ``"cuda"`` when there is none, so building the
      device mesh would call ``torch.cuda.set_device``;
    * ``set_spmd_backend("partial_dtensor")`` (a documented value of its
      ``spmd_backend`` option): the default backend reads a current SPMD mesh
      that only torchtitan's trainer sets.
    """
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - the "fake" backend of size-1 mesh axes
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.distributed import utils as titan_dist

    parallel_dims.device_type = "cpu"
    titan_dist.set_spmd_backend("partial_dtensor")


def _parallel_dims(world: int) -> Any:
    from torchtitan.distributed.parallel_dims import ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=world, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    return dims


def _moe(cfg: TitanMoEConfig, dims: Any) -> nn.Module:
    """torchtitan's MoE layer for ``cfg`` (seeded normal inits), expert-parallel over ``dims`` if given."""
    from torchtitan.models.common import config_utils as cu

    linear = {"weight": partial(nn.init.normal_, std=0.02), "bias": nn.init.zeros_}
    experts = {name: partial(nn.init.normal_, std=0.02) for name in ("w1_EFD", "w2_EDF", "w3_EFD")}
    moe_cfg = cu.make_moe_config(
        num_experts=cfg.num_experts,
        router=cu.make_router_config(dim=cfg.d_model, num_experts=cfg.num_experts, gate_param_init=linear,
                                     top_k=cfg.top_k, score_func=cfg.score_func, route_norm=True,
                                     num_expert_groups=cfg.num_expert_groups,
                                     num_limited_groups=cfg.num_limited_groups),
        routed_experts=cu.make_routed_experts_config(dim=cfg.d_model, hidden_dim=cfg.d_ff,
                                                     num_experts=cfg.num_experts, top_k=cfg.top_k,
                                                     param_init=experts, comm_backend="standard"),
        shared_experts=(cu.make_ffn_config(dim=cfg.d_model, hidden_dim=cfg.d_ff, w1_param_init=linear,
                                           w2w3_param_init=linear) if cfg.shared_expert else None),
    )
    if dims is not None:
        import spmd_types as spmd
        from torchtitan.models.common.moe_sharding import set_moe_sharding_config

        set_moe_sharding_config(moe_cfg, enable_ep=True, enable_sp=False,
                                expert_param_layout={"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)})
    moe = moe_cfg.build()
    moe.init_states()
    if dims is not None:
        moe.parallelize(dims)
        from fsmoe_compiler.moe.parallel import EXPERT_PARALLEL

        for p in moe.routed_experts.parameters():
            setattr(p, EXPERT_PARALLEL, True)
    return moe


class Block(nn.Module):
    """Pre-LN transformer block whose FFN is torchtitan's MoE layer."""

    def __init__(self, cfg: TitanMoEConfig, dims: Any) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = _moe(cfg, dims)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.moe(self.ln2(x))


class TitanMoE(nn.Module):
    """``forward(idx [B, S], targets=None)`` -> logits ``[B, S, V]``, or the scalar training loss when targets are given."""

    def __init__(self, cfg: TitanMoEConfig) -> None:
        super().__init__()
        if cfg.dispatch != "dropless":
            raise ValueError(f"torchtitan's MoE layer is dropless; dispatch={cfg.dispatch!r} is not available")
        if cfg.num_experts % max(_world(cfg), 1):
            raise ValueError(f"num_experts={cfg.num_experts} must be a multiple of the world size {_world(cfg)}")
        self.config = cfg
        dims = None
        if _world(cfg) > 1:
            _titan_cpu_settings()
            dims = _parallel_dims(_world(cfg))
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, dims) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        s = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(s, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return lm_loss(logits, targets, logits.new_zeros(()), self.config.aux_loss_weight)


def _world(cfg: TitanMoEConfig) -> int:
    if not cfg.expert_parallel or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def build_model(**overrides: Any) -> TitanMoE:
    """The tiny default model, with any ``TitanMoEConfig`` field overridden (unknown names -> ValueError)."""
    return TitanMoE(apply_overrides(TitanMoEConfig(), overrides))


def make_batch(
    batch_size: int = 4, seq_len: int | None = None, vocab_size: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A learnable synthetic batch ``(idx, targets)`` of int64 ``[batch_size, seq_len]`` (defaults from the config)."""
    return config_batch(TitanMoEConfig(), batch_size, seq_len, vocab_size, seed)

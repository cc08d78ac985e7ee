"""A tiny Mixtral-style decoder: RMSNorm, rotary attention with grouped KV heads, top-2 SwiGLU MoE in every layer.

    from fsmoe_compiler.examples.mixtral_moe import build_model, make_batch
    model = build_model()                      # vocab 128, d_model 32, 2 layers, 4 experts, seq 16
    idx, targets = make_batch(batch_size=4, seed=rank)
    loss = model(idx, targets)                 # cross-entropy + aux_loss_weight * sum of router aux losses

Under ``torch.distributed`` the experts are split over the world (or
``ep_group``); seed every rank alike before ``build_model`` so the replicated
weights agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe_compiler.moe import MoELayer

from ._common import apply_overrides, config_batch, lm_loss


@dataclass
class MixtralMoEConfig:
    """Model shape and MoE options; defaults are tiny (trains in seconds on a CPU)."""

    vocab_size: int = 128
    seq_len: int = 16
    d_model: int = 32
    n_heads: int = 4
    n_kv_heads: int = 2
    n_layers: int = 2
    d_ff: int = 64
    num_experts: int = 4
    top_k: int = 2
    router: str = "mixtral"
    dispatch: str = "capacity"  # FSMoE pipelines the static [E, C, M] layout; "dropless" works too
    capacity_factor: float = 1.25
    expert: str = "swiglu"
    shared_expert: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    aux_loss_weight: float = 0.02
    ep_group: Any = None  # passed to MoELayer: None (world if distributed), "local", or a ProcessGroup
    router_kwargs: dict[str, Any] = field(default_factory=dict)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[seq_len, head_dim/2]`` for rotary position embeddings."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (even, odd) of ``x [B, H, S, D]`` by the position angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal attention with rotary embeddings and grouped-query KV heads."""

    def __init__(self, cfg: MixtralMoEConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(
                f"need d_model % n_heads == 0 and n_heads % n_kv_heads == 0, got "
                f"{cfg.d_model}, {cfg.n_heads}, {cfg.n_kv_heads}"
            )
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        cos, sin = rope_tables(cfg.seq_len, self.head_dim, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:s], self.sin[:s]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class DecoderLayer(nn.Module):
    """RMSNorm -> attention -> residual; RMSNorm -> sparse MoE -> residual."""

    def __init__(self, cfg: MixtralMoEConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoELayer(
            cfg.d_model,
            cfg.d_ff,
            cfg.num_experts,
            router=cfg.router,
            top_k=cfg.top_k,
            dispatch=cfg.dispatch,
            capacity_factor=cfg.capacity_factor,
            expert=cfg.expert,
            shared_expert=cfg.shared_expert,
            ep_group=cfg.ep_group,
            router_kwargs=cfg.router_kwargs,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.attn(self.attn_norm(x))
        y, aux = self.moe(self.moe_norm(x))
        return x + y, aux


class MixtralMoE(nn.Module):
    """``forward(idx [B, S], targets=None)`` -> logits ``[B, S, V]``, or the scalar training loss when targets are given."""

    def __init__(self, cfg: MixtralMoEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def moe_layers(self) -> list[MoELayer]:
        return [layer.moe for layer in self.layers]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        x = self.embed(idx)
        aux_total = x.new_zeros(())
        for layer in self.layers:
            x, aux = layer(x)
            aux_total = aux_total + aux
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return lm_loss(logits, targets, aux_total, self.config.aux_loss_weight)


def build_model(**overrides: Any) -> MixtralMoE:
    """The tiny default model, with any ``MixtralMoEConfig`` field overridden (unknown names -> ValueError)."""
    return MixtralMoE(apply_overrides(MixtralMoEConfig(), overrides))


def make_batch(
    batch_size: int = 4, seq_len: int | None = None, vocab_size: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A learnable synthetic batch ``(idx, targets)`` of int64 ``[batch_size, seq_len]`` (defaults from the config)."""
    return config_batch(MixtralMoEConfig(), batch_size, seq_len, vocab_size, seed)

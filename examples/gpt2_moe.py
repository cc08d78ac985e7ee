"""A tiny GPT-2-style decoder whose FFNs are MoE layers (every layer, or every other one).

    from fsmoe_compiler.examples.gpt2_moe import build_model, make_batch
    model = build_model(num_experts=8, moe_every=2)
    idx, targets = make_batch(batch_size=4)
    loss = model(idx, targets)          # cross-entropy + aux_loss_weight * sum of MoE aux losses
    logits = model(idx)                 # [B, S, vocab]

Pre-LayerNorm blocks, learned positions, causal SDPA attention, GELU experts,
tied embeddings — GPT-2's shape at toy size, built to exercise the compiler.
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
class GPT2MoEConfig:
    """Model shape and MoE options; defaults are tiny (trains in seconds on a CPU)."""

    vocab_size: int = 128
    seq_len: int = 16
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 64
    num_experts: int = 4
    top_k: int | None = 2
    router: str = "gshard"
    dispatch: str = "capacity"
    capacity_factor: float = 1.25
    expert: str = "gelu"
    moe_every: int = 1  # 1: every layer is MoE; 2: layers 1, 3, ... are MoE, the others dense
    shared_expert: bool = False
    aux_loss_weight: float = 0.01
    ep_group: Any = None  # passed to MoELayer: None (world if distributed), "local", or a ProcessGroup
    router_kwargs: dict[str, Any] = field(default_factory=dict)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (fused qkv projection, SDPA)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class DenseMLP(nn.Module):
    """GPT-2's dense FFN, for the non-MoE layers; returns a zero aux loss like MoELayer."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(F.gelu(self.fc(x))), x.new_zeros(())


class Block(nn.Module):
    """Pre-LN transformer block; the FFN is a MoELayer or a DenseMLP."""

    def __init__(self, cfg: GPT2MoEConfig, moe: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if moe:
            self.ffn: nn.Module = MoELayer(
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
        else:
            self.ffn = DenseMLP(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.attn(self.ln1(x))
        y, aux = self.ffn(self.ln2(x))
        return x + y, aux


class GPT2MoE(nn.Module):
    """``forward(idx [B, S], targets=None)`` -> logits ``[B, S, V]``, or the scalar training loss when targets are given."""

    def __init__(self, cfg: GPT2MoEConfig) -> None:
        super().__init__()
        if cfg.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {cfg.moe_every}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        # moe_every=2 makes layers 1, 3, ... MoE (GShard/Switch-style alternation)
        self.blocks = nn.ModuleList(
            Block(cfg, moe=(i % cfg.moe_every == cfg.moe_every - 1)) for i in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.02)  # GPT-2's init; N(0, 1) with tied logits starts at loss ~20
        nn.init.normal_(self.wpe.weight, std=0.02)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        s = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(s, device=idx.device))
        aux_total = x.new_zeros(())
        for block in self.blocks:
            x, aux = block(x)
            aux_total = aux_total + aux
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return lm_loss(logits, targets, aux_total, self.config.aux_loss_weight)


def build_model(**overrides: Any) -> GPT2MoE:
    """The tiny default model, with any ``GPT2MoEConfig`` field overridden (unknown names -> ValueError)."""
    return GPT2MoE(apply_overrides(GPT2MoEConfig(), overrides))


def make_batch(
    batch_size: int = 4, seq_len: int | None = None, vocab_size: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A learnable synthetic batch ``(idx, targets)`` of int64 ``[batch_size, seq_len]`` (defaults from the config)."""
    return config_batch(GPT2MoEConfig(), batch_size, seq_len, vocab_size, seed)

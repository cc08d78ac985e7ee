"""Pieces the example models share: config overrides and a learnable synthetic batch."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
from torch import Tensor

C = TypeVar("C")


def apply_overrides(config: C, overrides: dict[str, Any]) -> C:
    """``dataclasses.replace`` with a ValueError that lists the valid fields for an unknown key."""
    names = {f.name for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
    return dataclasses.replace(config, **overrides)  # type: ignore[type-var]


def arithmetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token sequences ``(start + i*step) mod V`` with a random start and step in 1..3: ``(inputs, next-token targets)``.

    Predictable from context (after two tokens the step is known), so the loss
    visibly falls within a few steps; deterministic given ``seed`` (give each
    rank its own seed for data parallelism).
    """
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (batch_size, 1), generator=g)
    step = torch.randint(1, 4, (batch_size, 1), generator=g)
    seq = (start + step * torch.arange(seq_len + 1).unsqueeze(0)) % vocab_size
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def config_batch(cfg: Any, batch_size: int, seq_len: int | None, vocab_size: int | None,
                 seed: int) -> tuple[Tensor, Tensor]:
    """``arithmetic_batch`` with the sequence length and vocabulary of example config ``cfg`` unless given."""
    return arithmetic_batch(batch_size, seq_len or cfg.seq_len, vocab_size or cfg.vocab_size, seed)


def lm_loss(logits: Tensor, targets: Tensor, aux_total: Tensor, aux_weight: float) -> Tensor:
    """Next-token cross-entropy over every position plus the weighted auxiliary load-balancing loss."""
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return ce + aux_weight * aux_total

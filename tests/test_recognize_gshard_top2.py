"""GShard top-2 gating written as two ``argmax`` (DeepSpeed's ``top2gating`` style), without DeepSpeed installed.

The first expert is the ``argmax`` of the softmax; the second the ``argmax`` of the logits with the first
masked out; capacity by ``cumsum`` positions; an auxiliary loss on the mean gates, stored on the module
(an output of the forward graph, a second gradient into the gates' in backward). Forward: one region, top-2
(both argmax counted), softmax routing. Backward: the score softmax's gradient is the anchor (no topk
gradient); the aux loss's per-expert gradient joins the gates' gradient just above it, so the fork is the
nearest split, and k comes from the forward region tied by the saved gate weight. The upstream layer itself is
in ``test_upstream_deepspeed.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsmoe_compiler.passes.recognize import find_moe_regions
from graph_capture import captured

HIDDEN, FFN, EXPERTS, TOKENS = 16, 32, 4, 24


class GShardTop2(nn.Module):
    """Two-argmax top-2 gating with capacity, index dispatch and combine, and a per-expert MLP loop."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = math.ceil(2 * TOKENS / EXPERTS)
        self.wg = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w1 = nn.ParameterList([nn.Parameter(torch.randn(HIDDEN, FFN) / 4) for _ in range(EXPERTS)])
        self.w2 = nn.ParameterList([nn.Parameter(torch.randn(FFN, HIDDEN) / 6) for _ in range(EXPERTS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        tokens = x.reshape(-1, m)
        logits = self.wg(tokens)
        gates = F.softmax(logits, dim=1)
        first = torch.argmax(gates, dim=1)
        mask1 = F.one_hot(first, EXPERTS)
        second = torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1)
        mask2 = F.one_hot(second, EXPERTS)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
        self.l_aux = (gates.mean(dim=0) * mask1.float().mean(dim=0)).mean() * EXPERTS * EXPERTS
        mask1 = mask1 * torch.lt(loc1, self.capacity)
        mask2 = mask2 * torch.lt(loc2, self.capacity)
        g1, g2 = (gates * mask1).sum(dim=1), (gates * mask2).sum(dim=1)
        slots = []
        for idx, mask, loc in ((first, mask1, loc1), (second, mask2, loc2)):
            kept = mask.sum(dim=1) > 0
            slot = idx * self.capacity + (loc * mask).sum(dim=1)
            slots.append(torch.where(kept, slot, torch.full_like(slot, EXPERTS * self.capacity)))
        padded = torch.cat([tokens, tokens.new_zeros(1, m)])
        source = torch.full((EXPERTS * self.capacity + 1,), b * s, dtype=torch.long)
        source = source.scatter(0, torch.cat(slots), torch.arange(b * s).repeat(2))
        buf = padded.index_select(0, source[:-1]).view(EXPERTS, self.capacity, m)
        outs = [F.gelu(buf[e] @ self.w1[e]) @ self.w2[e] for e in range(EXPERTS)]
        expert_out = torch.cat([torch.stack(outs).view(-1, m), tokens.new_zeros(1, m)])
        out = expert_out.index_select(0, slots[0]) * g1[:, None] + expert_out.index_select(0, slots[1]) * g2[:, None]
        return out.reshape(b, s, m)


class Loss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.moe = GShardTop2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.moe(self.norm(x))
        return h.pow(2).mean() + 0.01 * self.moe.l_aux


def _input() -> torch.Tensor:
    return torch.randn(2, TOKENS // 2, HIDDEN, requires_grad=True)


def test_two_argmax_top2_with_aux_loss_is_one_top2_region_in_both_graphs():
    graphs = captured(Loss, inputs=_input)
    (f,) = find_moe_regions(graphs.forward[0], "forward")
    (b,) = find_moe_regions(graphs.backward[0], "backward", [f])
    for r in (f, b):
        assert (r.router, r.num_experts, r.top_k, r.capacity, r.dropless, r.hidden, r.layer) == (
            "softmax-topk", EXPERTS, 2, 12, False, HIDDEN, 0), r
        for role in ("router", "dispatch", "expert", "combine"):
            assert r.nodes[role], f"{r.graph}: no {role} role"
    assert any("top-2 as 2 argmax" in n for n in f.notes), f.notes
    assert any("top-k from the forward graph" in n for n in b.notes), b.notes
    (alone,) = find_moe_regions(graphs.backward[0], "backward")  # without the forward: k unknown, layer found
    assert (alone.top_k, alone.num_experts, alone.capacity) == (None, EXPERTS, 12)

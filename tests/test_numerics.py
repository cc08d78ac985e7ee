"""backend="fsmoe" computes what eager PyTorch computes: outputs and every gradient.

Every router and dispatch style of the reference layers, the example models
and the third-party-style blocks, on one process and on 2 gloo ranks (our
layers and the examples then split their experts over the ranks). Each case also checks that the backend found exactly
one MoE region per layer in the forward and in the backward graph and did not
fall back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fsmoe_compiler
from fsmoe_compiler.demo import example_module
from fsmoe_compiler.moe import MoELayer
from moe_cases import CASE_IDS, CASES, ONE_GRAPH

D, FF, E, TOKENS = 16, 32, 4, 24
# (kind, name, overrides, MoE layers): the example models and the third-party-style blocks of tests/moe_styles.py.
MODEL_CASES = [
    ("example", "mixtral", {}, 2),
    ("example", "mixtral", {"dispatch": "dropless", "shared_expert": True}, 2),
    ("example", "gpt2", {"n_layers": 4, "moe_every": 2}, 2),
    ("style", "loop", {"shared": True}, 2),
    ("style", "capacity", {}, 2),
    ("style", "sort", {"shared": True}, 1),
    ("style", "sort-sigmoid", {}, 1),
]


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


def _compare(model: nn.Module, inputs: tuple, loss_of, label: object) -> dict:
    """Eager vs fsmoe on the same weights and inputs; the largest differences and the region counts."""
    float_inputs = [t for t in inputs if t.is_floating_point()]

    def run(fn):
        for t in float_inputs:
            t.grad = None
        model.zero_grad(set_to_none=True)
        loss = loss_of(fn(*inputs))
        loss.backward()
        grads = {f"input{i}": t.grad.clone() for i, t in enumerate(float_inputs)}
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return {"loss": loss.detach(), **grads}

    with torch._dynamo.config.patch(**ONE_GRAPH):
        ref = run(model)
        compiled = torch.compile(model, backend="fsmoe", options={"strict": True})
        got = run(compiled)
    rep = fsmoe_compiler.report(compiled)
    errors = {}
    assert got.keys() == ref.keys(), f"{label}: gradients differ in which parameters have one"
    for name, r in ref.items():
        g = got[name]
        errors[name] = float((g - r).abs().max()) if g.numel() else 0.0
        if not torch.allclose(g, r, rtol=1e-5, atol=1e-6):
            errors[name + " (NOT CLOSE)"] = errors[name]
    return {
        "case": label,
        "errors": errors,
        "regions": (len(rep.regions("forward")), len(rep.regions("backward"))),
        "fallbacks": rep.fallbacks(),
    }


def _run_case(case: tuple, seed: int) -> dict:
    """One reference-layer case: a dense projection and an MoELayer."""
    torch.manual_seed(0)
    model = Block(*case)
    torch.manual_seed(seed)
    x = torch.randn(TOKENS, D, requires_grad=True)
    result = _compare(model, (x,), lambda loss: loss, case)
    result["expected"] = (1, 1)
    return result


def _run_model_case(case: tuple, seed: int) -> dict:
    """An example model (its own loss) or a third-party-style block (loss = mean square of its output)."""
    kind, name, overrides, layers = case
    torch.manual_seed(0)
    if kind == "example":
        mod = example_module(name)
        model = mod.build_model(**overrides)
        inputs = tuple(mod.make_batch(seed=seed))
        result = _compare(model, inputs, lambda loss: loss, case)
    else:
        import moe_styles

        model = moe_styles.Stack(*(moe_styles.Block(moe_styles.STYLES[name](**overrides)) for _ in range(layers)))
        torch.manual_seed(seed)
        x = torch.randn(2, 12, 16, requires_grad=True)
        result = _compare(model, (x,), lambda out: out.pow(2).mean(), case)
    result["expected"] = (layers, layers)
    return result


def _check(result: dict) -> None:
    bad = {k: v for k, v in result["errors"].items() if "NOT CLOSE" in k}
    assert not bad, f"{result['case']}: fsmoe differs from eager: {bad}"
    assert result["fallbacks"] == [], f"{result['case']}: {result['fallbacks']}"
    assert result["regions"] == result["expected"], (
        f"{result['case']}: regions (forward, backward) = {result['regions']}, expected {result['expected']}"
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_single_process_matches_eager(case):
    torch._dynamo.reset()
    _check(_run_case(case, seed=1))


@pytest.mark.parametrize("case", MODEL_CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(MODEL_CASES)])
def test_example_models_and_third_party_blocks_match_eager(case):
    torch._dynamo.reset()
    _check(_run_model_case(case, seed=1))


def _case_on_rank(rank: int, world_size: int, kind: str, case: tuple) -> dict:
    """One case on this rank: a reference layer (``kind`` "layer") or an example model / third-party block."""
    run = _run_case if kind == "layer" else _run_model_case
    return run(case, seed=100 + rank)


TWO_RANK_CASES = [("layer", c) for c in CASES] + [("model", c) for c in MODEL_CASES]
TWO_RANK_IDS = [f"layer-{i}" for i in CASE_IDS] + [f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(MODEL_CASES)]


@pytest.mark.parametrize("kind, case", TWO_RANK_CASES, ids=TWO_RANK_IDS)
def test_two_ranks_with_expert_parallelism_match_eager(rank_pool, kind, case):
    for result in rank_pool.run(_case_on_rank, (kind, case), timeout_s=240):
        _check(result)

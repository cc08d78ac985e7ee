"""Chunked expert-parallel MoE layers compute what eager computes, on 2 real gloo ranks.

A tiny backend runs ``recognize`` + ``chunk`` (with the requested degree for
every layer) on the forward and backward ATen graphs of aot_autograd and runs
the result eagerly. Forward output, aux loss and every gradient (input and
parameters) must equal eager PyTorch up to float reassociation, for every
router, GELU and SwiGLU experts, with and without a shared expert. Each case
is one job of the session's pool of 2 ranks.
"""

from __future__ import annotations

import pytest
import torch
from moe_cases import violation

D_MODEL, D_FF, EXPERTS = 16, 32, 4


def degree_of(degree, layer: int, kind: str = "forward") -> int:
    """The requested degree of ``layer`` in graph ``kind``: ``degree`` is one int for every layer and graph,
    a dict by layer, or a dict by graph kind ("forward"/"backward")."""
    if isinstance(degree, dict):
        return degree.get(kind, 1) if kind in degree else degree.get(layer, 1)
    return degree


def chunking_backend(degree, infos: list):
    """aot_autograd backend: recognize + chunk each MoE layer into ``degree_of(degree, layer)`` chunks; ``infos`` gets
    ``(graph kind, {layer: ChunkInfo}, notes, number of all_to_all_single nodes)`` per compiled graph."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from fsmoe_compiler.passes.chunk import chunk
    from fsmoe_compiler.passes.context import PassContext
    from fsmoe_compiler.passes.recognize import recognize

    ctx = PassContext()

    def compiler(kind: str):
        def compile_graph(gm, example_inputs):
            ctx.graph_kind = kind
            ctx.chunking = {}
            recognize(gm, ctx)
            ctx.degrees = {r.layer: degree_of(degree, r.layer, kind) for r in ctx.regions[kind]}
            notes = len(ctx.notes)
            chunk(gm, ctx)
            a2a = sum("all_to_all_single" in str(n.target) for n in gm.graph.nodes)
            infos.append((kind, dict(ctx.chunking), ctx.notes[notes:], a2a))
            return make_boxed_func(gm.forward)

        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


class Stack(torch.nn.Module):
    """MoE layers with pre-norm residuals: a model with several regions per graph."""

    def __init__(self, layers: int, **cfg) -> None:
        from fsmoe_compiler.moe import MoELayer

        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(D_MODEL) for _ in range(layers))
        self.moes = torch.nn.ModuleList(MoELayer(D_MODEL, D_FF, EXPERTS, **cfg) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aux = x.new_zeros(())
        for norm, moe in zip(self.norms, self.moes):
            y, a = moe(norm(x))
            x, aux = x + y, aux + a
        return x, aux


def _model(cfg: dict) -> torch.nn.Module:
    from fsmoe_compiler.moe import MoELayer

    torch.manual_seed(0)
    cfg = dict(cfg)
    layers = cfg.pop("layers", None)
    return Stack(layers, **cfg) if layers else MoELayer(D_MODEL, D_FF, EXPERTS, **cfg)


def _run_case(rank: int, cfg: dict, degree) -> dict:
    """Eager vs chunked compiled on this rank's tokens: the worst error per tensor and what chunk did."""
    eager = _model(cfg)
    compiled_layer = _model(cfg)  # same weights (a process group cannot be deep-copied)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 8, D_MODEL, generator=g)
    w = torch.randn(2, 8, D_MODEL, generator=g)
    infos: list = []
    torch._dynamo.reset()
    run = torch.compile(compiled_layer, backend=chunking_backend(degree, infos), fullgraph=True)
    out = {}
    grads = {}
    for name, model in (("eager", eager), ("chunked", run)):
        xi = x.clone().requires_grad_()
        y, aux = model(xi)
        ((y * w).sum() + aux).backward()
        params = eager if name == "eager" else compiled_layer
        out[name] = (y.detach(), aux.detach())
        grads[name] = {"x": xi.grad, **{n: p.grad for n, p in params.named_parameters() if p.grad is not None}}
    errs = {"y": violation(out["chunked"][0], out["eager"][0]), "aux": violation(out["chunked"][1], out["eager"][1])}
    assert grads["chunked"].keys() == grads["eager"].keys(), (grads["chunked"].keys(), grads["eager"].keys())
    errs.update({f"grad {n}": violation(grads["chunked"][n], grads["eager"][n]) for n in grads["eager"]})
    return {"errs": errs, "infos": infos, "nonzero": min(g.abs().max().item() for g in grads["eager"].values())}


def _one_case(rank: int, world_size: int, cfg: dict, degree) -> list:
    return [(cfg, degree, _run_case(rank, cfg, degree))]


def _ids(cases: list) -> list[str]:
    return [f"{i}-{cfg.get('router')}-{cfg.get('dispatch', 'capacity')}" for i, (cfg, _) in enumerate(cases)]


def _check(results: list, want_degree) -> None:
    """Every case on every rank matches eager; ``want_degree(cfg, degree, layer, kind)`` is the degree applied."""
    for per_rank in results:
        for cfg, degree, res in per_rank:
            bad = {k: v for k, v in res["errs"].items() if v > 0}
            assert not bad, f"{cfg} r={degree}: {bad}"
            assert res["nonzero"] > 0, cfg  # every gradient is exercised
            assert len(res["infos"]) == 2, (cfg, res["infos"])  # forward and backward graphs
            for kind, chunking, notes, a2a in res["infos"]:
                assert len(chunking) == cfg.get("layers", 1), (cfg, kind, chunking)
                for layer, info in chunking.items():
                    assert info.degree == want_degree(cfg, degree, layer, kind), (cfg, kind, info)
                counts = cfg.get("dispatch") == "dropless" and kind == "forward"  # the token counts' all-to-all
                assert a2a == sum(2 * info.degree + counts for info in chunking.values()), (cfg, kind, a2a)


ROUTER_CASES = [
    (dict(router="gshard", capacity_factor=1.0), 2),
    (dict(router="switch", capacity_factor=2.0), 4),
    (dict(router="sigmoid", capacity_factor=1.0, expert="swiglu"), 2),
    (dict(router="xmoe", capacity_factor=1.0, shared_expert=True), 4),
    (dict(router="mixtral", capacity_factor=1.0, expert="swiglu", shared_expert=True), 2),
    (dict(router="deepseek", capacity_factor=1.0, router_kwargs=dict(num_groups=2, topk_groups=1)), 2),
    (dict(router="expert_choice", capacity_factor=1.0, expert="swiglu"), 4),
    (dict(router="softmoe", router_kwargs=dict(slots_per_expert=4), shared_expert=True), 2),
    (dict(layers=2, router="gshard", capacity_factor=1.0, expert="swiglu"), {0: 2, 1: 4}),
    (dict(router="gshard", capacity_factor=1.0), {"forward": 1, "backward": 4}),
    (dict(router="switch", capacity_factor=2.0), {"forward": 4, "backward": 2}),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cfg, degree", ROUTER_CASES, ids=_ids(ROUTER_CASES))
def test_chunked_layers_match_eager_for_every_router(rank_pool, cfg, degree):
    _check(rank_pool.run(_one_case, (cfg, degree), timeout_s=150),
           lambda cfg, degree, layer, kind: degree_of(degree, layer, kind))


DROPLESS_CASES = [
    (dict(router="gshard", dispatch="dropless"), 2),
    (dict(router="mixtral", dispatch="dropless", expert="swiglu"), 4),
    (dict(router="deepseek", dispatch="dropless", shared_expert=True,
          router_kwargs=dict(num_groups=2, topk_groups=1)), 2),
    (dict(router="sigmoid", dispatch="dropless", expert="swiglu", shared_expert=True), 8),
    (dict(layers=2, router="gshard", dispatch="dropless", expert="swiglu"), {0: 2, 1: 4}),
    (dict(router="switch", dispatch="dropless"), {"forward": 4, "backward": 2}),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cfg, degree", DROPLESS_CASES, ids=_ids(DROPLESS_CASES))
def test_dropless_layers_are_chunked_along_the_hidden_dim_and_match_eager(rank_pool, cfg, degree):
    results = rank_pool.run(_one_case, (cfg, degree), timeout_s=150)
    _check(results, lambda cfg, degree, layer, kind: degree_of(degree, layer, kind))
    for per_rank in results:
        for cfg, degree, res in per_rank:
            for kind, chunking, notes, a2a in res["infos"]:
                for info in chunking.values():
                    if info.degree > 1:
                        assert info.along == "hidden" and info.split.startswith("the hidden dim of "), info


FALLBACK_CASES = [
    (dict(router="softmoe", router_kwargs=dict(slots_per_expert=1)), 2),  # capacity 1 < r
    (dict(router="gshard", dispatch="dropless"), 32),  # hidden size 16 < r
    (dict(router="mixtral", dispatch="dropless"), 3),  # 3 does not divide the hidden size 16
]
REASONS = ["degree 2 is larger than the capacity 1", "degree 32 is larger than the hidden size 16",
           "degree 3 does not divide the hidden size 16"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cfg, degree, reason", [(*c, r) for c, r in zip(FALLBACK_CASES, REASONS)],
                         ids=_ids(FALLBACK_CASES))
def test_a_degree_that_does_not_fit_runs_unchunked_and_says_why(rank_pool, cfg, degree, reason):
    results = rank_pool.run(_one_case, (cfg, degree), timeout_s=150)
    _check(results, lambda cfg, degree, layer, kind: 1)
    for per_rank in results:
        for cfg, degree, res in per_rank:
            for kind, chunking, notes, a2a in res["infos"]:
                (info,) = chunking.values()
                assert info.degree == 1 and info.requested == degree and info.reason == reason, info
                assert any(info.reason in n for n in notes), notes

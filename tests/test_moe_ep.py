"""Expert parallelism on 2 gloo ranks: the EP MoELayer equals the same weights run on one process.

Each rank owns half the experts. For rank r's tokens x_r, the EP layer's
output must equal the full (local) layer's output on x_r; the gradient of a
local expert must equal the full layer's gradient summed over every rank's
loss (its tokens come from all ranks); router and input gradients come from
rank r's loss alone. Checked eagerly and under torch.compile, for capacity
and dropless dispatch. Each scenario is one job of the session's pool of 2
ranks; the tracing checks of every router and dispatch share one job.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fsmoe_compiler.moe import DISPATCHERS, ROUTERS
from fsmoe_compiler.moe.layer import CAPACITY_ONLY_ROUTERS

D_MODEL, D_FF, EXPERTS, TOKENS = 8, 16, 4, 12


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(2, TOKENS // 2, D_MODEL, generator=g)
    w = torch.randn(2, TOKENS // 2, D_MODEL, generator=g)
    return x, w


def _loss(layer, x, w):
    y, aux = layer(x)
    return (y * w).sum() + aux, y


def _compare(rank: int, world_size: int, cfg: dict, compiled: bool) -> dict:
    from fsmoe_compiler.moe import MoELayer

    torch.manual_seed(0)
    ep = MoELayer(D_MODEL, D_FF, EXPERTS, **cfg)
    assert ep.ep_size == world_size and ep.num_local_experts == EXPERTS // world_size

    # Reference: a local layer holding every expert, built from gathered EP weights.
    torch.manual_seed(123)  # deliberately different init: everything must come from the gather
    ref = MoELayer(D_MODEL, D_FF, EXPERTS, ep_group="local", **cfg)
    with torch.no_grad():
        for name, p_ref in ref.named_parameters():
            p_ep = dict(ep.named_parameters())[name]
            if name.startswith("experts."):
                parts = [torch.empty_like(p_ep) for _ in range(world_size)]
                dist.all_gather(parts, p_ep.detach().contiguous())
                p_ref.copy_(torch.cat(parts, dim=0))
            else:
                p_ref.copy_(p_ep)

    x, w = _inputs(rank)
    x = x.requires_grad_()
    run = torch.compile(ep, backend="aot_eager", fullgraph=True) if compiled else ep
    loss, y = _loss(run, x, w)
    loss.backward()

    ref_loss, y_ref = _loss(ref, x.detach().clone().requires_grad_(), w)
    ref_params = dict(ref.named_parameters())
    # Expert gradients: sum over every rank's loss (each rank's tokens reach every expert).
    expert_grad = {n: torch.zeros_like(p) for n, p in ref_params.items() if n.startswith("experts.")}
    for r in range(world_size):
        xr, wr = _inputs(r)
        xr = xr.requires_grad_()
        lr, _ = _loss(ref, xr, wr)
        names = list(ref_params)
        grads = torch.autograd.grad(lr, [ref_params[n] for n in names] + [xr], allow_unused=True)
        if r == rank:
            own = {n: g for n, g in zip(names, grads[:-1])}
            x_grad_ref = grads[-1]
        for n, g in zip(names, grads[:-1]):
            if n in expert_grad and g is not None:
                expert_grad[n] += g

    lo, hi = rank * ep.num_local_experts, (rank + 1) * ep.num_local_experts
    errs = {"y": (y - y_ref).abs().max().item(), "x.grad": (x.grad - x_grad_ref).abs().max().item()}
    for n, p in ep.named_parameters():
        if n.startswith("experts."):
            want = expert_grad[n][lo:hi]
        else:
            want = own[n] if own[n] is not None else torch.zeros_like(p)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        errs[n] = (got - want).abs().max().item()
    errs["|y|"] = y_ref.abs().max().item()
    errs["|expert grad|"] = max(g.abs().max().item() for g in expert_grad.values())
    return errs


def _scenarios(rank: int, world_size: int, scenarios: list) -> list:
    torch._dynamo.reset()
    return [(cfg, compiled, _compare(rank, world_size, cfg, compiled)) for cfg, compiled in scenarios]


def _check(results: list) -> None:
    for per_rank in results:
        for cfg, compiled, errs in per_rank:
            assert errs["|y|"] > 1e-3 and errs["|expert grad|"] > 1e-3, (cfg, errs)  # not vacuous
            bad = {k: v for k, v in errs.items() if not k.startswith("|") and v > 1e-5}
            assert not bad, f"{cfg} compiled={compiled}: {bad}"


CAPACITY = [
    (dict(router="gshard", dispatch="capacity", capacity_factor=1.0), False),
    (dict(router="mixtral", dispatch="capacity", expert="swiglu", shared_expert=True), True),
    (dict(router="softmoe", dispatch="capacity", router_kwargs=dict(slots_per_expert=2)), False),
    (dict(router="expert_choice", dispatch="capacity"), False),
]
DROPLESS = [
    (dict(router="mixtral", dispatch="dropless", expert="swiglu"), False),
    (dict(router="gshard", dispatch="dropless"), True),
    (dict(router="deepseek", dispatch="dropless", router_kwargs=dict(num_groups=2, topk_groups=1)), False),
]


def _ids(scenarios: list) -> list[str]:
    return [f"{cfg['router']}-compiled" if compiled else cfg["router"] for cfg, compiled in scenarios]


@pytest.mark.parametrize("cfg, compiled", CAPACITY, ids=_ids(CAPACITY))
def test_ep_capacity_matches_single_process(rank_pool, cfg, compiled):
    _check(rank_pool.run(_scenarios, ([(cfg, compiled)],), timeout_s=120))


@pytest.mark.parametrize("cfg, compiled", DROPLESS, ids=_ids(DROPLESS))
def test_ep_dropless_matches_single_process(rank_pool, cfg, compiled):
    _check(rank_pool.run(_scenarios, ([(cfg, compiled)],), timeout_s=120))


# every router with every dispatch it supports
TRACED = [(r, d) for r in ROUTERS for d in DISPATCHERS if not (r in CAPACITY_ONLY_ROUTERS and d != "capacity")]


def _trace_and_errors(rank: int, world_size: int) -> dict:
    import traceback

    from fsmoe_compiler.moe import MoELayer

    out: dict = {"traced": {}}
    try:
        MoELayer(D_MODEL, D_FF, 3)
    except ValueError as e:
        out["indivisible"] = str(e)
    for router, dispatch in TRACED:  # each case's outcome, or its error, for its own test
        try:
            torch.manual_seed(0)
            layer = MoELayer(D_MODEL, D_FF, EXPERTS, router=router, dispatch=dispatch)
            torch._dynamo.reset()
            ex = torch._dynamo.explain(layer)(_inputs(rank)[0])
            a2a = sum("all_to_all_single" in str(n.target) for g in ex.graphs for n in g.graph.nodes)
            out["traced"][(router, dispatch)] = (ex.graph_break_count, ex.graph_count, a2a)
        except Exception:  # noqa: BLE001 - reported by the case's test
            out["traced"][(router, dispatch)] = traceback.format_exc()
    try:
        MoELayer(D_MODEL, D_FF, 4 if rank == 0 else 8)
    except ValueError as e:
        out["mismatch"] = str(e)
    # DeepSeek's bias update sums the load over ranks, so every replica moves its bias alike
    from fsmoe_compiler.moe import DeepSeekRouter

    torch.manual_seed(0)
    router = DeepSeekRouter(D_MODEL, EXPERTS, top_k=1, bias_update_rate=0.5)
    router(_inputs(rank)[0].reshape(-1, D_MODEL) * (rank + 1))
    out["local_load"] = router.expert_load.clone()
    out["summed_load"] = router.update_bias(group=dist.group.WORLD)
    out["bias"] = router.expert_bias.clone()
    return out


@pytest.fixture(scope="module")
def traced_and_errors(rank_pool):
    return rank_pool.run(_trace_and_errors, timeout_s=150)


def test_ep_layers_bad_configs_fail_clearly_on_every_rank(traced_and_errors):
    results = traced_and_errors
    for res in results:
        assert "must be divisible by the expert-parallel group size 2" in res["indivisible"]
        # both ranks get the verdict, so neither is left waiting in a later collective
        assert "rank 1 has num_experts=8, rank 0 has 4" in res["mismatch"]
        assert len(res["traced"]) == len(TRACED) == 14
        torch.testing.assert_close(res["summed_load"], results[0]["local_load"] + results[1]["local_load"])
        torch.testing.assert_close(res["bias"], results[0]["bias"])
        assert res["bias"].abs().sum() > 0


@pytest.mark.parametrize("router, dispatch", TRACED, ids=[f"{r}-{d}" for r, d in TRACED])
def test_ep_layers_trace_without_breaks(traced_and_errors, router, dispatch):
    for rank, res in enumerate(traced_and_errors):
        traced = res["traced"][(router, dispatch)]
        assert not isinstance(traced, str), f"rank {rank}:\n{traced}"
        breaks, graphs, a2a = traced
        assert (breaks, graphs) == (0, 1), (rank, breaks, graphs)
        # capacity: dispatch + combine; dropless: counts + dispatch + combine
        assert a2a == (2 if dispatch == "capacity" else 3), (rank, a2a)

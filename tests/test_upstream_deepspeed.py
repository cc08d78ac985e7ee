"""DeepSpeed's MoE layer, unmodified, under ``backend="fsmoe"``: found in both graphs, equal to eager.

Cases (``upstream_deepspeed.CASES``): ``deepspeed.moe.layer.MoE`` with top-1 and top-2 gating (GShard-style:
``argmax`` for the first expert, a second ``argmax`` over the noised logits with the first masked for
top-2; a capacity per expert enforced by a ``topk`` over tokens for top-1, by the ``cumsum`` positions for
top-2), with token dropping (DeepSpeed's default, capacity factor 1.0) and without (the capacity becomes
the step's largest expert load: a data-dependent buffer size). At 1 process: the loss (DeepSpeed's
``l_aux`` included) and every gradient equal eager's at every step, with the gate's random noise seeded
alike; exactly one region per MoE layer in the forward and in the backward graph with router kind,
top-k, experts and capacity. At 2 gloo ranks with DeepSpeed's expert parallelism (``ep_size=2``,
``_AllToAll`` over the ``ep_size_2`` group): the same, and the scheduled graph is swapped in and stays
equal to eager after the swap.

DeepSpeed's gate stores its noise samplers in module-level dicts on its first call, which Dynamo cannot
trace: every model here gets one eager forward first (``upstream_deepspeed.prime_gate_noise`` says why).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[ecosystem]')")

import fsmoe_compiler  # noqa: E402
import upstream_deepspeed as ud  # noqa: E402
from upstream_checks import assert_every_step_equal, grad_differences, regions_by_kind  # noqa: E402
from moe_cases import ONE_GRAPH  # noqa: E402

STEPS_ONE = 2
# warm-up + profiling calls + a timed and a plain scheduled call (as tests/test_upstream_titan.py)
OPTIONS_EP = {"pipeline_degree": "auto", "max_degree": 2, "profile_steps": 2, "time_limit_s": 0.05}
STEPS_EP = 5


def _grads(model: torch.nn.Module, fn, step: int, rank: int) -> dict[str, torch.Tensor]:
    """Loss, input gradient and every parameter's gradient of one step, the gate's noise seeded for the step."""
    model.zero_grad(set_to_none=True)
    x = ud.inputs(step, rank)
    ud.step_seed(step, rank)
    loss = fn(x)
    loss.backward()
    out = {"loss": loss.detach().clone(), "input": x.grad.clone()}
    out.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def _train(model: torch.nn.Module, compiled, steps: int, rank: int = 0) -> list[dict[str, float]]:
    """Eager and compiled steps on the same weights; per step, the gradients that differ and by how much."""
    bad = []
    for step in range(steps):
        ref = _grads(model, model, step, rank)
        got = _grads(model, compiled, step, rank)
        assert len(ref) > 10, "a loss, the input's and every parameter's gradient"
        bad.append(grad_differences(ref, got))
    return bad


def _regions(rep) -> dict[str, list[dict]]:
    return regions_by_kind(rep, ud.FACTS + ("layer",))


# ------------------------------------------------------------------------------------------------ 1 process


@pytest.mark.parametrize("name", ud.CASE_IDS)
def test_deepspeed_moe_equals_eager_and_is_one_region_in_each_graph(name):
    torch._dynamo.reset()
    model = ud.build(name)
    ud.prime_gate_noise(model)
    with torch._dynamo.config.patch(**ONE_GRAPH):
        compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
        bad = _train(model, compiled, STEPS_ONE)
    assert all(not b for b in bad), f"{name}: fsmoe differs from eager: {bad}"
    rep = fsmoe_compiler.report(compiled)
    assert rep.fallbacks() == []
    assert len(rep.graphs("forward")) == len(rep.graphs("backward")) == 1
    want = dict(ud.expected(ud.BY_NAME[name]), layer=0)
    found = _regions(rep)
    for kind in ("forward", "backward"):
        assert found[kind] == [want], f"{name} {kind}: {found[kind]} (notes: {[g.notes for g in rep.graphs(kind)]})"
    for r in rep.regions("forward") + rep.regions("backward"):
        for role in ("router", "dispatch", "expert", "combine"):
            assert r.nodes[role], f"{name} {r.graph}: no {role} role"
    if ud.BY_NAME[name].k == 2:  # two argmax, the second after masking the first: top-2, said so
        (fw,) = rep.regions("forward")
        assert any("top-2 as 2 argmax" in n for n in fw.notes), fw.notes


def test_two_deepspeed_layers_are_two_regions_in_each_graph_in_layer_order():
    torch._dynamo.reset()
    name = "top2"
    model = ud.build(name, layers=2)
    ud.prime_gate_noise(model)
    with torch._dynamo.config.patch(**ONE_GRAPH):
        compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
        bad = _train(model, compiled, 1)
    assert not bad[0], bad
    found = _regions(fsmoe_compiler.report(compiled))
    want = ud.expected(ud.BY_NAME[name])
    for kind in ("forward", "backward"):
        assert [r.pop("layer") for r in found[kind]] == [0, 1], found[kind]
        assert found[kind] == [want, want], found[kind]


def test_deepspeed_moe_with_its_expert_group_on_one_rank_is_one_region_in_each_graph():
    """As ``deepspeed.initialize`` wires a 1-GPU job: ``deepspeed.comm`` over a 1-rank gloo group and the
    ``ep_size_1`` expert group set on the layer. Without token dropping the gate asks that group's size (to
    all-reduce the capacity only when it spans ranks) inside the traced code: still one graph."""
    import torch.distributed as dist

    torch._dynamo.reset()
    name = "top1-nodrop"
    model = ud.build(name)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with ud.deepspeed_ep(model), torch._dynamo.config.patch(**ONE_GRAPH):
            assert model.moes[0].deepspeed_moe.ep_group is not None
            ud.prime_gate_noise(model)
            compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
            bad = _train(model, compiled, 1)
    finally:
        dist.destroy_process_group()
    assert not bad[0], bad
    found = _regions(fsmoe_compiler.report(compiled))
    want = dict(ud.expected(ud.BY_NAME[name]), layer=0)
    assert found == {"forward": [want], "backward": [want]}, found


@pytest.mark.parametrize("name", ["top1", "top2"])
def test_gate_noise_samplers_made_inside_the_graph_stop_dynamo_until_primed(monkeypatch, name):
    """Why every model gets one eager forward first: DeepSpeed's gate makes its noise sampler on its first call
    and stores it in a module-level dict, which Dynamo cannot replay (``prime_gate_noise``)."""
    from deepspeed.moe import sharded_moe

    torch._dynamo.reset()
    monkeypatch.setattr(sharded_moe, "exp_selection_uniform_map", {})  # as in a fresh process
    monkeypatch.setattr(sharded_moe, "gumbel_map", {})
    model = ud.build(name)
    with torch._dynamo.config.patch(**ONE_GRAPH):
        compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
        with pytest.raises(torch._dynamo.exc.Unsupported, match="Reconstruction failure"):
            compiled(ud.inputs())
        ud.prime_gate_noise(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
        compiled(ud.inputs()).backward()
    rep = fsmoe_compiler.report(compiled)
    assert [len(rep.regions(kind)) for kind in ("forward", "backward")] == [1, 1]


# ------------------------------------------------------------------------------------------------ 2 ranks, EP


def _ep_job(rank: int, world_size: int, name: str, options: dict, steps: int) -> dict:
    model = ud.build(name, ep_size=world_size, rank=rank)
    with ud.deepspeed_ep(model), torch._dynamo.config.patch(**ONE_GRAPH):
        ud.prime_gate_noise(model, rank)
        compiled = torch.compile(model, backend="fsmoe", options=options, fullgraph=True)
        bad = _train(model, compiled, steps, rank)
        rep = fsmoe_compiler.report(compiled)
        scheds = {kind: rep.schedules(kind) for kind in ("forward", "backward")}
        return {
            "rank": rank,
            "bad": bad,
            "local_experts": [len(m.deepspeed_moe.experts.deepspeed_experts) for m in model.moes],
            "fallbacks": rep.fallbacks(),
            "regions": _regions(rep),
            "a2a": {kind: [len(r.all_to_all) for r in rep.regions(kind)] for kind in ("forward", "backward")},
            "schedules": {kind: len(s) for kind, s in scheds.items()},
            "after_swap": {kind: [(sum(t.measured_end_ms is not None for t in s.tasks), len(s.measured_calls_ms))
                                  for s in ss] for kind, ss in scheds.items()},
            "degrees": {kind: [s.degrees for s in ss] for kind, ss in scheds.items()},
        }


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["top1", "top2", "top1-nodrop"])
def test_deepspeed_moe_with_expert_parallelism_on_two_ranks_is_scheduled_and_equals_eager(rank_pool, name):
    """Without token dropping the capacity is the largest expert load all-reduced (MAX) over the EP group and read
    back as an int: the buffers' capacity is data-dependent, and the layer still is one region in each graph,
    scheduled and equal to eager (which chunk degree it gets is the chunking passes' business)."""
    results = rank_pool.run(_ep_job, (name, OPTIONS_EP, STEPS_EP), timeout_s=360)
    case = ud.BY_NAME[name]
    want = dict(ud.expected(case), layer=0)
    for res in results:
        where = f"{name} rank {res['rank']}"
        assert res["local_experts"] == [case.experts // 2], f"{where}: experts not split by EP"
        assert_every_step_equal(res, where)
        for kind in ("forward", "backward"):
            assert res["regions"][kind] == [want], f"{where} {kind}: {res['regions'][kind]}"
            assert res["schedules"][kind] == 1, f"{where}: no schedule swapped in for the {kind} graph"
            ((timed, plain),) = res["after_swap"][kind]  # steps 3 and 4 ran the swapped-in graph (timed, plain)
            assert timed > 0 and plain >= 1, f"{where} {kind}: {res['after_swap'][kind]}"
        # DeepSpeed's _AllToAll: dispatch and combine forward, their gradients backward
        assert res["a2a"] == {"forward": [2], "backward": [2]}, f"{where}: {res['a2a']}"
    assert results[0]["degrees"] == results[1]["degrees"], [r["degrees"] for r in results]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_deepspeed_moe_without_token_dropping_runs_chunked_in_two_and_equals_eager(rank_pool):
    """A data-dependent capacity (``[E, ?, M]`` buffers) is split along the static hidden dim, through the
    reshapes around DeepSpeed's all-to-all, at degree 2 in both graphs; every step still equals eager."""
    results = rank_pool.run(_ep_job, ("top1-nodrop", {**OPTIONS_EP, "pipeline_degree": 2}, STEPS_EP), timeout_s=360)
    for res in results:
        where = f"top1-nodrop rank {res['rank']}"
        assert_every_step_equal(res, where)
        for kind in ("forward", "backward"):
            assert res["degrees"][kind] == [{0: 2}], f"{where} {kind}: {res['degrees']}"
            ((timed, plain),) = res["after_swap"][kind]
            assert timed > 0 and plain >= 1, f"{where} {kind}: {res['after_swap'][kind]}"

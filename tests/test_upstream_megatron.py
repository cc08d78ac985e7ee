"""Megatron-Core's ``MoELayer``, unmodified (local layer spec), under ``backend="fsmoe"``: one region per graph.

Cases (``upstream_megatron.CASES``): TransformerConfig's defaults (the
allgather dispatcher, dropless), the alltoall dispatcher dropless, with a
shared expert and the router z-loss, with token dropping to a capacity
(padded to fixed ``[E, C]`` buffers, and unpadded), and DeepSeek-V3-style
sigmoid routing with an expert bias and group-limited routing. Every case
carries Megatron's auxiliary load-balancing loss (a second softmax and topk on
the router logits). At 1 process: the loss and every gradient equal eager's
at every step, and exactly one region is found in the forward and in the
backward graph with the right router kind, top-k, experts, capacity or
dropless and shared expert. At 2 gloo ranks with Megatron's expert
parallelism (EP=2; the alltoall dispatcher dropless, with a shared expert and
padded to capacity, and the default allgather dispatcher): the same, with
rank agreement on, and the scheduled graph is swapped in and stays equal to
eager after the swap; both ranks apply the same chunk degree.

The CPU patches Megatron needs (``torch.cuda`` calls, a name only the
Transformer Engine import defines) are in ``upstream_megatron.cpu_patches``,
each with why.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install '.[ecosystem]')")

import fsmoe_compiler  # noqa: E402
import upstream_megatron as um  # noqa: E402
from upstream_checks import assert_every_step_equal, grad_differences, regions_by_kind  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Megatron warns at import (Apex, TE) and per linear call
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

STEPS_ONE = 2
# warm-up + profiling calls + a timed and a plain scheduled call (as tests/test_scheduled.py)
# rank agreement left on (the default): the layer compiles the same graphs on both ranks (see upstream_megatron.DYNAMO)
OPTIONS_EP = {"pipeline_degree": "auto", "max_degree": 2, "profile_steps": 2, "time_limit_s": 0.05}
STEPS_EP = 5
# Megatron's default (allgather) dispatcher too: tokens all-gathered over the EP group, outputs reduce-scattered
EP_CASES = ["dropless-top2", "dropless-top2-shared-zloss", "capacity-top2", "default-allgather-top2"]


def _train(model: torch.nn.Module, compiled, steps: int, rank: int = 0) -> list[dict]:
    """Eager and compiled steps on the same weights and inputs; per step, the values that differ (worst)."""
    bad = []
    for step in range(steps):
        x = um.inputs(rank, step)
        ref = um.step_values(model, model, x)
        got = um.step_values(model, compiled, x)
        assert len(ref) > 4, sorted(ref)
        bad.append(grad_differences(ref, got))
    return bad


def expected(case: um.MegatronCase, ep: int = 1) -> dict:
    """The facts every region of ``case`` must carry, forward and backward."""
    return {"router": case.router_kind, "top_k": case.topk, "num_experts": case.experts,
            "capacity": case.capacity() if case.config.get("moe_pad_expert_input_to_capacity") else None,
            "dropless": not case.config.get("moe_pad_expert_input_to_capacity", False),
            "hidden": um.HIDDEN, "shared_expert": case.shared, "roles": True}


FACTS = ("router", "top_k", "num_experts", "capacity", "dropless", "hidden", "shared_expert", "roles")


def _regions(rep) -> dict[str, list[dict]]:
    return regions_by_kind(rep, FACTS)


# ------------------------------------------------------------------------------------------------ 1 process


@pytest.mark.parametrize("name", list(um.CASES))
def test_megatron_moe_layer_equals_eager_and_is_one_region_in_each_graph(name):
    case = um.CASES[name]
    torch._dynamo.reset()  # outside cpu_patches (see there)
    with um.one_rank(), um.cpu_patches(), um.model_parallel(1), torch._dynamo.config.patch(**um.DYNAMO):
        model = um.build(case)
        compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
        bad = _train(model, compiled, STEPS_ONE)
        rep = fsmoe_compiler.report(compiled)
    assert all(not b for b in bad), f"{name}: fsmoe differs from eager: {bad}"
    assert rep.fallbacks() == []
    assert len(rep.graphs("forward")) == len(rep.graphs("backward")) == 1
    found = _regions(rep)
    for kind in ("forward", "backward"):
        notes = [g.notes for g in rep.graphs(kind)]
        assert found[kind] == [expected(case)], f"{name} {kind}: {found[kind]} (notes: {notes})"
    (fw,) = rep.regions("forward")
    # Megatron's aux loss: a second softmax + topk on the same logits, left alone (it routes nothing)
    assert any("on the same router input left alone" in n for n in fw.notes), fw.notes
    # token dropping (a topk over tokens after the routing topk) is said, with the capacity it keeps
    dropping = [n for n in fw.notes if n.startswith("token dropping")]
    if case.capacity_factor is None:
        assert dropping == [], fw.notes
    else:
        (note,) = dropping
        assert f"best {case.capacity()} routed tokens" in note, note
        assert ("dispatched as dropless" in note) is expected(case)["dropless"], note
    assert [r.layer for r in rep.regions("backward")] == [fw.layer]


@pytest.mark.slow
def test_two_megatron_layers_are_two_regions_in_each_graph_in_layer_order():
    case = um.CASES["dropless-top2-shared-zloss"]
    torch._dynamo.reset()
    with um.one_rank(), um.cpu_patches(), um.model_parallel(1), torch._dynamo.config.patch(**um.DYNAMO):
        model = um.build(case, layers=2)
        compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
        bad = _train(model, compiled, 1)
        rep = fsmoe_compiler.report(compiled)
    assert not bad[0], bad
    for kind in ("forward", "backward"):
        assert [r.layer for r in rep.regions(kind)] == [0, 1], [g.notes for g in rep.graphs(kind)]
        assert _regions(rep)[kind] == [expected(case)] * 2


# ------------------------------------------------------------------------------------------------ 2 ranks, EP


def _ep_job(rank: int, world_size: int, name: str, options: dict, steps: int) -> dict:
    case = um.CASES[name]
    torch._dynamo.reset()
    with um.cpu_patches(), um.model_parallel(world_size), torch._dynamo.config.patch(**um.DYNAMO):
        model = um.build(case, rank=rank)
        local_experts = len(model.moe.experts.local_experts)
        compiled = torch.compile(model, backend="fsmoe", options=options, fullgraph=True)
        bad = _train(model, compiled, steps, rank)
        rep = fsmoe_compiler.report(compiled)
    scheds = {kind: rep.schedules(kind) for kind in ("forward", "backward")}
    return {
        "rank": rank,
        "bad": bad,
        "local_experts": local_experts,
        "fallbacks": rep.fallbacks(),
        "graphs": {kind: len(rep.graphs(kind)) for kind in ("forward", "backward")},
        "regions": _regions(rep),
        "a2a": {kind: [len(r.all_to_all) for r in rep.regions(kind)] for kind in ("forward", "backward")},
        "schedules": {kind: len(s) for kind, s in scheds.items()},
        "after_swap": {kind: [(sum(t.measured_end_ms is not None for t in s.tasks), len(s.measured_calls_ms))
                              for s in ss] for kind, ss in scheds.items()},
        "degrees": {kind: [s.degrees for s in ss] for kind, ss in scheds.items()},
        "notes": {kind: [n for g in rep.graphs(kind) for n in g.notes] + [n for s in scheds[kind] for n in s.notes]
                  for kind in ("forward", "backward")},
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", EP_CASES)
def test_megatron_moe_with_expert_parallelism_on_two_ranks_is_scheduled_and_equals_eager(rank_pool, name):
    results = rank_pool.run(_ep_job, (name, OPTIONS_EP, STEPS_EP), timeout_s=240)
    want = expected(um.CASES[name])
    for res in results:
        where = f"{name} rank {res['rank']}"
        assert res["local_experts"] == um.CASES[name].experts // 2, f"{where}: experts not split by EP"
        assert_every_step_equal(res, where)
        for kind in ("forward", "backward"):
            assert res["graphs"][kind] == 1, f"{where}: {res['graphs']} graphs ({res['notes']})"
            assert res["regions"][kind] == [want], f"{where} {kind}: {res['regions'][kind]} ({res['notes']})"
            assert res["schedules"][kind] == 1, f"{where}: no schedule swapped in for the {kind} graph"
            ((timed, plain),) = res["after_swap"][kind]  # steps 3 and 4 ran the swapped-in graph (timed, plain)
            assert timed > 0 and plain >= 1, f"{where} {kind}: {res['after_swap'][kind]}"
        # alltoall: tokens and routing probabilities sent, outputs back (forward), their gradients (backward)
        a2a = 0 if um.CASES[name].dispatcher == "allgather" else 3
        assert res["a2a"] == {"forward": [a2a], "backward": [a2a]}, f"{where}: {res['a2a']}"
    assert results[0]["degrees"] == results[1]["degrees"], [res["degrees"] for res in results]
    print({res["rank"]: (res["a2a"], res["degrees"], res["notes"]) for res in results})


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["dropless-top2", "dropless-top2-shared-zloss", "capacity-top2"])
def test_megatron_alltoall_layer_runs_chunked_in_two_and_equals_eager(rank_pool, name):
    """Degree 2 is applied in both graphs: the token all-to-alls split along the hidden dim (also padded to a
    capacity: Megatron's ``.tolist()`` splits make the rows data-dependent), the one of routing probabilities (one
    value per row, same splits) sent whole, and every step still equals eager."""
    results = rank_pool.run(_ep_job, (name, {**OPTIONS_EP, "pipeline_degree": 2}, STEPS_EP), timeout_s=240)
    for res in results:
        where = f"{name} rank {res['rank']}"
        assert_every_step_equal(res, where)
        for kind in ("forward", "backward"):
            assert res["degrees"][kind] == [{0: 2}], f"{where} {kind}: {res['degrees']} ({res['notes'][kind]})"
            ((timed, plain),) = res["after_swap"][kind]
            assert timed > 0 and plain >= 1, f"{where} {kind}: {res['after_swap'][kind]}"

"""torchtitan's MoE layer, unmodified, under ``backend="fsmoe"``: found in both graphs, equal to eager.

Cases (``upstream_titan.CASES``): Qwen3-style softmax routing and
DeepSeek-V3-style sigmoid routing with an expert bias and group-limited
routing (three ``topk`` calls on one router), each with and without a shared
expert. At 1 process: the loss and every gradient equal eager's at every
step, and exactly one region per MoE layer is found in the forward and in the
backward graph with the right router kind, top-k, experts, dropless dispatch
and shared expert. At 2 gloo ranks with torchtitan's expert parallelism:
the same, and the scheduled graph is swapped in (the report shows a schedule
per graph) and stays equal to eager after the swap.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchtitan")

import fsmoe_compiler  # noqa: E402
import upstream_titan as ut  # noqa: E402
from upstream_checks import assert_every_step_equal, grad_differences, regions_by_kind  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:In CPU autocast"),  # torchtitan's router asks for fp32 autocast
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),  # at torchtitan's import
]

ONE_GRAPH = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}
STEPS_ONE = 2
# warm-up + profiling calls + a timed and a plain scheduled call (as tests/test_scheduled.py)
OPTIONS_EP = {"pipeline_degree": "auto", "max_degree": 2, "profile_steps": 2, "time_limit_s": 0.05}
STEPS_EP = 5


def _grads(model: torch.nn.Module, fn, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss, input gradient and every parameter's gradient (an EP-sharded weight's local shard) of one step."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    loss = fn(x)
    loss.backward()
    out = {"loss": loss.detach().clone(), "input": x.grad.clone()}
    out.update({n: ut.local(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def _train(model: torch.nn.Module, compiled, steps: int, rank: int = 0) -> list[dict]:
    """Eager and compiled steps on the same weights, the expert bias updated between steps; worst differences."""
    bad = []
    for step in range(steps):
        x = ut.inputs(step, rank)
        ref = _grads(model, model, x)
        got = _grads(model, compiled, x)
        bad.append(grad_differences(ref, got))
        ut.update_expert_bias(model)
    return bad


def _regions(rep) -> dict[str, list[dict]]:
    return regions_by_kind(rep, ut.FACTS + ("layer",))


# ------------------------------------------------------------------------------------------------ 1 process


@pytest.mark.parametrize("name", ut.CASE_IDS)
def test_titan_moe_equals_eager_and_is_one_region_in_each_graph(name):
    torch._dynamo.reset()
    model = ut.make_block(name)
    compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
    bad = _train(model, compiled, STEPS_ONE)
    assert all(not b for b in bad), f"{name}: fsmoe differs from eager: {bad}"
    rep = fsmoe_compiler.report(compiled)
    assert rep.fallbacks() == []
    want = dict(ut.expected(ut.BY_NAME[name]), layer=0)
    found = _regions(rep)
    for kind in ("forward", "backward"):
        assert found[kind] == [want], f"{name} {kind}: {found[kind]} (notes: {[g.notes for g in rep.graphs(kind)]})"


def test_two_titan_layers_are_two_regions_in_each_graph_in_layer_order():
    torch._dynamo.reset()
    name = "dsv3-sigmoid-grouped-shared"
    model = ut.make_block(name, layers=2)
    compiled = torch.compile(model, backend="fsmoe", fullgraph=True)
    bad = _train(model, compiled, 1)
    assert not bad[0], bad
    found = _regions(fsmoe_compiler.report(compiled))
    want = ut.expected(ut.BY_NAME[name])
    for kind in ("forward", "backward"):
        assert [r.pop("layer") for r in found[kind]] == [0, 1], found[kind]
        assert found[kind] == [want, want], found[kind]


# ------------------------------------------------------------------------------------------------ 2 ranks, EP


def _ep_job(rank: int, world_size: int, name: str, options: dict, steps: int) -> dict:
    with ut.titan_ep(world_size) as dims, torch._dynamo.config.patch(**ONE_GRAPH):
        model = ut.make_block(name, ep=dims)
        sharded = {n: type(p).__name__ for n, p in model.named_parameters() if "inner_experts" in n}
        compiled = torch.compile(model, backend="fsmoe", options=options, fullgraph=True)
        bad = _train(model, compiled, steps, rank)
        rep = fsmoe_compiler.report(compiled)
        scheds = {kind: rep.schedules(kind) for kind in ("forward", "backward")}
        return {
            "rank": rank,
            "bad": bad,
            "sharded": sharded,
            "fallbacks": rep.fallbacks(),
            "regions": _regions(rep),
            "a2a": {kind: [len(r.all_to_all) for r in rep.regions(kind)] for kind in ("forward", "backward")},
            "schedules": {kind: len(s) for kind, s in scheds.items()},
            "after_swap": {kind: [(sum(t.measured_end_ms is not None for t in s.tasks), len(s.measured_calls_ms))
                                  for s in ss] for kind, ss in scheds.items()},
            "degrees": {kind: [s.degrees for s in ss] for kind, ss in scheds.items()},
            "notes": {kind: [n for s in ss for n in s.notes] for kind, ss in scheds.items()},
            "codegen": {kind: [s.codegen for s in ss][0] if ss else None for kind, ss in scheds.items()},
            "codegen_notes": {kind: [n for g in rep.graphs(kind) for n in g.notes if n.startswith("codegen")]
                              for kind in ("forward", "backward")},
        }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ut.CASE_IDS)
def test_titan_moe_with_expert_parallelism_on_two_ranks_is_scheduled_and_equals_eager(rank_pool, name):
    results = rank_pool.run(_ep_job, (name, OPTIONS_EP, STEPS_EP), timeout_s=240)
    want = dict(ut.expected(ut.BY_NAME[name]), layer=0)
    for res in results:
        where = f"{name} rank {res['rank']}"
        assert set(res["sharded"].values()) == {"DTensor"}, f"{where}: experts not sharded by EP: {res['sharded']}"
        assert_every_step_equal(res, where)
        for kind in ("forward", "backward"):
            assert res["regions"][kind] == [want], f"{where} {kind}: {res['regions'][kind]}"
            assert res["schedules"][kind] == 1, f"{where}: no schedule swapped in for the {kind} graph"
            ((timed, plain),) = res["after_swap"][kind]  # steps 3 and 4 ran the swapped-in graph (timed, plain)
            assert timed > 0 and plain >= 1, f"{where} {kind}: {res['after_swap'][kind]}"
        # forward: the count exchange, dispatch and combine; backward: the data all-to-alls' gradients
        assert res["a2a"] == {"forward": [3], "backward": [2]}, f"{where}: {res['a2a']}"


def test_titan_ep_layer_is_not_split_along_a_bf16_contraction():
    """torchtitan's expert GEMMs run in bf16 (upstream casts), so the hidden-dim split, whose first GEMM sums
    partial products, would round each partial to bf16 before the sum: degree 2 is refused in both graphs with
    that reason (rank 0 of 2 over the fake process group; the un-permute ``index_put`` and the weight-gradient
    grouped GEMMs have rules, so the refusal names the contraction)."""
    from fsmoe_compiler.passes.chunk import chunk
    from fsmoe_compiler.passes.context import PassContext
    from fsmoe_compiler.passes.recognize import recognize
    from fsmoe_compiler.passes.verify import graph_signature
    from graph_capture import captured, fake_world

    with fake_world(rank=0, world_size=2), ut.titan_ep(2) as dims, torch._dynamo.config.patch(**ONE_GRAPH):
        g = captured(lambda: ut.make_block("qwen3-softmax", ep=dims), inputs=lambda: ut.inputs(0, 0), copy=True)
        ctx = PassContext()
        for kind, gm in (("forward", g.forward[0]), ("backward", g.backward[0])):
            ctx.graph_kind, ctx.original, ctx.chunking = kind, graph_signature(gm), {}
            recognize(gm, ctx)
            ctx.degrees = {r.layer: 2 for r in ctx.regions[kind]}
            chunk(gm, ctx)
            (info,) = ctx.chunking.values()
            assert info.degree == 1 and "bfloat16 GEMM split along its contraction dim" in info.reason, info


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_titan_dropless_layer_keeps_python_code_under_codegen_inductor_and_says_why(rank_pool):
    """codegen="inductor" on torchtitan's dropless layer: its split sizes are known only at run time, and
    Inductor compiling after the fact checks assumptions about them the traced graph does not (measured: its
    code failed at run time), so both graphs keep their Python code, say why, and train equal to eager."""
    name = "qwen3-softmax"
    results = rank_pool.run(_ep_job, (name, {**OPTIONS_EP, "codegen": "inductor"}, STEPS_EP), timeout_s=280)
    for res in results:
        where = f"{name} rank {res['rank']}"
        assert_every_step_equal(res, where)
        for kind in ("forward", "backward"):
            notes = res["codegen_notes"][kind]
            assert res["schedules"][kind] == 1 and res["codegen"][kind] == "eager", (where, kind, notes)
            assert any("DataDependentSizes: sizes known only at run time (u" in n for n in notes), (where, notes)

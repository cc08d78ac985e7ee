"""HF transformers' MoE blocks and tiny MoE models under backend="fsmoe": equal to eager, one region per layer.

Every case of ``upstream_hf.CASES`` (Mixtral, Qwen3-MoE and DeepSeek-V3; the
bare block with each experts implementation that runs on CPU, grouped_mm in
bfloat16 too, and each 2-layer causal LM with its auxiliary loss) compiles
with ``backend="fsmoe"``; its loss and every gradient equal eager's; the
report shows exactly one MoE region per MoE layer in the forward and in the
backward graph, with the router kind, top-k, experts, dropless dispatch and
shared expert of the architecture. The eager experts implementation (a Python
loop over ``nonzero()`` of expert hits) cannot be one graph: the report says
the layer was left out and why, and ``fsmoe_compiler.ecosystem.compile_friendly``
switches it to one that can. Every other experts implementation the installed
transformers registers is in ``upstream_hf.LEFT_OUT`` with its reason.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="HF transformers is not installed (pip install '.[ecosystem]')")

import fsmoe_compiler  # noqa: E402
import upstream_hf as hf  # noqa: E402
from fsmoe_compiler.ecosystem import HF_SETTING, HF_TRACEABLE, compile_friendly  # noqa: E402
from moe_cases import ONE_GRAPH  # noqa: E402

ONE_GRAPH_CASES = [c for c in hf.CASES if c.one_graph]
LOOP_CASES = [c for c in hf.CASES if not c.one_graph]


def _run(module, fn, inputs, loss_of) -> dict[str, torch.Tensor]:
    """Loss and every gradient (parameters and float inputs) of one step of ``fn``."""
    module.zero_grad(set_to_none=True)
    for t in inputs:
        t.grad = None
    loss = loss_of(hf.call(fn, inputs))
    loss.backward()
    out = {"loss": loss.detach()}
    out.update({f"input{i}": t.grad.clone() for i, t in enumerate(inputs) if t.grad is not None})
    out.update({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
    return out


def _compiled_step(case: hf.HFCase, module, inputs, loss_of, **compile_kw):
    """Eager (which also installs HF's output hooks, as the first call of a model does), then fsmoe: both results."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**ONE_GRAPH):
        ref = _run(module, module, inputs, loss_of)
        compiled = torch.compile(module, backend="fsmoe", options={"strict": True}, **compile_kw)
        got = _run(module, compiled, inputs, loss_of)
    return ref, got, compiled


def _assert_equal(ref: dict, got: dict) -> None:
    assert got.keys() == ref.keys()
    assert len(ref) > 2, "a loss and gradients"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=lambda m, name=name: f"{name}: {m}")


def _assert_region(r, case: hf.HFCase) -> None:
    assert (r.router, r.num_experts, r.top_k, r.capacity, r.dropless) == (
        case.router, case.num_experts, case.top_k, None, True), r
    assert (r.hidden, r.tokens, r.ffn_hidden) == (hf.HIDDEN, hf.BATCH * hf.SEQ, hf.FFN[case.arch])
    for role in ("router", "dispatch", "expert", "combine"):
        assert r.nodes[role], f"{r.graph} region without a {role} role"
    assert bool(r.nodes["shared_expert"]) is case.shared, f"{r.graph}: shared expert {r.nodes['shared_expert']}"


@pytest.mark.parametrize("case", ONE_GRAPH_CASES, ids=lambda c: c.id)
def test_equal_to_eager_with_one_region_per_moe_layer_in_both_graphs(case):
    module, inputs, loss_of = hf.build(case)
    ref, got, compiled = _compiled_step(case, module, inputs, loss_of, fullgraph=True)
    _assert_equal(ref, got)
    rep = fsmoe_compiler.report(compiled)
    assert rep.fallbacks() == []
    assert len(rep.graphs("forward")) == len(rep.graphs("backward")) == 1
    fw, bw = rep.regions("forward"), rep.regions("backward")
    assert len(fw) == len(bw) == case.layers, (rep.graphs("forward")[0].notes, rep.graphs("backward")[0].notes)
    assert [r.layer for r in fw] == [r.layer for r in bw] == list(range(case.layers))
    for r in fw + bw:
        _assert_region(r, case)
    if case.model and case.arch != "deepseek_v3":  # the aux loss's second softmax + topk on the same logits
        assert all(any("on the same router input left alone" in n for n in r.notes) for r in fw), [r.notes for r in fw]


@pytest.mark.parametrize("case", [c for c in ONE_GRAPH_CASES if not c.model and c.dtype is torch.float32],
                         ids=lambda c: c.id)
def test_expert_gemms_inside_the_region_in_both_graphs(case):
    """The expert GEMMs, whatever runs them (an opaque custom op and its backward op, or bmm with gathered
    weights), are in the expert role: two per layer forward, their input and weight gradients backward."""
    from graph_capture import captured

    graphs = captured(_block_of, case, inputs=_block_input)
    from fsmoe_compiler.passes.recognize import find_moe_regions

    (f,) = find_moe_regions(graphs.forward[0], "forward")
    (b,) = find_moe_regions(graphs.backward[0], "backward", [f])
    fw_ops = _ops(graphs.forward[0], f.nodes["expert"])
    bw_ops = _ops(graphs.backward[0], b.nodes["expert"])
    if case.experts == "grouped_mm":
        assert fw_ops.count("transformers.grouped_mm_fallback.default") == 2
        assert bw_ops.count("transformers.grouped_mm_fallback_backward.default") == 2
    else:  # per-token gathered weights: the gathers are the dispatch, the bmms the experts
        assert fw_ops.count("aten.bmm.default") == 2
        assert bw_ops.count("aten.bmm.default") == 4
        assert _ops(graphs.forward[0], f.nodes["dispatch"]).count("aten.index.Tensor") == 2


def _block_of(case):
    module, _, _ = hf.build(case)
    return module


def _block_input():
    return torch.randn(hf.BATCH, hf.SEQ, hf.HIDDEN, requires_grad=True)


def _ops(gm, names) -> list[str]:
    by_name = {n.name: n for n in gm.graph.nodes}
    return [str(by_name[n].target) for n in names]


@pytest.mark.parametrize("case", LOOP_CASES, ids=lambda c: c.id)
def test_eager_expert_loop_is_left_out_and_the_report_says_why(case):
    """Dynamo breaks the graph at the loop over nonzero(): no graph holds the layer whole. The results stay
    equal to eager, no graph has a region, and the router's graph says its routing leaves the graph before any
    expert matmul and names the switch; compile_friendly then makes it one region per graph."""
    module, inputs, loss_of = hf.build(case)
    torch._dynamo.utils.counters.clear()
    ref, got, compiled = _compiled_step(case, module, inputs, loss_of)
    _assert_equal(ref, got)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 1, "the loop splits the block into graphs"
    rep = fsmoe_compiler.report(compiled)
    assert rep.regions("forward") == [] and rep.regions("backward") == []
    notes = [n for g in rep.graphs("forward") for n in g.notes]
    why = [n for n in notes if "left alone" in n]
    assert len(why) == 1, notes
    assert "no expert matmul" in why[0] and "graph break" in why[0] and "compile_friendly" in why[0]

    switched = compile_friendly(module)
    assert [(s.module, s.library, s.setting, s.before, s.after) for s in switched] == [
        ("experts", "transformers", HF_SETTING, "eager", "grouped_mm")]
    ref, got, compiled = _compiled_step(case, module, inputs, loss_of, fullgraph=True)
    _assert_equal(ref, got)
    rep = fsmoe_compiler.report(compiled)
    fw, bw = rep.regions("forward"), rep.regions("backward")
    assert len(fw) == len(bw) == 1
    for r in fw + bw:
        _assert_region(r, case)


def test_compile_friendly_switches_a_model_through_its_own_setter_and_only_when_needed():
    from transformers import MixtralForCausalLM

    _, cfg = hf.ARCHS["mixtral"](True)
    cfg._experts_implementation = "eager"
    model = MixtralForCausalLM(cfg)
    assert model.config._experts_implementation == "eager"
    switched = compile_friendly(model)
    assert [s.module for s in switched] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert {(s.before, s.after) for s in switched} == {("eager", "grouped_mm")}
    assert model.config._experts_implementation == "grouped_mm"
    assert "model.layers.0.mlp.experts" in str(switched[0]) and HF_SETTING in str(switched[0])
    assert compile_friendly(model) == []  # already traceable: nothing to do
    model.set_experts_implementation("eager")
    assert [s.after for s in compile_friendly(model, experts_implementation="batched_mm")] == ["batched_mm"] * 2
    with pytest.raises(ValueError, match="grouped_mm"):
        compile_friendly(model, experts_implementation="eager")


def test_compile_friendly_leaves_a_model_without_known_moe_modules_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert compile_friendly(model) == []


def test_every_experts_implementation_transformers_registers_is_a_case_or_left_out_with_a_reason():
    """The installed transformers' experts registry (and the FP8 one) against the cases: each architecture runs
    the loop and both traceable implementations, and every other registered name has a reason in LEFT_OUT."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    registered = {"eager"} | set(ALL_EXPERTS_FUNCTIONS.valid_keys()) | set(ALL_FP8_EXPERTS_FUNCTIONS.valid_keys())
    run = {c.experts for c in hf.CASES}
    assert run.isdisjoint(hf.LEFT_OUT) and all(hf.LEFT_OUT.values())
    assert registered == run | set(hf.LEFT_OUT), f"new: {registered - run - set(hf.LEFT_OUT)}"
    for arch in hf.ARCHS:
        assert {c.experts for c in hf.CASES if c.arch == arch and not c.model} == {"eager", *HF_TRACEABLE}, arch

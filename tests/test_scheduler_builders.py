"""Task-graph builders: chunk costs follow alpha + beta * a / r, the chunk chain and backward shape are right."""

import pytest

from fsmoe_compiler.scheduler import heuristic_schedule, validate_schedule
from fsmoe_compiler.scheduler.costs import LinearCost
from fsmoe_compiler.sim import (LayerSpec, build_layer_backward, build_layer_forward, build_stack_backward,
                                build_stack_forward, build_step, chunk_costs)
from fsmoe_compiler.sim.costs import ClusterCosts

COSTS = ClusterCosts(
    name="test", all_to_all=LinearCost(0.3, 1.3e-6), all_gather=LinearCost(0.34, 6.7e-7),
    reduce_scatter=LinearCost(0.4, 6.7e-7), all_reduce=LinearCost(0.5, 2.9e-6),
    gemm={"gpt": LinearCost(1.09, 1.53e-10), "swiglu": LinearCost(1.47, 3.17e-10)}, dense=LinearCost(0.2, 1.53e-10))
SPEC = LayerSpec(B=4, L=512, M=2048, H=8192, f=2.4)


def test_chunk_costs_are_alpha_plus_beta_a_over_r():
    r = 4
    cc = chunk_costs(SPEC, COSTS, r)
    a0 = 2.4 * 4 * 512 * 2048 / 8
    assert cc["dispatch"][0] == pytest.approx(0.3 + 1.3e-6 * a0 / r)
    assert cc["combine"] == cc["dispatch"]
    assert cc["gather"][0] == pytest.approx(0.34 + 6.7e-7 * a0 * 8 / r)
    assert cc["scatter"][0] == pytest.approx(0.4 + 6.7e-7 * a0 * 8 / r)
    macs = 2.4 * 4 * 512 * 2048 * 8192 / 8 * 2
    assert cc["expert"][0] == pytest.approx(1.09 + 1.53e-10 * macs / r)
    bw = chunk_costs(SPEC, COSTS, r, "backward")
    assert bw["expert"][0] == pytest.approx(2 * cc["expert"][0])
    with pytest.raises(ValueError, match="integer >= 1"):
        chunk_costs(SPEC, COSTS, 0)


def test_forward_layer_shape():
    g = build_layer_forward(SPEC, COSTS, 3)
    assert len(g) == 1 + 5 * 3
    assert {t.resource for t in g if t.role in ("gather", "scatter")} == {"intra"}
    # chain per chunk
    for i in range(3):
        assert g.succs(f"F0.a2a_d{i}") == [f"F0.ag{i}"]
        assert g.succs(f"F0.ag{i}") == [f"F0.exp{i}"]
        assert g.succs(f"F0.exp{i}") == [f"F0.rs{i}"]
        assert g.succs(f"F0.rs{i}") == [f"F0.a2a_c{i}"]
        assert g.preds(f"F0.a2a_d{i}") == ["F0.attn"]
    single = build_layer_forward(SPEC, COSTS, 3, comm="single")
    assert {t.resource for t in single if t.role in ("gather", "scatter")} == {"inter"}
    no_esp = build_layer_forward(LayerSpec(B=4, L=512, M=2048, H=8192, f=2.4, esp=1), COSTS, 2)
    assert len(no_esp) == 1 + 3 * 2 and not any(t.kind == "all_gather" for t in no_esp)


def test_backward_layer_shape_and_gradient_slices():
    parts = [SPEC.dense_grad_elems * 0.25, SPEC.dense_grad_elems * 0.75]
    g = build_layer_backward(SPEC, COSTS, 2, parts)
    assert g["B0.exp0"].duration == pytest.approx(2 * build_layer_forward(SPEC, COSTS, 2)["F0.exp0"].duration)
    assert g["B0.attn"].duration == pytest.approx(2 * build_layer_forward(SPEC, COSTS, 2)["F0.attn"].duration)
    assert sorted(g.preds("B0.attn")) == ["B0.a2a_c0", "B0.a2a_c1"]
    for k, n in enumerate(parts):
        t = g[f"B0.ar{k}"]
        assert t.resource == "inter" and t.role == "grad_sync"
        assert t.duration == pytest.approx(0.5 + 2.9e-6 * n)
        assert g.preds(t.id) == ["B0.attn"]
    with pytest.raises(ValueError, match="sum to"):
        build_layer_backward(SPEC, COSTS, 2, [1.0, 2.0])


def test_stack_dependencies_forward_and_backward():
    specs = [SPEC, SPEC, SPEC]
    f = build_stack_forward(specs, COSTS, [1, 2, 4])
    assert sorted(f.preds("F1.attn")) == ["F0.a2a_c0"]
    assert sorted(f.preds("F2.attn")) == ["F1.a2a_c0", "F1.a2a_c1"]
    b = build_stack_backward(specs, COSTS, [2, 1, 3])
    # backward walks the layers in reverse: layer 1's MoE waits for layer 2's attention backward
    assert b.preds("B1.a2a_d0") == ["B2.attn"] and b.preds("B2.a2a_d0") == []
    # gradient slices of layer 2 depend only on layer 2's attention backward: free to overlap layers 1, 0
    assert b.preds("B2.ar0") == ["B2.attn"] and b.succs("B2.ar0") == []
    s = build_step(specs, COSTS, 2, 2, grad_sync="bucket")
    assert sorted(s.preds("loss")) == ["F2.a2a_c0", "F2.a2a_c1"]
    assert s.preds("B.bucket") == ["B0.attn"] and not any(t.id.startswith("B2.ar") for t in s)
    assert s["B.bucket"].size == pytest.approx(3 * SPEC.dense_grad_elems)
    validate_schedule(s, heuristic_schedule(s))
    with pytest.raises(ValueError, match="one value per layer"):
        build_stack_forward(specs, COSTS, [1, 2])
    with pytest.raises(ValueError, match="grad_sync"):
        build_stack_backward(specs, COSTS, 1, grad_sync="later")

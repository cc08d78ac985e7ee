"""Router math on hand-computable cases: gates, renormalisation, aux losses, group limiting, expert choice."""

from __future__ import annotations

import math

import pytest
import torch

from fsmoe_compiler.moe import (
    DeepSeekRouter,
    ExpertChoiceRouter,
    GShardRouter,
    MixtralRouter,
    SigmoidRouter,
    SoftMoERouter,
    SwitchRouter,
    XMoERouter,
    compute_capacity,
    load_balancing_loss,
    make_router,
)


def _identity_gate(router: torch.nn.Module) -> None:
    """Make the router's logits equal its input (d_model == num_experts)."""
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(router.gate.weight.shape[0]))


# Two tokens whose softmax probabilities are exactly these rows (log of a distribution).
P = torch.tensor([[0.70, 0.15, 0.10, 0.05], [0.10, 0.60, 0.20, 0.10]])


def test_gshard_renormalises_top2_and_aux_loss_matches_hand_value():
    r = GShardRouter(4, 4, top_k=2)
    _identity_gate(r)
    out = r(P.log())
    assert out.kind == "topk"
    assert out.indices.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(out.gates, torch.tensor([[0.70 / 0.85, 0.15 / 0.85], [0.60 / 0.80, 0.20 / 0.80]]))
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(2))
    # first choices: e0, e1 -> f = [.5, .5, 0, 0]; mean probs P = [.4, .375, .15, .075]
    # aux = E * mean_e(P_e f_e) = 4 * (.2 + .1875) / 4
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.3875))


def test_aux_loss_is_one_over_e_when_balanced_and_larger_when_collapsed():
    e = 4
    uniform = torch.full((8, e), 1.0 / e)
    balanced = torch.arange(8) % e
    assert load_balancing_loss(uniform, balanced, e).item() == pytest.approx(1.0 / e)
    collapsed = torch.zeros(8, e)
    collapsed[:, 0] = 1.0
    assert load_balancing_loss(collapsed, torch.zeros(8, dtype=torch.long), e).item() == pytest.approx(1.0)


def test_aux_loss_gradient_pushes_probability_off_the_overloaded_expert():
    r = GShardRouter(4, 4)
    logits = P.log().clone().requires_grad_()
    _identity_gate(r)
    r(logits).aux_loss.backward()
    # expert 0 takes token 0's first choice: raising its logit for token 0 must raise the loss
    assert logits.grad[0, 0] > 0


def test_switch_is_top1_with_unrenormalised_gate():
    r = SwitchRouter(4, 4)
    _identity_gate(r)
    out = r(P.log())
    assert out.indices.tolist() == [[0], [1]]
    torch.testing.assert_close(out.gates, torch.tensor([[0.70], [0.60]]))
    with pytest.raises(ValueError, match="top-1"):
        SwitchRouter(4, 4, top_k=2)


def test_mixtral_renormalises_and_counts_all_k_choices_in_aux():
    r = MixtralRouter(4, 4, top_k=2)
    _identity_gate(r)
    out = r(P.log())
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(2))
    # all choices: e0, e1, e1, e2 -> f = [.25, .5, .25, 0]
    want = 4 * (0.4 * 0.25 + 0.375 * 0.5 + 0.15 * 0.25) / 4
    torch.testing.assert_close(out.aux_loss, torch.tensor(want))


def test_sigmoid_gates_are_scores_optionally_renormalised():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    raw = SigmoidRouter(4, 4, top_k=2)
    _identity_gate(raw)
    out = raw(logits)
    assert out.indices.tolist() == [[0, 2]]
    torch.testing.assert_close(out.gates, torch.sigmoid(torch.tensor([[2.0, 0.5]])))
    assert out.gates.sum().item() > 1.0  # independent scores, not a distribution
    assert out.aux_loss.item() == 0.0
    norm = SigmoidRouter(4, 4, top_k=2, renormalize=True)
    _identity_gate(norm)
    torch.testing.assert_close(norm(logits).gates.sum(-1), torch.ones(1))


def test_xmoe_is_cosine_similarity_over_a_clamped_temperature():
    r = XMoERouter(6, 4, top_k=2, d_route=3, min_temperature=0.05)
    x = torch.randn(5, 6)
    with torch.no_grad():
        r.temperature.fill_(0.001)  # below the clamp
    out = r(x)
    h = torch.nn.functional.normalize(x @ r.proj.weight.t(), dim=-1)
    emb = torch.nn.functional.normalize(r.expert_embeddings, dim=-1)
    torch.testing.assert_close(out.probs, torch.softmax(h @ emb.t() / 0.05, dim=-1))
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(5))
    with torch.no_grad():
        r.temperature.fill_(0.5)
    out = r(x)
    out.gates[:, 0].sum().backward()
    assert r.temperature.grad is not None and r.temperature.grad.abs() > 0


def test_softmoe_dispatch_normalises_over_tokens_and_combine_over_slots():
    r = SoftMoERouter(8, 3, slots_per_expert=2)
    out = r(torch.randn(5, 8))
    assert out.kind == "soft" and out.gates.shape == (5, 3, 2) and out.dispatch_weights.shape == (5, 3, 2)
    torch.testing.assert_close(out.dispatch_weights.sum(0), torch.ones(3, 2))
    torch.testing.assert_close(out.gates.sum((1, 2)), torch.ones(5))


def _logit(p: list[float]) -> torch.Tensor:
    t = torch.tensor(p)
    return torch.log(t / (1 - t))


def test_deepseek_group_limited_selection_skips_the_best_expert_of_a_weak_group():
    # 8 experts in 4 groups of 2; group score = sum of its top-2 scores
    # group0 (e0 .9, e1 .01) = .91, group1 (.6, .6) = 1.2, group2 (.55, .55) = 1.1, group3 low
    s = [0.9, 0.01, 0.6, 0.59, 0.55, 0.55, 0.05, 0.05]
    r = DeepSeekRouter(8, 8, top_k=2, num_groups=4, topk_groups=2)
    _identity_gate(r)
    out = r(_logit(s).unsqueeze(0))
    assert sorted(out.indices[0].tolist()) == [2, 3]  # e0 is the best expert but its group is not kept
    flat = DeepSeekRouter(8, 8, top_k=2)
    _identity_gate(flat)
    assert 0 in flat(_logit(s).unsqueeze(0)).indices[0].tolist()
    # gates: unbiased scores of the picked experts, normalised
    torch.testing.assert_close(out.gates, torch.tensor([[0.6 / 1.19, 0.59 / 1.19]]), rtol=1e-5, atol=1e-6)


def test_deepseek_bias_steers_selection_only_and_update_bias_balances():
    s = [0.9, 0.8, 0.3, 0.2]
    r = DeepSeekRouter(4, 4, top_k=2, routed_scaling=2.0, bias_update_rate=0.1)
    _identity_gate(r)
    x = _logit(s).unsqueeze(0)
    out = r(x)
    assert sorted(out.indices[0].tolist()) == [0, 1]
    torch.testing.assert_close(r.expert_load, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    load = r.update_bias()
    assert load.tolist() == [1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, -0.1, 0.1, 0.1]))
    assert r.expert_load.sum().item() == 0.0
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    out = r(x)
    assert sorted(out.indices[0].tolist()) == [0, 3]
    # gate from the unbiased score 0.2, not 1.2; scaled by routed_scaling
    torch.testing.assert_close(out.gates.sum(), torch.tensor(2.0))
    assert out.gates[0, out.indices[0].tolist().index(3)].item() == pytest.approx(2.0 * 0.2 / 1.1, rel=1e-5)
    assert r.expert_bias.requires_grad is False


def test_deepseek_rejects_impossible_groups():
    with pytest.raises(ValueError, match="num_groups"):
        DeepSeekRouter(8, 6, num_groups=4)
    with pytest.raises(ValueError, match="top_k=4 exceeds"):
        DeepSeekRouter(8, 8, top_k=4, num_groups=4, topk_groups=1)


def test_expert_choice_each_expert_takes_its_top_c_tokens():
    r = ExpertChoiceRouter(4, 4, top_k=1, capacity_factor=2.0)
    _identity_gate(r)
    x = torch.randn(6, 4)
    out = r(x)
    c = compute_capacity(6, 4, 1, 2.0)  # ceil(1*6*2/4) = 3
    assert c == 3 and out.kind == "expert_choice" and out.indices.shape == (4, 3)
    probs = torch.softmax(x, dim=-1)
    for e in range(4):
        want = set(torch.argsort(probs[:, e], descending=True)[:3].tolist())
        assert set(out.indices[e].tolist()) == want
        torch.testing.assert_close(out.gates[e], probs[out.indices[e], e])


def test_capacity_formula_and_multiple():
    assert compute_capacity(10, 4, 2, 1.25) == math.ceil(2 * 10 * 1.25 / 4) == 7
    assert compute_capacity(10, 4, 2, 1.25, multiple=4) == 8
    assert compute_capacity(1, 64, 1, 1.0) == 1
    with pytest.raises(ValueError, match="capacity_multiple"):
        compute_capacity(10, 4, 2, 1.0, multiple=0)


def test_unknown_router_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown router 'topk'.*gshard"):
        make_router("topk", 4, 4, 2)

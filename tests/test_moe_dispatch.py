"""Dispatch on one process against naive per-token loops; MoELayer option checking."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fsmoe_compiler.moe import MoELayer, capacity_positions, compute_capacity

D, H, E = 8, 12, 4


def _tokens(t: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def _topk_reference(layer: MoELayer, x: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, int]:
    """Per-token loop: choice rank by choice rank, token by token, fill each expert up to ``capacity``."""
    routing = layer.router(x)
    t, k = routing.indices.shape
    y = torch.zeros_like(x)
    used = [0] * layer.num_experts
    dropped = 0
    for j in range(k):
        for i in range(t):
            e = int(routing.indices[i, j])
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            y[i] += routing.gates[i, j] * layer.experts.forward_expert(e, x[i : i + 1])[0]
    if layer.shared is not None:
        y = y + layer.shared(x)
    return y, dropped


@pytest.mark.parametrize("router", ["gshard", "mixtral", "sigmoid", "deepseek"])
@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
def test_capacity_drops_beyond_c_and_equals_a_per_token_loop(router, expert):
    torch.manual_seed(1)
    layer = MoELayer(D, H, E, router=router, dispatch="capacity", capacity_factor=0.5, expert=expert)
    x = _tokens()
    cap = compute_capacity(20, E, 2, 0.5)
    want, dropped = _topk_reference(layer, x, cap)
    assert dropped > 0  # the case really drops choices
    y, _ = layer(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_capacity_with_room_for_everything_drops_nothing():
    torch.manual_seed(2)
    layer = MoELayer(D, H, E, router="gshard", capacity_factor=float(E))  # C = k*T
    x = _tokens()
    want, dropped = _topk_reference(layer, x, None)
    assert dropped == 0
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["gshard", "switch", "mixtral", "xmoe", "deepseek"])
def test_dropless_equals_a_per_token_loop_without_drops(router):
    torch.manual_seed(3)
    layer = MoELayer(D, H, E, router=router, dispatch="dropless", expert="swiglu", shared_expert=True)
    x = _tokens(seed=4)
    want, _ = _topk_reference(layer, x, None)
    y, _ = layer(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_dropless_handles_an_expert_with_no_tokens():
    torch.manual_seed(5)
    layer = MoELayer(D, H, E, router="mixtral", dispatch="dropless")
    with torch.no_grad():
        layer.router.gate.weight[3].fill_(-100.0)  # expert 3 is never chosen
    x = _tokens().abs()
    assert 3 not in layer.router(x).indices.tolist()
    torch.testing.assert_close(layer(x)[0], _topk_reference(layer, x, None)[0], rtol=1e-5, atol=1e-6)


def test_capacity_positions_fill_first_choices_before_second():
    idx = torch.tensor([[0, 1], [0, 2], [1, 0]])
    # first choices in token order: e0 -> 0, e0 -> 1, e1 -> 0; then second: e1 -> 1, e2 -> 0, e0 -> 2
    assert capacity_positions(idx, 3).tolist() == [[0, 1], [1, 0], [0, 2]]


def test_expert_choice_equals_a_per_expert_loop():
    torch.manual_seed(6)
    layer = MoELayer(D, H, E, router="expert_choice", capacity_factor=1.0)
    x = _tokens()
    r = layer.router(x)
    want = torch.zeros_like(x)
    for e in range(E):
        for c, t in enumerate(r.indices[e].tolist()):
            want[t] += r.gates[e, c] * layer.experts.forward_expert(e, x[t : t + 1])[0]
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


def test_softmoe_equals_slot_loop():
    torch.manual_seed(7)
    layer = MoELayer(D, H, E, router="softmoe", router_kwargs=dict(slots_per_expert=2))
    x = _tokens(t=6)
    r = layer.router(x)
    want = torch.zeros_like(x)
    for e in range(E):
        for s in range(2):
            slot_in = (r.dispatch_weights[:, e, s].unsqueeze(-1) * x).sum(0, keepdim=True)
            slot_out = layer.experts.forward_expert(e, slot_in)[0]
            want += r.gates[:, e, s].unsqueeze(-1) * slot_out
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


def test_layer_keeps_leading_shape_and_returns_scalar_aux():
    layer = MoELayer(D, H, E)
    y, aux = layer(torch.randn(3, 5, D))
    assert y.shape == (3, 5, D) and aux.shape == ()


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_compiled_matches_eager_with_gradients(dispatch):
    torch.manual_seed(8)
    layer = MoELayer(D, H, E, router="gshard", dispatch=dispatch, capacity_factor=1.0)
    x = _tokens()
    y, aux = layer(x)
    (y.square().sum() + aux).backward()
    eager = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    torch._dynamo.reset()
    yc, auxc = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    (yc.square().sum() + auxc).backward()
    torch.testing.assert_close(yc, y)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], msg=n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(router="topk"), r"unknown router 'topk'; valid choices: \[.*'gshard'"),
        (dict(dispatch="sorted"), r"unknown dispatch 'sorted'; valid choices: \['capacity', 'dropless'\]"),
        (dict(expert="relu"), r"unknown expert 'relu'; valid choices: \['gelu', 'swiglu'\]"),
        (dict(router="softmoe", dispatch="dropless"), r"router 'softmoe' needs dispatch='capacity'"),
        (dict(router="expert_choice", dispatch="dropless"), r"router 'expert_choice' needs dispatch='capacity'"),
        (dict(ep_group="world"), r"unknown ep_group 'world'"),
        (dict(top_k=9), r"top_k must be in \[1, num_experts=4\]"),
    ],
)
def test_bad_options_raise_value_errors_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(D, H, E, **kwargs)


@pytest.mark.parametrize("router, dispatch", [("gshard", "capacity"), ("mixtral", "dropless")])
def test_dynamic_token_counts_do_not_recompile_and_match_eager(router, dispatch):
    torch.manual_seed(9)
    layer = MoELayer(D, H, E, router=router, dispatch=dispatch)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for t in (6, 13):  # capacity C = ceil(k*T*cf/E) becomes a symbolic expression of T
        x = _tokens(t=t, seed=t)
        torch.testing.assert_close(compiled(x)[0], layer(x)[0])
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0]  # the second size reuses the graph: no recompile

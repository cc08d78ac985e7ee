"""The example models: tiny defaults, overrides, they learn, they trace whole, and Mixtral trains on 2 EP ranks."""

from __future__ import annotations

import importlib

import pytest
import torch

from fsmoe_compiler.moe import MoELayer

EXAMPLES = ["fsmoe_compiler.examples.gpt2_moe", "fsmoe_compiler.examples.mixtral_moe"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_defaults_are_tiny_and_overrides_are_checked(name):
    mod = importlib.import_module(name)
    model = mod.build_model()
    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.num_experts, cfg.seq_len) == (128, 32, 2, 4, 16)
    idx, targets = mod.make_batch(batch_size=3)
    assert idx.shape == targets.shape == (3, 16) and idx.dtype == torch.long
    assert torch.equal(idx[:, 1:], targets[:, :-1])
    assert model(idx).shape == (3, 16, 128)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['n_expert'\]"):
        mod.build_model(n_expert=8)


def test_gpt2_moe_every_other_layer():
    mod = importlib.import_module("fsmoe_compiler.examples.gpt2_moe")
    model = mod.build_model(n_layers=4, moe_every=2)
    kinds = [isinstance(b.ffn, MoELayer) for b in model.blocks]
    assert kinds == [False, True, False, True]


def test_mixtral_is_rmsnorm_swiglu_top2():
    model = importlib.import_module("fsmoe_compiler.examples.mixtral_moe").build_model()
    moe = model.moe_layers()[0]
    assert moe.config["router"] == "mixtral" and moe.config["expert"] == "swiglu" and moe.router.top_k == 2
    assert type(model.norm).__name__ == "RMSNorm"


@pytest.mark.parametrize("name", EXAMPLES)
def test_learns(name):
    mod = importlib.import_module(name)
    torch.manual_seed(0)
    model = mod.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    idx, targets = mod.make_batch(8)
    for _ in range(8):
        loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.4, losses


@pytest.mark.parametrize("name, dispatch", [(n, d) for n in EXAMPLES for d in ("capacity", "dropless")])
def test_whole_model_traces_as_one_graph(name, dispatch):
    mod = importlib.import_module(name)
    model = mod.build_model(dispatch=dispatch)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*mod.make_batch(2))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _train_mixtral_ep(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from fsmoe_compiler.moe import split_parameters, sync_gradients

    mod = importlib.import_module("fsmoe_compiler.examples.mixtral_moe")
    torch.manual_seed(0)
    model = mod.build_model()
    local = model.moe_layers()[0]
    dense, experts = split_parameters(model)
    step_fn = model  # eager here; the compiled EP layer is checked in test_moe_ep (compiling costs ~10 s per rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, expert_scaled = [], True
    for step in range(3):
        idx, targets = mod.make_batch(4, seed=rank)  # same batch each step: the loss must fall
        loss = step_fn(idx, targets)
        opt.zero_grad()
        loss.backward()
        before = local.experts.w1.grad.clone()
        sync_gradients(model)
        expert_scaled &= torch.allclose(local.experts.w1.grad, before / world_size)
        opt.step()
        losses.append(loss.item())
    # after synchronised steps every replica of the dense weights is identical
    flat = torch.cat([p.detach().reshape(-1) for p in dense])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    return {
        "losses": losses,
        "local_experts": local.num_local_experts,
        "w1": tuple(local.experts.w1.shape),
        "n_expert_params": len(experts),
        "replicas_equal": all(torch.equal(g, gathered[0]) for g in gathered),
        "expert_scaled": expert_scaled,
    }


def test_mixtral_trains_on_two_expert_parallel_ranks_with_synchronised_replicas(rank_pool):
    for res in rank_pool.run(_train_mixtral_ep, timeout_s=150):
        assert res["local_experts"] == 2 and res["w1"] == (2, 32, 64)
        assert res["n_expert_params"] == 2 * 3  # 2 layers x (w1, w2, w3)
        assert res["replicas_equal"] and res["expert_scaled"]
        assert all(torch.isfinite(torch.tensor(res["losses"])))
        assert res["losses"][-1] < res["losses"][0]


def test_the_demo_builds_an_example_with_its_preset_and_the_callers_dispatch():
    from fsmoe_compiler.demo import model_options

    dsv3 = model_options("torchtitan_dsv3", "dropless")
    assert dsv3["score_func"] == "sigmoid" and dsv3["num_limited_groups"] == 2 and dsv3["dispatch"] == "dropless"
    assert model_options("torchtitan") == {} and model_options("mixtral", None, "top1") == {"router": "top1"}

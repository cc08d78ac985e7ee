"""MoE recognition on our reference ``MoELayer``: every router, both dispatches, and expert parallelism on 2 ranks.

The expert-parallel graphs are each rank's, traced in this process over PyTorch's fake process group (the
real shapes and all-to-alls; no numbers are checked here). Numerics on real gloo ranks: test_numerics.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fsmoe_compiler.moe import MoELayer
from fsmoe_compiler.passes.recognize import find_moe_regions
from graph_capture import captured, fake_world

D_MODEL, D_FF, EXPERTS, BATCH, SEQ = 16, 32, 4, 2, 12
TOKENS = BATCH * SEQ
CF = 1.25


class Block(nn.Module):
    """LayerNorm -> MoELayer with a residual; the aux loss joins the output as training code adds it to the loss."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D_MODEL)
        self.moe = MoELayer(D_MODEL, D_FF, EXPERTS, capacity_factor=CF, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, aux = self.moe(self.ln(x))
        return x + y + 0.01 * aux


def _capacity(k: int) -> int:
    return math.ceil(k * TOKENS * CF / EXPERTS)


# (router, dispatch, shared expert, expert) -> (router kind forward, router kind backward, top_k, capacity)
CASES = {
    ("gshard", "capacity", False, "gelu"): ("softmax-topk", "softmax-topk", 2, _capacity(2)),
    ("gshard", "dropless", True, "swiglu"): ("softmax-topk", "softmax-topk", 2, None),
    ("switch", "capacity", True, "gelu"): ("softmax-topk", "softmax-topk", 1, _capacity(1)),
    ("sigmoid", "dropless", False, "gelu"): ("sigmoid-topk", "sigmoid-topk", 2, None),
    ("xmoe", "capacity", False, "gelu"): ("cosine-topk", "softmax-topk", 2, _capacity(2)),
    ("mixtral", "dropless", False, "swiglu"): ("softmax-topk", "softmax-topk", 2, None),
    ("deepseek", "capacity", True, "swiglu"): ("sigmoid-topk", "sigmoid-topk", 2, _capacity(2)),
    ("expert_choice", "capacity", False, "gelu"): ("expert-choice", "expert-choice", None, _capacity(2)),
    ("softmoe", "capacity", False, "gelu"): ("soft", "soft", None, 1),
    ("softmoe", "capacity", True, "swiglu"): ("soft", "soft", None, 1),
}


def _graphs(router: str, dispatch: str, shared: bool, expert: str):
    kw = dict(router=router, dispatch=dispatch, shared_expert=shared, expert=expert)
    if router == "deepseek":  # group-limited: a topk over groups before the topk over experts
        kw["router_kwargs"] = dict(num_groups=2, topk_groups=1)
    graphs = captured(Block, **kw, inputs=((BATCH, SEQ, D_MODEL),))
    return graphs.forward[0], graphs.backward[0]


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(str(p) for p in c))
def test_reference_layer_single_process(case):
    router_fw, router_bw, top_k, capacity = CASES[case]
    shared = case[2]
    fw, bw = _graphs(*case)
    (f,) = find_moe_regions(fw, "forward")
    assert (f.router, f.num_experts, f.top_k, f.capacity, f.dropless) == (
        router_fw, EXPERTS, top_k, capacity, capacity is None)
    assert (f.tokens, f.hidden, f.ffn_hidden) == (TOKENS, D_MODEL, D_FF)
    for role in ("router", "dispatch", "expert", "combine"):
        assert f.nodes[role], role
    assert bool(f.nodes["shared_expert"]) is shared
    assert f.all_to_all == []
    (b,) = find_moe_regions(bw, "backward")
    assert (b.router, b.num_experts, b.top_k, b.capacity, b.tokens, b.hidden, b.ffn_hidden) == (
        router_bw, EXPERTS, top_k, capacity, TOKENS, D_MODEL, D_FF)
    for role in ("router", "dispatch", "expert", "combine"):
        assert b.nodes[role], role
    assert bool(b.nodes["shared_expert"]) is shared


# ---------------------------------------------------------------- expert parallelism, 2 ranks (fake process group)


EP_CASES = [("gshard", "capacity"), ("gshard", "dropless"), ("expert_choice", "capacity"), ("softmoe", "capacity")]


def _ep_model(router: str, dispatch: str) -> nn.Module:
    model = Block(router=router, dispatch=dispatch)
    if (router, dispatch) == ("gshard", "capacity"):  # two layers, the second with a shared expert
        model = nn.Sequential(model, Block(router=router, dispatch=dispatch, shared_expert=True))
    return model


def _ep_rank(rank: int, world_size: int) -> dict:
    """Compile a capacity and a dropless EP layer as ``rank`` and summarise what recognition found."""
    out = {}
    with fake_world(rank, world_size):
        for router, dispatch in EP_CASES:
            graphs = captured(_ep_model, router, dispatch, inputs=((BATCH, SEQ, D_MODEL),))
            for kind in ("forward", "backward"):
                gm = getattr(graphs, kind)[0]
                a2a_nodes = {n.name: n for n in gm.graph.nodes if "all_to_all_single" in str(n.target)}
                out[(router if router != "gshard" else dispatch, kind)] = dict(
                    regions=[
                        dict(
                            layer=r.layer, router=r.router, num_experts=r.num_experts, top_k=r.top_k,
                            capacity=r.capacity, tokens=r.tokens, all_to_all=r.all_to_all, a2a_bytes=r.a2a_bytes,
                            a2a_roles=[r.role_of(a) for a in r.all_to_all],
                            a2a_inputs=[(tuple(a2a_nodes[a].args[0].meta["val"].shape),
                                         a2a_nodes[a].args[0].meta["val"].dtype)
                                        for a in r.all_to_all
                                        if all(isinstance(s, int) for s in a2a_nodes[a].args[0].meta["val"].shape)],
                            expert_nodes=len(r.nodes["expert"]),
                        )
                        for r in find_moe_regions(gm, kind)
                    ],
                    a2a_in_graph=sorted(a2a_nodes),
                )
    return out


@pytest.fixture(scope="module")
def ep_results():
    return [_ep_rank(rank, 2) for rank in range(2)]


def test_ep_ranks_agree(ep_results):
    assert ep_results[0] == ep_results[1]


def test_ep_capacity_two_layers_all_to_alls_and_bytes(ep_results):
    cap = _capacity(2)
    buf_bytes = EXPERTS * cap * D_MODEL * 4  # one [E, C, M] float32 buffer each way
    for kind, roles in (("forward", ["dispatch", "combine"]), ("backward", ["combine", "dispatch"])):
        res = ep_results[0][("capacity", kind)]
        assert [r["layer"] for r in res["regions"]] == [0, 1]
        for r in res["regions"]:
            assert (r["router"], r["num_experts"], r["top_k"], r["capacity"], r["tokens"]) == (
                "softmax-topk", EXPERTS, 2, cap, TOKENS)
            assert len(r["all_to_all"]) == 2 and r["a2a_roles"] == roles
            assert r["a2a_bytes"] == 2 * buf_bytes
            assert r["expert_nodes"] > 0
        # every all-to-all of the graph belongs to exactly one layer
        found = [a for r in res["regions"] for a in r["all_to_all"]]
        assert sorted(found) == res["a2a_in_graph"] and len(set(found)) == 4


def test_ep_dropless_counts_then_unbacked_data_all_to_all(ep_results):
    fw = ep_results[0][("dropless", "forward")]
    (r,) = fw["regions"]
    assert r["capacity"] is None and r["top_k"] == 2
    # token counts (integer, [E]) first, then the data with data-dependent splits, then the way back
    assert r["all_to_all"] == fw["a2a_in_graph"] and len(r["all_to_all"]) == 3
    assert r["a2a_roles"] == ["router", "dispatch", "combine"]
    assert r["a2a_inputs"][0] == ((EXPERTS,), torch.int64)
    assert r["a2a_inputs"][1] == ((TOKENS * 2, D_MODEL), torch.float32)  # sorted choices: static send size
    assert r["a2a_bytes"] is None  # the combine sends a data-dependent number of rows
    bw = ep_results[0][("dropless", "backward")]
    (b,) = bw["regions"]
    assert b["all_to_all"] == bw["a2a_in_graph"] and len(b["all_to_all"]) == 2  # counts have no gradient
    assert b["a2a_roles"] == ["combine", "dispatch"] and b["a2a_bytes"] is None


@pytest.mark.parametrize(
    "router, kind_fw, kind_bw, capacity, slot_bytes",
    [("expert_choice", "expert-choice", "expert-choice", _capacity(2), _capacity(2) * D_MODEL * 4),
     ("softmoe", "soft", "soft", 1, D_MODEL * 4)],
)
def test_ep_expert_choice_and_soft_routing(ep_results, router, kind_fw, kind_bw, capacity, slot_bytes):
    for kind, router_kind, roles in (("forward", kind_fw, ["dispatch", "combine"]),
                                     ("backward", kind_bw, ["combine", "dispatch"])):
        res = ep_results[0][(router, kind)]
        (r,) = res["regions"]
        assert (r["router"], r["num_experts"], r["top_k"], r["capacity"], r["tokens"]) == (
            router_kind, EXPERTS, None, capacity, TOKENS)
        assert r["all_to_all"] == res["a2a_in_graph"] and r["a2a_roles"] == roles
        assert r["a2a_bytes"] == 2 * EXPERTS * slot_bytes  # an [E, C, M] buffer out and one back

"""MoE recognition on third-party-style blocks: each layer found once, sizes right, look-alikes rejected."""

from __future__ import annotations

import pytest
import torch

from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.recognize import ROLES, find_moe_regions, recognize
from graph_capture import captured, fake_world
import moe_styles as ms

STYLE_NAMES = ["loop", "capacity", "sort", "sort-grouped", "sort-sigmoid"]
ROUTER = {"sort-sigmoid": "sigmoid-topk"}
BATCH, SEQ, HIDDEN = 2, 12, 16
TOKENS = BATCH * SEQ


def _input() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(BATCH, SEQ, HIDDEN)


def _input_with_grad() -> torch.Tensor:
    return _input().requires_grad_()


def _block(make, **kw) -> ms.Block:
    return ms.Block(make(**kw))


def _two_blocks(style: str) -> ms.Stack:
    return ms.Stack(ms.Block(ms.STYLES[style]()), ms.Block(ms.STYLES[style](shared=True)))


def _moe_then_topk() -> ms.Stack:
    return ms.Stack(ms.Block(ms.CapacityMoE()), ms.TopKNotRouting())


def _one_layer(style: str, shared: bool, copy: bool = False):
    """(expected sizes, forward graph, backward graph); the graphs are the session's unless ``copy``."""
    graphs = captured(_block, ms.STYLES[style], shared=shared, inputs=_input, copy=copy)
    return graphs.model.mlp.expected, graphs.forward[0], graphs.backward[0]


def _two_layers(style: str, copy: bool = False):
    graphs = captured(_two_blocks, style, inputs=_input, copy=copy)
    return graphs.forward[0], graphs.backward[0]


def _matmuls(gm, names):
    by_name = {n.name: n for n in gm.graph.nodes}
    return [n for n in names if "mm" in str(by_name[n].target)]


@pytest.mark.parametrize("shared", [False, True], ids=["routed-only", "with-shared-expert"])
@pytest.mark.parametrize("style", STYLE_NAMES)
def test_forward_finds_one_region_with_the_layer_sizes(style, shared):
    expected, fw, _ = _one_layer(style, shared)
    regions = find_moe_regions(fw, "forward")
    assert len(regions) == 1
    r = regions[0]
    assert (r.layer, r.graph) == (0, "forward")
    assert r.router == ROUTER.get(style, "softmax-topk")
    assert r.num_experts == expected["num_experts"] == 4
    assert r.top_k == expected["top_k"] == 2
    assert r.capacity == expected["capacity"]
    assert r.dropless is expected["dropless"]
    assert r.tokens == TOKENS
    assert r.hidden == expected["hidden"] == HIDDEN
    assert r.ffn_hidden == expected["ffn_hidden"] == 32
    for role in ("router", "dispatch", "expert", "combine"):
        assert r.nodes[role], f"empty {role}"
    assert r.all_to_all == [] and r.a2a_bytes is None


@pytest.mark.parametrize("style", STYLE_NAMES)
def test_shared_expert_is_not_counted_as_expert(style):
    _, fw_plain, _ = _one_layer(style, False)
    _, fw_shared, _ = _one_layer(style, True)
    plain = find_moe_regions(fw_plain)[0]
    shared = find_moe_regions(fw_shared)[0]
    assert plain.nodes["shared_expert"] == []
    # the shared expert is a SwiGLU (3 matmuls) with a sigmoid gate (1 matmul), except in the capacity style
    n_shared_mm = 3 if style == "capacity" else 4
    assert len(_matmuls(fw_shared, shared.nodes["shared_expert"])) == n_shared_mm
    assert len(_matmuls(fw_shared, shared.nodes["expert"])) == len(_matmuls(fw_plain, plain.nodes["expert"]))
    assert not set(shared.nodes["shared_expert"]) & set(shared.nodes["expert"])


@pytest.mark.parametrize("style", STYLE_NAMES)
def test_expert_matmuls_per_style(style):
    _, fw, _ = _one_layer(style, False)
    r = find_moe_regions(fw)[0]
    by_name = {n.name: n for n in fw.graph.nodes}
    targets = [str(by_name[n].target) for n in _matmuls(fw, r.nodes["expert"])]
    if style == "loop":  # 4 experts x SwiGLU
        assert targets == ["aten.mm.default"] * 12
    elif style == "capacity":  # einsum over the expert dimension
        assert targets == ["aten.bmm.default"] * 2
    elif style == "sort-grouped":
        assert targets == ["aten._grouped_mm.default"] * 2
    else:  # one mm per expert over split sizes
        assert targets == ["aten.mm.default"] * 8


TWO_LAYER_STYLES = ["loop", "capacity", "sort"]  # the sort variants differ from "sort" only inside one layer


@pytest.mark.parametrize("style", TWO_LAYER_STYLES)
def test_two_layer_model_has_two_regions(style):
    fw, _ = _two_layers(style)
    regions = find_moe_regions(fw)
    assert [r.layer for r in regions] == [0, 1]
    assert [bool(r.nodes["shared_expert"]) for r in regions] == [False, True]
    a, b = (set().union(*r.nodes.values()) for r in regions)
    assert not a & b
    assert regions[0].num_experts == regions[1].num_experts == 4


@pytest.mark.parametrize(
    "make",
    [ms.DenseBlock, ms.Attention, ms.TopKNotRouting, lambda: ms.Stack(ms.DenseBlock(), ms.TopKNotRouting())],
    ids=["dense-block", "attention", "topk-not-routing", "dense-and-topk"],
)
def test_look_alikes_are_not_moe(make):
    graphs = captured(make, inputs=_input_with_grad)
    assert find_moe_regions(graphs.forward[0], "forward") == []
    assert find_moe_regions(graphs.backward[0], "backward") == []


def test_routing_like_anchors_left_alone_are_named_with_the_reason():
    graphs = captured(ms.TopKNotRouting, inputs=_input_with_grad)
    notes: list[str] = []
    assert find_moe_regions(graphs.forward[0], "forward", notes=notes) == []
    assert notes, "the top-k pooling and sampling head look like routing; the report must say why they were left alone"
    assert all(n.startswith("forward: routing-like scores at topk") and "left alone: " in n for n in notes)
    assert any("not a mixture of experts" in n or "no expert matmul" in n for n in notes)


@pytest.mark.parametrize("style", ["loop", "capacity"])
def test_find_does_not_mutate_and_recognize_only_tags(style):
    _, fw, bw = _one_layer(style, True, copy=True)
    for gm, kind in ((fw, "forward"), (bw, "backward")):
        before = gm.code
        metas = {n.name: dict(n.meta) for n in gm.graph.nodes}
        find_moe_regions(gm, kind)
        assert gm.code == before
        assert {n.name: dict(n.meta) for n in gm.graph.nodes} == metas
    ctx = PassContext(graph_kind="forward")
    before = fw.code
    out = recognize(fw, ctx)
    assert out is fw and fw.code == before
    (region,) = ctx.regions["forward"]
    tagged = {n.name: n.meta["fsmoe"] for n in fw.graph.nodes if "fsmoe" in n.meta}
    assert set(tagged) == set().union(*region.nodes.values())
    for role in ROLES:
        for name in region.nodes[role]:
            assert tagged[name] == {"role": role, "layer": 0}


BACKWARD_EXPERT_MATMULS = {  # act-grad and weight-grad matmul per forward expert matmul
    "loop": {"mm": 24},
    "capacity": {"bmm": 4},
    "sort": {"mm": 16},
    "sort-grouped": {"_grouped_mm": 4},
    "sort-sigmoid": {"mm": 16},
}


def _matmul_kinds(gm, names) -> dict[str, int]:
    by_name = {n.name: n for n in gm.graph.nodes}
    out: dict[str, int] = {}
    for n in _matmuls(gm, names):
        op = str(by_name[n].target).split(".")[1]
        out[op] = out.get(op, 0) + 1
    return out


@pytest.mark.parametrize("shared", [False, True], ids=["routed-only", "with-shared-expert"])
@pytest.mark.parametrize("style", STYLE_NAMES)
def test_backward_finds_one_region_with_transposed_expert_matmuls(style, shared):
    expected, _, bw = _one_layer(style, shared)
    regions = find_moe_regions(bw, "backward")
    assert len(regions) == 1
    r = regions[0]
    assert (r.layer, r.graph) == (0, "backward")
    assert r.router == ROUTER.get(style, "softmax-topk")
    assert (r.num_experts, r.top_k, r.tokens, r.hidden, r.ffn_hidden) == (4, 2, TOKENS, HIDDEN, 32)
    assert r.capacity == expected["capacity"] and r.dropless is expected["dropless"]
    for role in ("router", "dispatch", "expert", "combine"):
        assert r.nodes[role], f"empty {role}"
    assert _matmul_kinds(bw, r.nodes["expert"]) == BACKWARD_EXPERT_MATMULS[style]
    # the gate's two gradient matmuls (weight and input) are router work, not expert work
    assert _matmul_kinds(bw, r.nodes["router"]).get("mm") == 2
    by_name = {n.name: n for n in bw.graph.nodes}
    router_ops = {str(by_name[n].target) for n in r.nodes["router"]}
    assert {"aten._softmax_backward_data.default", "aten.sigmoid_backward.default"} & router_ops
    if shared:  # SwiGLU (3 matmuls) x (input and weight gradient), plus the sigmoid gate's 2 unless ungated
        assert _matmul_kinds(bw, r.nodes["shared_expert"]) == {"mm": 6 if style == "capacity" else 8}
    else:
        assert r.nodes["shared_expert"] == []
    roles = [set(v) for v in r.nodes.values()]
    assert sum(len(s) for s in roles) == len(set().union(*roles)), "a node has two roles"


@pytest.mark.parametrize("style", TWO_LAYER_STYLES)
def test_backward_two_layers_map_to_forward_layers(style):
    fw, bw = _two_layers(style, copy=True)  # recognize tags the nodes
    regions = find_moe_regions(bw, "backward")
    assert [r.layer for r in regions] == [0, 1]
    assert [bool(r.nodes["shared_expert"]) for r in regions] == [False, True]
    a, b = (set().union(*r.nodes.values()) for r in regions)
    assert not a & b
    # with the forward regions at hand the layer comes from the saved topk indices, and agrees
    ctx = PassContext(graph_kind="forward")
    recognize(fw, ctx)
    ctx.graph_kind = "backward"
    recognize(bw, ctx)
    assert [(r.layer, r.nodes) for r in ctx.regions["backward"]] == [(r.layer, r.nodes) for r in regions]
    layer_of = {n.name: n.meta["fsmoe"]["layer"] for n in bw.graph.nodes if "fsmoe" in n.meta}
    assert set(layer_of.values()) == {0, 1}


@pytest.mark.parametrize("style", ["capacity"])
def test_dynamic_shapes_still_find_the_region_in_both_graphs(style):
    graphs = captured(_block, ms.STYLES[style], inputs=_input, dynamic=True)
    fw = find_moe_regions(graphs.forward[0], "forward")
    bw = find_moe_regions(graphs.backward[0], "backward")
    assert len(fw) == len(bw) == 1
    for r in fw + bw:
        assert (r.num_experts, r.top_k, r.hidden, r.ffn_hidden) == (4, 2, HIDDEN, 32)
        assert r.tokens is None  # the batch is a symbol now
        assert r.dropless is (style == "sort")
        for role in ("router", "dispatch", "expert", "combine"):
            assert r.nodes[role], role


def test_shared_expert_on_the_unflattened_input_is_found():
    """DeepSeek adds its shared experts on the [B, S, M] input, not on the flattened tokens the router sees."""
    graphs = captured(_block, ms.SortMoE, shared=True, shared_on_input=True, inputs=_input)
    for gm, kind in ((graphs.forward[0], "forward"), (graphs.backward[0], "backward")):
        (r,) = find_moe_regions(gm, kind)
        per_mm = 1 if kind == "forward" else 2  # backward: input and weight gradient
        assert _matmuls(gm, r.nodes["shared_expert"]) and len(_matmuls(gm, r.nodes["shared_expert"])) == 4 * per_mm
        assert len(_matmuls(gm, r.nodes["expert"])) == 8 * per_mm


def test_opaque_scatter_back_is_taken_into_the_combine():
    """A library's own scatter-add kernel (combined rows and a routing index in, token rows out) is part of the
    combine, told by its signature; the region does not stop before it, and a note names it."""
    graphs = captured(_block, ms.OpaqueCombineMoE, inputs=_input)
    for gm, kind in ((graphs.forward[0], "forward"), (graphs.backward[0], "backward")):
        (r,) = find_moe_regions(gm, kind)
        assert (r.num_experts, r.top_k, r.ffn_hidden) == (4, 2, 32)
        if kind == "forward":  # (its backward is traced Python: an index_select)
            opaque = [n.name for n in gm.graph.nodes if "moe_styles" in str(n.target)]
            assert len(opaque) == 1
            assert set(opaque) <= set(r.nodes["combine"])
            assert any("moe_styles.scatter_rows" in note and "in the combine" in note for note in r.notes)


def test_opaque_custom_op_without_a_routing_index_is_left_alone():
    """An opaque kernel on the combined output that is no scatter ends the combine; the op is in no role."""
    graphs = captured(_block, ms.OpaqueEpilogueMoE, inputs=_input)
    fw = graphs.forward[0]
    (r,) = find_moe_regions(fw, "forward")
    assert (r.num_experts, r.top_k, r.ffn_hidden) == (4, 2, 32)
    opaque = [n.name for n in fw.graph.nodes if "moe_styles" in str(n.target)]
    assert len(opaque) == 1
    assert not set(opaque) & set().union(*r.nodes.values())
    assert any("moe_styles.rows_rescaled" in note and "left alone" in note for note in r.notes)


def test_moe_next_to_unrelated_topk_is_found_once():
    """A top-k pooling over the sequence and a top-k sampling head after an MoE block do not add regions."""
    graphs = captured(_moe_then_topk, inputs=_input)
    for gm, kind in ((graphs.forward[0], "forward"), (graphs.backward[0], "backward")):
        (r,) = find_moe_regions(gm, kind)
        assert (r.num_experts, r.top_k, r.capacity) == (4, 2, 12)
        topks = [n.name for n in gm.graph.nodes if "topk" in str(n.target)]
        if kind == "forward":
            assert len(topks) == 3 and sum(t in r.nodes["router"] for t in topks) == 1


@pytest.mark.parametrize("shared", [False, True], ids=["routed-only", "with-shared-expert"])
def test_argmax_top1_gating_without_topk(shared):
    """DeepSpeed's top-1 gating picks with argmax; the backward has no topk gradient, only the softmax's."""
    expected, fw, bw = _one_layer("argmax-top1", shared)
    (f,) = find_moe_regions(fw, "forward")
    (b,) = find_moe_regions(bw, "backward")
    assert (f.router, f.num_experts, f.top_k, f.capacity, f.tokens, f.ffn_hidden) == (
        "softmax-topk", 4, 1, expected["capacity"], TOKENS, 32)
    assert (b.router, b.num_experts, b.top_k, b.capacity, b.tokens, b.ffn_hidden) == (
        "softmax-topk", 4, None, expected["capacity"], TOKENS, 32)
    assert _matmul_kinds(fw, f.nodes["expert"]) == {"bmm": 2}
    assert _matmul_kinds(bw, b.nodes["expert"]) == {"bmm": 4}
    assert bool(f.nodes["shared_expert"]) is bool(b.nodes["shared_expert"]) is shared
    for r in (f, b):
        for role in ("router", "dispatch", "expert", "combine"):
            assert r.nodes[role], role


def test_softmax_over_topk_logits():
    """Older Mixtral code takes the topk of the logits and a softmax over the k: same layer, both graphs."""
    _, fw, bw = _one_layer("loop-topk-softmax", False)
    (f,) = find_moe_regions(fw, "forward")
    (b,) = find_moe_regions(bw, "backward")
    for r in (f, b):
        assert (r.router, r.num_experts, r.top_k, r.tokens, r.ffn_hidden) == ("softmax-topk", 4, 2, TOKENS, 32)
    assert "softmax over the top-k logits" in f.notes
    assert _matmul_kinds(bw, b.nodes["expert"]) == {"mm": 24}


def test_inplace_all_to_all_expert_parallel_block_is_found_in_both_graphs():
    """In-place all-to-alls (functional op + wait + ``aten.copy``), histc counts exchanged first, unbacked split
    sizes, a per-expert loop over the received rows and an ``index_add`` un-permute (rank 0 of 2, fake group)."""
    with fake_world(rank=0, world_size=2):
        graphs = captured(_block, ms.InplaceA2AMoE, inputs=_input_with_grad)
        for gm, kind in ((graphs.forward[0], "forward"), (graphs.backward[0], "backward")):
            (r,) = find_moe_regions(gm, kind)
            assert (r.router, r.num_experts, r.top_k, r.dropless, r.hidden) == ("softmax-topk", 4, 2, True, HIDDEN)
            a2a = [n.name for n in gm.graph.nodes if "all_to_all_single" in str(n.target)]
            assert r.all_to_all == a2a
            roles = [r.role_of(a) for a in a2a]
            # forward: the counts go first, as routing metadata; backward: the data exchanges' gradients
            assert roles == (["router", "dispatch", "combine"] if kind == "forward" else ["combine", "dispatch"])
            copies = [n for n in gm.graph.nodes if n.target is torch.ops.aten.copy.default]
            assert len(copies) == len(a2a)  # each in-place exchange copies into its preallocated output
            for c in copies:  # ... and that copy has the role of its all-to-all
                assert r.role_of(c.name) == r.role_of(c.args[1].args[0].name), c.name

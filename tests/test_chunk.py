"""The chunk pass on real expert-parallel ATen graphs, in one process.

The graphs are those of an MoE layer on 2 ranks (E=4 experts, C=10, M=32, gelu
experts: ``shared/issue5/example_*_ep2.py``), captured in one process over
PyTorch's fake process group, which gives the real shapes and collectives
without running them. The tests read the rewritten graph: r times the
all-to-alls, graph inputs and outputs unchanged, layouts found in both
directions, weight gradients added up from partial sums, metadata on every new
node, and the reasons a region is left whole. Numerics are in
``test_chunk_numerics.py`` (2 real ranks).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from fsmoe_compiler.passes.chunk import ChunkError, ChunkInfo, chunk, plan_region
from fsmoe_compiler.passes.chunk_rules import PARTIAL, UNSPLIT, Split, Unchunkable, map_factor, map_factor_loose
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.recognize import recognize
from fsmoe_compiler.passes.region import ROLES

from graph_capture import captured, fake_world, run_with_identity_all_to_all

aten = torch.ops.aten
A2A = torch.ops._c10d_functional.all_to_all_single.default


@pytest.fixture(scope="module", autouse=True)
def two_ranks():
    """Two ranks seen from rank 0 through the fake process group (collectives are not run)."""
    with fake_world(rank=0, world_size=2):
        yield


def _input() -> torch.Tensor:
    return torch.randn(2, 8, 32, requires_grad=True)


def graphs(**cfg) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Fresh copies of the forward and backward graphs of the layer built with ``cfg``."""
    from fsmoe_compiler.moe import MoELayer

    g = captured(MoELayer, 32, 64, 4, inputs=_input, copy=True, **cfg)
    return g.forward[0], g.backward[0]


def run_pass(degree: int, strict: bool = False, **cfg) -> tuple[PassContext, dict]:
    """recognize + chunk both graphs (forward first, as the backend does); the graphs and ChunkInfos by kind."""
    from fsmoe_compiler.passes.verify import graph_signature

    fw, bw = graphs(**cfg)
    ctx = PassContext(strict=strict)
    out: dict = {}
    for kind, gm in (("forward", fw), ("backward", bw)):
        ctx.graph_kind = kind
        ctx.original = graph_signature(gm)
        recognize(gm, ctx)
        ctx.degrees = {r.layer: degree for r in ctx.regions[kind]}
        ctx.chunking = {}
        out[kind] = (gm, chunk(gm, ctx), ctx.chunking[0])
    return ctx, out


def a2a_count(gm: fx.GraphModule) -> int:
    return sum(n.target is A2A for n in gm.graph.nodes)


def signature(gm: fx.GraphModule) -> tuple:
    """Placeholder names and shapes, output arity and output shapes: what chunking must keep."""
    ph = tuple((n.name, tuple(n.meta["val"].shape)) for n in gm.graph.nodes if n.op == "placeholder")
    outs = gm.graph.output_node().args[0]
    return ph, tuple(tuple(o.meta["val"].shape) if isinstance(o, fx.Node) else o for o in outs)


# ----------------------------------------------------------------------------------------------
# layouts


def test_map_factor_follows_the_capacity_through_merged_and_split_dims():
    # [4, 10, 32] -> [2, 2, 10, 32]: still a pure dim
    assert map_factor((4, 10, 32), Split(1, 1, 10, 1), (2, 2, 10, 32), "v") == Split(2, 1, 10, 1)
    # [2, 2, 10, 32] -> [2, 20, 32]: W*C merged, C is the inner factor of dim 1
    assert map_factor((2, 2, 10, 32), Split(2, 1, 10, 1), (2, 20, 32), "v") == Split(1, 2, 10, 1)
    # [4, 10, 32] -> [40, 32] and back
    assert map_factor((4, 10, 32), Split(1, 1, 10, 1), (40, 32), "v") == Split(0, 4, 10, 1)
    assert map_factor((40, 32), Split(0, 4, 10, 1), (4, 10, 32), "v") == Split(1, 1, 10, 1)
    # C*M merged: the split is the outer factor of dim 1
    assert map_factor((4, 10, 32), Split(1, 1, 10, 1), (4, 320), "v") == Split(1, 1, 10, 32)


def test_map_factor_refuses_a_split_that_straddles_two_dims():
    with pytest.raises(Unchunkable, match="straddles"):
        map_factor((4, 10, 32), Split(1, 1, 10, 1), (4, 5, 64), "view_9")


def test_forward_layouts_start_at_the_capacity_dim_of_the_dispatch_all_to_all():
    fw, _ = graphs()
    ctx = PassContext(graph_kind="forward")
    recognize(fw, ctx)
    plan = plan_region(fw, ctx.regions["forward"][0], 2)
    by = {n.name: n for n in fw.graph.nodes}
    lay = {n.name: l for n, l in plan.layouts.items()}
    assert plan.anchor == "dim 1 of view_3 [4, 10, 32]"
    assert lay["view_3"] == lay["all_to_all_single"] == lay["wait_tensor_1"] == Split(1, 1, 10, 1)
    assert lay["view_4"] == Split(2, 1, 10, 1)
    assert lay["_unsafe_view_3"] == lay["bmm"] == lay["gelu"] == Split(1, 2, 10, 1)  # W*C merged
    assert lay["primals_3"] is UNSPLIT and lay["primals_4"] is UNSPLIT
    assert {n.name for n in plan.sub.entries} == {"view_3", "primals_3", "primals_4"}
    assert {n.name for n in plan.sub.exits} == {"_unsafe_view_3", "bmm", "gelu", "wait_tensor_1"}
    assert by["index_select"] not in plan.layouts  # the combine's gather stays outside


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_a_regions_paths_are_searched_only_between_its_first_and_last_node(kind):
    import networkx as nx

    from fsmoe_compiler.passes import chunk as chunk_mod
    from fsmoe_compiler.passes.graph_utils import to_digraph

    fw, bw = graphs(shared_expert=True)
    gm = fw if kind == "forward" else bw
    ctx = PassContext(graph_kind="forward")
    recognize(fw, ctx)
    if kind == "backward":
        ctx.graph_kind = "backward"
        recognize(bw, ctx)
    region = ctx.regions[kind][0]
    members = {n for names in region.nodes.values() for n in names} | set(region.all_to_all)
    window = chunk_mod._window_digraph(gm, members)
    order = [n.name for n in gm.graph.nodes]
    first, last = min(order.index(m) for m in members), max(order.index(m) for m in members)
    assert set(window.nodes) == set(order[first:last + 1]) and len(window) < len(order)
    full = to_digraph(gm.graph)  # every path between two members stays inside the window
    for a in members:
        for b in members:
            if a != b and nx.has_path(full, a, b):
                assert nx.has_path(window, a, b), (a, b)
    sub = chunk_mod.region_subgraph(gm, region)
    assert {n.name for n in sub.nodes} <= set(window.nodes)


def test_backward_layouts_reach_saved_activations_through_their_partners():
    fw, bw = graphs()
    ctx = PassContext(graph_kind="forward")
    recognize(fw, ctx)
    ctx.graph_kind = "backward"
    recognize(bw, ctx)
    bw.graph.eliminate_dead_code()
    plan = plan_region(bw, ctx.regions["backward"][0], 2)
    lay = {n.name: l for n, l in plan.layouts.items()}
    assert lay["view_11"] == Split(1, 1, 10, 1)
    # saved activations: known only from the op that meets them with a split tensor
    assert lay["bmm"] == Split(1, 2, 10, 1)  # gelu_backward partner (pointwise)
    assert lay["gelu"] == Split(1, 2, 10, 1)  # bmm_2 contraction partner
    assert lay["_unsafe_view_3"] == Split(1, 2, 10, 1)  # through transpose_5 into bmm_4
    assert lay["transpose_5"] == Split(2, 2, 10, 1)
    assert lay["primals_3"] is UNSPLIT and lay["primals_4"] is UNSPLIT
    assert lay["bmm_2"] is PARTIAL and lay["bmm_4"] is PARTIAL  # expert weight gradients
    assert {"gelu", "bmm", "_unsafe_view_3", "view_11"} <= {n.name for n in plan.sub.entries}


# ----------------------------------------------------------------------------------------------
# the rewrite


@pytest.mark.parametrize("degree", [2, 5])
def test_chunking_multiplies_the_all_to_alls_and_keeps_graph_inputs_and_outputs(degree):
    before = {kind: signature(gm) for kind, gm in zip(("forward", "backward"), graphs())}
    ctx, out = run_pass(degree)
    for kind, (gm, returned, info) in out.items():
        assert returned is gm
        assert a2a_count(gm) == 2 * degree, kind
        assert signature(gm) == before[kind], kind
        gm.graph.lint()
        assert info == ChunkInfo(0, degree, degree, None, info.nodes, info.split, kind, info.entries, info.exits)
        assert info.nodes > 0 and info.split.startswith("dim 1 of view_")
        region = ctx.regions[kind][0]
        names = {n.name for n in gm.graph.nodes}
        assert len(region.all_to_all) == 2 * degree and set(region.all_to_all) <= names
        assert all(set(v) <= names for v in region.nodes.values())
        # each chunk's all-to-all sends a contiguous [4, 10/r, 32] buffer
        for node in gm.graph.nodes:
            if node.target is A2A:
                assert tuple(node.meta["val"].shape) == (4, 10 // degree, 32)
                assert node.args[0].meta["val"].is_contiguous()
                assert node.args[1:3] == ([2, 2], [2, 2])
    assert any("2 chunks" in n or f"{degree} chunks" in n for n in ctx.notes)


def test_chunked_graphs_pass_verify():
    from fsmoe_compiler.passes.verify import graph_signature, verify

    fw, bw = graphs()
    ctx = PassContext()
    for kind, gm in (("forward", fw), ("backward", bw)):
        ctx.graph_kind, ctx.original = kind, graph_signature(gm)
        recognize(gm, ctx)
        ctx.degrees = {0: 2}
        chunk(gm, ctx)
        verify(gm, ctx)  # inputs, output arity, topological order, collectives up to chunking, region names


def test_backward_weight_gradients_are_added_up_from_partial_sums():
    ctx, out = run_pass(2)
    bw = out["backward"][0]
    outs = bw.graph.output_node().args[0]
    weight_grads = [o for o in outs if o.meta.get("fsmoe", {}).get("glue") in ("bmm_2", "bmm_4")]
    assert len(weight_grads) == 2
    for add in weight_grads:
        assert add.target is aten.add.Tensor and add.meta["fsmoe"]["chunk"] is None
        parts = add.args
        assert [p.target for p in parts] == [aten.bmm.default] * 2
        assert [p.meta["fsmoe"]["chunk"] for p in parts] == [0, 1]
        assert [p.meta["fsmoe"]["origin"] for p in parts] == [add.meta["fsmoe"]["glue"]] * 2
        assert tuple(add.meta["val"].shape) in ((2, 32, 64), (2, 64, 32))


def test_saved_activations_are_reassembled_to_full_size_in_the_forward():
    _, out = run_pass(2)
    fw = out["forward"][0]
    saved = {o.meta["fsmoe"]["glue"]: o for o in fw.graph.output_node().args[0]
             if isinstance(o, fx.Node) and "chunk" in o.meta.get("fsmoe", {})}
    assert set(saved) == {"_unsafe_view_3", "bmm", "gelu"}
    for name, node in saved.items():
        # merged W*C: view each chunk as [2, 2, 5, F], cat the capacity, view back
        assert node.target is aten.view.default and node.args[0].target is aten.cat.default
        assert node.args[0].args[1] == 2


def test_every_new_node_has_a_fake_value_and_fsmoe_metadata():
    original = {kind: {n.name for n in gm.graph.nodes} for kind, gm in zip(("forward", "backward"), graphs())}
    ctx, out = run_pass(2)
    for kind, (gm, _, info) in out.items():
        copies = [n for n in gm.graph.nodes if "origin" in n.meta.get("fsmoe", {})]
        assert copies and {n.meta["fsmoe"]["origin"] for n in copies} <= original[kind]
        new = [n for n in gm.graph.nodes if "chunk" in n.meta.get("fsmoe", {})]
        assert len(new) == info.nodes
        for node in new:
            tag = node.meta["fsmoe"]
            assert isinstance(node.meta["val"], torch.Tensor), node.name
            assert tag["layer"] == 0 and tag["degree"] == 2 and tag["role"] in ROLES, (node.name, tag)
            assert tag["chunk"] in (None, 0, 1)
            # a copy names the node it copies; glue (slices, contiguous copies, reassembly) what it was made for
            assert ("origin" in tag) != ("glue" in tag) and isinstance(tag.get("origin", tag.get("glue")), str)
            if tag["chunk"] is None:
                assert "glue" in tag
        assert {n.meta["fsmoe"]["chunk"] for n in new} == {None, 0, 1}
        region_nodes = {n for names in ctx.regions[kind][0].nodes.values() for n in names}
        for node in gm.graph.nodes:
            if node.name in region_nodes:
                assert node.meta["fsmoe"]["degree"] == 2 and node.meta["fsmoe"]["layer"] == 0


def test_dead_recomputations_in_the_backward_are_removed():
    _, out = run_pass(2)
    names = {n.name for n in out["backward"][0].graph.nodes}
    assert not {"view_3", "_unsafe_view_4", "bmm_1", "index_add"} & names


def test_degree_one_changes_nothing_but_the_tags():
    before = [n.name for n in graphs()[0].graph.nodes]
    ctx, out = run_pass(1)
    fw, _, info = out["forward"]
    assert [n.name for n in fw.graph.nodes] == before
    assert info.degree == 1 and info.requested == 1 and info.reason is None
    assert not any("not applied" in n for n in ctx.notes)
    assert all(n.meta["fsmoe"]["degree"] == 1 for n in fw.graph.nodes if "layer" in n.meta.get("fsmoe", {}))


def test_shared_expert_and_swiglu_stay_outside_the_chunks():
    ctx, out = run_pass(2, router="mixtral", expert="swiglu", shared_expert=True)
    for kind, (gm, _, info) in out.items():
        assert info.degree == 2 and a2a_count(gm) == 4
        shared = set(ctx.regions[kind][0].nodes["shared_expert"])
        assert shared and all("chunk" not in n.meta["fsmoe"] for n in gm.graph.nodes if n.name in shared)


# ----------------------------------------------------------------------------------------------
# refusals


def _refusal(degree: int, **cfg) -> tuple[PassContext, ChunkInfo, fx.GraphModule]:
    ctx, out = run_pass(degree, **cfg)
    gm, _, info = out["forward"]
    return ctx, info, gm


@pytest.mark.parametrize(
    "degree, cfg, reason",
    [
        (11, {}, "degree 11 is larger than the capacity 10"),
        (3, {}, "degree 3 does not divide the capacity 10"),
        (3, {"dispatch": "dropless"}, "degree 3 does not divide the hidden size 32"),
        (64, {"dispatch": "dropless"}, "degree 64 is larger than the hidden size 32"),
    ],
)
def test_a_degree_that_does_not_fit_falls_back_to_one_and_says_why(degree, cfg, reason):
    ctx, info, gm = _refusal(degree, **cfg)
    assert (info.degree, info.requested, info.reason, info.nodes) == (1, degree, reason, 0)
    assert a2a_count(gm) == (3 if cfg else 2)
    assert sum(reason in n for n in ctx.notes) == 2  # forward and backward
    assert all(n.meta["fsmoe"]["degree"] == 1 for n in gm.graph.nodes if "layer" in n.meta.get("fsmoe", {}))


def _with_unknown_op() -> tuple[fx.GraphModule, PassContext]:
    """The forward graph with a cumsum over the capacity between the experts' matmuls (no rule for it)."""
    fw, _ = graphs()
    ctx = PassContext(graph_kind="forward")
    recognize(fw, ctx)
    gelu = next(n for n in fw.graph.nodes if n.name == "gelu")
    with fw.graph.inserting_after(gelu):
        odd = fw.graph.call_function(aten.cumsum.default, (gelu, 1), name="odd_cumsum")
    odd.meta["val"] = gelu.meta["val"]
    gelu.replace_all_uses_with(odd, delete_user_cb=lambda u: u.name == "bmm_1")
    ctx.regions["forward"][0].nodes["expert"].append(odd.name)
    ctx.degrees = {0: 2}
    return fw, ctx


def test_an_op_without_a_rule_leaves_the_region_whole_and_names_the_op():
    fw, ctx = _with_unknown_op()
    chunk(fw, ctx)
    info = ctx.chunking[0]
    assert info.degree == 1 and info.reason == "no chunking rule for aten.cumsum.default (node odd_cumsum)"
    assert a2a_count(fw) == 2
    assert any("aten.cumsum.default (node odd_cumsum)" in n for n in ctx.notes)


def test_strict_raises_instead_of_falling_back():
    fw, ctx = _with_unknown_op()
    ctx.strict = True
    with pytest.raises(ChunkError, match="no chunking rule for aten.cumsum.default"):
        chunk(fw, ctx)
    with pytest.raises(ChunkError, match="larger than the capacity"):
        run_pass(20, strict=True)


# ----------------------------------------------------------------------------------------------
# an all-to-all split on dim 0 (rows [E * C, M]), checked numerically with a stand-in all-to-all

WAIT = torch.ops._c10d_functional.wait_tensor.default


def _rows_graph(m: int = 32) -> tuple[fx.GraphModule, "MoERegion"]:
    """Dispatch rows [E*C, M] = [40, m] -> all-to-all -> [2, 20, m] @ w -> [40, 16] -> all-to-all back."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from fsmoe_compiler.passes.region import MoERegion

    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    sent = g.call_function(WAIT, (g.call_function(A2A, (x, [20, 20], [20, 20], "0")),))
    local = g.call_function(aten.view.default, (sent, [2, 20, m]))
    h = g.call_function(aten.bmm.default, (local, w))
    act = g.call_function(aten.relu.default, (h,))
    back = g.call_function(aten.view.default, (act, [40, 16]))
    out = g.call_function(WAIT, (g.call_function(A2A, (back, [20, 20], [20, 20], "0")),))
    g.output((out, h))
    gm = fx.GraphModule(torch.nn.Module(), g)
    mode = FakeTensorMode()
    FakeTensorProp(gm, mode).propagate(mode.from_tensor(torch.randn(40, m)), mode.from_tensor(torch.randn(2, m, 16)))
    a2a = [n.name for n in gm.graph.nodes if n.target is A2A]
    region = MoERegion(0, "forward", "test", num_experts=4, capacity=10, dropless=False, all_to_all=a2a)
    region.nodes["expert"] = [h.name, act.name, back.name]
    return gm, region


def test_an_all_to_all_split_on_rows_sends_a_share_of_every_block():
    gm, region = _rows_graph()
    x, w = torch.randn(40, 32), torch.randn(2, 32, 16)
    want = run_with_identity_all_to_all(gm, x, w)
    ctx = PassContext(graph_kind="forward", regions={"forward": [region]})
    ctx.degrees = {0: 2}
    chunk(gm, ctx)
    info = ctx.chunking[0]
    assert info.degree == 2 and info.split == "dim 0 (outer 4 x 10 x inner 1) of x [40, 32]", info
    a2a = [n for n in gm.graph.nodes if n.target is A2A]
    assert len(a2a) == 4
    for node in a2a:
        assert node.args[1:3] == ([10, 10], [10, 10])  # 1/r of each rank's rows
        assert tuple(node.meta["val"].shape)[0] == 20 and node.args[0].meta["val"].is_contiguous()
    got = run_with_identity_all_to_all(gm, x, w)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-6)


def test_tags_are_new_dicts_so_a_shallow_copy_of_the_graph_keeps_its_own():
    fw, _ = graphs()
    ctx = PassContext(graph_kind="forward")
    recognize(fw, ctx)
    before = {n.name: n.meta.get("fsmoe") for n in fw.graph.nodes}
    shared = {name: dict(tag) for name, tag in before.items() if tag}
    ctx.degrees = {0: 2}
    chunk(fw, ctx)
    assert all(before[name] == tag for name, tag in shared.items())  # the old dicts were not edited


def test_when_another_dim_has_the_capacity_size_the_first_consistent_candidate_wins():
    # M == C == 10: dim 1 of [40, 10] is tried first; it would contract the split away before relu
    gm, region = _rows_graph(m=10)
    x, w = torch.randn(40, 10), torch.randn(2, 10, 16)
    want = run_with_identity_all_to_all(gm, x, w)
    ctx = PassContext(graph_kind="forward", regions={"forward": [region]})
    ctx.degrees = {0: 5}
    chunk(gm, ctx)
    assert ctx.chunking[0].split == "dim 0 (outer 4 x 10 x inner 1) of x [40, 10]", ctx.chunking[0]
    assert a2a_count(gm) == 10
    for g_, w_ in zip(run_with_identity_all_to_all(gm, x, w), want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# single rules, on small traced functions


def _layouts(fn, shapes: list, seed_dim: int, seed_size: int = 10) -> dict:
    """Layouts by node name of ``fn``'s traced graph, seeded with a pure split of its first input ``in0``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fsmoe_compiler.passes.chunk import Subgraph, infer_layouts

    gm = make_fx(fn, tracing_mode="fake")(*[torch.randn(s) for s in shapes])
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    entries = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lay = infer_layouts(Subgraph(nodes, entries, []), {entries[0]: Split(seed_dim, 1, seed_size, 1)})
    inputs = {n: f"in{i}" for i, n in enumerate(entries)}  # inputs by position: in0, in1
    return {inputs.get(n, n.name): l for n, l in lay.items()}


def test_pointwise_broadcast_operands_stay_unsplit_and_a_sum_over_the_split_is_partial():
    lay = _layouts(lambda x, b: (x * b).sum(1), [(4, 10, 8), (8,)], 1)
    assert lay["mul"] == Split(1, 1, 10, 1) and lay["in1"] is UNSPLIT and lay["sum_1"] is PARTIAL


def test_a_saved_tensor_learns_its_split_from_its_pointwise_partner():
    lay = _layouts(lambda g, saved: torch.ops.aten.gelu_backward(g, saved), [(4, 10, 8), (4, 10, 8)], 1)
    assert lay["in1"] == lay["gelu_backward"] == Split(1, 1, 10, 1)


def test_expand_moves_the_split_to_its_new_position():
    lay = _layouts(lambda x: x.unsqueeze(0).expand(3, 4, 10, 8).sum(0), [(4, 10, 8)], 1)
    assert lay["expand"] == Split(2, 1, 10, 1) and lay["sum_1"] == Split(1, 1, 10, 1)


def test_matmul_rows_carry_the_split_and_a_shared_contraction_is_a_partial_sum():
    lay = _layouts(lambda x, w: x @ w, [(10, 8), (8, 6)], 0)
    assert lay["mm"] == Split(0, 1, 10, 1) and lay["in1"] is UNSPLIT
    lay = _layouts(lambda x, y: x.t() @ y, [(10, 8), (10, 6)], 0)
    assert lay["in1"] == Split(0, 1, 10, 1) and lay["mm"] is PARTIAL


@pytest.mark.parametrize(
    "fn, why",
    [
        (lambda x: x.sum(0) + 1.0, "adds a partial sum"),
        (lambda x: x.mean(0), "averages over the split dim"),
        (lambda x: torch.nn.functional.gelu(x.sum(0)), "not linear"),
        (lambda x: x.reshape(5, 16), "straddles"),
    ],
)
def test_rules_refuse_what_would_change_the_result(fn, why):
    with pytest.raises(Unchunkable, match=why):
        _layouts(fn, [(10, 8)], 0)


# ----------------------------------------------------------------------------------------------
# dropless dispatch: split along the hidden dim, the layer's own (data-dependent) split sizes kept


def _int_a2a(node: fx.Node) -> bool:
    return node.target is A2A and not node.meta["val"].is_floating_point()


def _sym_signature(gm: fx.GraphModule) -> tuple:
    """``signature`` for graphs whose outputs include sizes: each value's shape, or the size itself."""
    def of(n):
        v = n.meta.get("val") if isinstance(n, fx.Node) else n
        return tuple(str(d) for d in v.shape) if isinstance(v, torch.Tensor) else str(v)

    outs = gm.graph.output_node().args[0]
    return tuple(of(n) for n in gm.graph.nodes if n.op == "placeholder"), tuple(of(o) for o in outs)


@pytest.mark.parametrize("degree", [2, 4])
def test_dropless_all_to_alls_send_column_chunks_with_the_layers_own_split_sizes(degree):
    before = {kind: _sym_signature(gm) for kind, gm in zip(("forward", "backward"), graphs(dispatch="dropless"))}
    fw0, bw0 = graphs(dispatch="dropless")
    names = lambda args: [[str(s) for s in sizes] for sizes in args]  # noqa: E731
    sizes = {kind: [names(n.args[1:3]) for n in gm.graph.nodes if n.target is A2A and not _int_a2a(n)]
             for kind, gm in (("forward", fw0), ("backward", bw0))}
    ctx, out = run_pass(degree, dispatch="dropless")
    for kind, (gm, _, info) in out.items():
        gm.graph.lint()
        assert _sym_signature(gm) == before[kind], kind  # saved tensors keep their (symbolic) shapes
        assert info.degree == degree and info.along == "hidden" and info.reason is None, info
        assert info.split.startswith("the hidden dim of "), info.split
        counts = [n for n in gm.graph.nodes if n.target is A2A and _int_a2a(n)]
        data = [n for n in gm.graph.nodes if n.target is A2A and not _int_a2a(n)]
        assert len(counts) == (1 if kind == "forward" else 0)  # the token counts are exchanged once, whole
        assert len(data) == 2 * degree
        for node in data:
            assert node.meta["val"].shape[-1] == 32 // degree
            assert node.args[0].meta["val"].shape[-1] == 32 // degree
            assert node.meta["fsmoe"]["chunk"] in range(degree)
            # every chunk sends its columns of every row: the split sizes are the layer's own (unbacked) ones
            assert names(node.args[1:3]) in sizes[kind], (node.name, node.args[1:3])
        assert len(ctx.regions[kind][0].all_to_all) == 2 * degree + len(counts)


def test_dropless_first_gemm_is_a_partial_sum_read_whole_by_the_activation():
    fw, _ = graphs(dispatch="dropless")
    ctx = PassContext(graph_kind="forward")
    recognize(fw, ctx)
    plan = plan_region(fw, ctx.regions["forward"][0], 2)
    lay = {n.name: l for n, l in plan.layouts.items()}
    assert plan.along == "hidden"
    assert lay["index_select"] == lay["all_to_all_single_1"] == lay["cat"] == Split(1, 1, 32, 1)
    assert lay["split_with_sizes"] == lay["getitem_4"] == Split(1, 1, 32, 1)  # pieces of the received rows
    assert lay["select_9"] == Split(0, 1, 32, 1)  # expert 0's first weight: its rows (the contraction)
    assert lay["mm_1"] is PARTIAL and lay["gelu"] is UNSPLIT  # the activation reads the sum of the chunks
    assert lay["select_10"] == Split(1, 1, 32, 1) and lay["mm_2"] == Split(1, 1, 32, 1)  # output columns
    assert lay["cat_2"] == lay["all_to_all_single_2"] == Split(1, 1, 32, 1)
    assert "all_to_all_single" not in lay  # the integer count exchange is not part of the chunks
    chunk(fw, replace_ctx := PassContext(graph_kind="forward", regions=ctx.regions, degrees={0: 2}))
    gelu = next(n for n in fw.graph.nodes if n.name == "gelu")
    (summed,) = gelu.all_input_nodes
    assert summed.target is aten.add.Tensor and summed.meta["fsmoe"] == {**summed.meta["fsmoe"], "glue": "mm_1"}
    assert [p.meta["fsmoe"]["origin"] for p in summed.args] == ["mm_1", "mm_1"]
    assert replace_ctx.chunking[0].degree == 2


def test_dropless_backward_splits_weight_gradients_by_columns_and_reads_the_activation_gradient_whole():
    ctx, out = run_pass(2, dispatch="dropless")
    bw = out["backward"][0]
    outs = [o for o in bw.graph.output_node().args[0] if isinstance(o, fx.Node)]
    w2_grad = next(o for o in outs if tuple(o.meta["val"].shape) == (2, 64, 32))
    assert w2_grad.target is aten.cat.default and w2_grad.args[1] == 2  # [E, H, M] put back along M
    w1_grad = next(o for o in outs if tuple(o.meta["val"].shape) == (2, 32, 64))
    assert "chunk" not in (w1_grad.meta.get("fsmoe") or {})  # x^T @ dpre: one GEMM, not chunked
    gelu_bw = [n for n in bw.graph.nodes if n.target is aten.gelu_backward.default]
    assert len(gelu_bw) == 2 and all(n.args[0].target is aten.add.Tensor for n in gelu_bw)


def test_dropless_chunked_graphs_pass_verify():
    from fsmoe_compiler.passes.verify import graph_signature, verify

    fw, bw = graphs(dispatch="dropless", router="mixtral", expert="swiglu", shared_expert=True)
    ctx = PassContext()
    for kind, gm in (("forward", fw), ("backward", bw)):
        ctx.graph_kind, ctx.original = kind, graph_signature(gm)
        recognize(gm, ctx)
        ctx.degrees = {0: 4}
        ctx.chunking = {}
        chunk(gm, ctx)
        assert ctx.chunking[0].degree == 4, ctx.chunking[0]
        verify(gm, ctx)


def test_a_dropless_all_to_all_is_priced_from_the_bytes_it_sent_when_profiled():
    from fsmoe_compiler.profiler import CostModel
    from fsmoe_compiler.scheduler.costs import LinearCost

    _, out = run_pass(2, dispatch="dropless")
    fw = out["forward"][0]
    data = [n for n in fw.graph.nodes if n.target is A2A and not _int_a2a(n)]
    combine = next(n for n in data if n.meta["fsmoe"]["origin"] == "all_to_all_single_2")
    sample = {"node": combine.name, "kind": "all_to_all", "group": "0", "group_size": 2, "ms": 1.0}
    model = CostModel(comm={"all_to_all/2": LinearCost(0.5, 0.001)},
                      samples=[{**sample, "bytes": 4000, "degree": 2}, {**sample, "bytes": 6000, "degree": 2},
                               {**sample, "bytes": 8000, "degree": 2}, {**sample, "bytes": 64000, "degree": 4}])
    assert model.node_cost(combine) == pytest.approx(0.5 + 0.001 * 6000)  # the median of its own degree's calls
    # a chunk copy never profiled: its origin's bytes at degree 1, divided by the degree
    origin = CostModel(comm=model.comm, samples=[{**sample, "node": "all_to_all_single_2", "bytes": 9000,
                                                  "degree": 1}])
    assert origin.node_cost(combine) == pytest.approx(0.5 + 0.001 * 4500)
    static = next(n for n in data if n.meta["fsmoe"]["origin"] == "all_to_all_single_1")  # [32, 16] float32
    assert model.node_cost(static) == pytest.approx(0.5 + 0.001 * 32 * 16 * 4)


def test_a_split_is_followed_through_reshapes_of_data_dependent_leading_dims():
    """Dropless rows or an unpadded capacity make the leading sizes symbolic; a split inside the static trailing
    block still lands where it would with any value of them, and one that straddles still refuses."""
    hidden = Split(2, 1, 8, 1)
    assert map_factor_loose((None, 4, 8), hidden, (None, 32), "t") == Split(1, 4, 8, 1)
    assert map_factor_loose((None, 32), Split(1, 4, 8, 1), (None, 4, 8), "t") == hidden
    assert map_factor_loose((None, 8), Split(1, 1, 8, 1), (2, None, 8), "t") == Split(2, 1, 8, 1)
    assert map_factor_loose((6, 4, 8), hidden, (24, 8), "t") == map_factor((6, 4, 8), hidden, (24, 8), "t")
    with pytest.raises(Unchunkable, match="straddles|cannot be followed"):
        map_factor_loose((None, 64), Split(1, 1, 64, 1), (None, 2, 32), "t")
    with pytest.raises(Unchunkable, match="cannot be followed"):
        map_factor_loose((None, 8), Split(0, 1, 4, 1), (None, 8), "t")  # the split itself is data-dependent

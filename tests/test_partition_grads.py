"""``passes/partition_grads.py`` on hand-built backward graphs: which all-reduces merge, what the rewrite looks like,
and that the verifier counts a merged all-reduce as its members. The numerics on real ranks: ``test_grad_sync.py``."""

from __future__ import annotations

import pytest
import torch

from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.ops import is_collective
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.partition_grads import apply_partitions, gradient_reduces, partition_grads, partitions
from fsmoe_compiler.passes.verify import check_topological, compare_collectives, graph_signature
from fsmoe_compiler.profiler import CostModel
from fsmoe_compiler.scheduler.costs import LinearCost
from graph_builder import GraphBuilder, region

aten = torch.ops.aten

# gradient shapes in graph order: 64 B, 32 B, 1 KiB, 8 B on the "dp" group, then one of an "ep" group, then 16 B
SHAPES = [(4, 4), (8,), (16, 16), (2,)]


def _backward() -> torch.fx.GraphModule:
    b = GraphBuilder()
    outs = []
    for i, shp in enumerate(SHAPES):
        g = b.op(f"grad{i}", aten.mul.Tensor, b.input(f"x{i}", *shp), 2.0)
        outs.append(b.op(f"avg{i}", aten.div.Tensor, b.all_reduce(f"ar{i}", g), 2.0))
    other = b.op("grad_ep", aten.mul.Tensor, b.input("x_ep", 4), 2.0)
    outs.append(b.all_reduce("ar_ep", other, group="ep"))
    routed = b.op("grad_router", aten.mul.Tensor, b.input("x_r", 4), 2.0)
    outs.append(b.all_reduce("ar_router", routed, fsmoe=region(0, "router")))  # inside a MoE region
    last = b.op("grad_last", aten.mul.Tensor, b.input("x_last", 4), 2.0)
    outs.append(b.op("avg_last", aten.div.Tensor, b.all_reduce("ar_last", last), 2.0))
    return b.output(*outs)


def test_partitions_are_consecutive_runs_of_one_group_filled_up_to_the_cap():
    reduces = gradient_reduces(_backward(), {"ar_router"})
    assert [r.start.name for r in reduces] == ["ar0", "ar1", "ar2", "ar3", "ar_ep", "ar_last"]
    assert [r.nbytes for r in reduces] == [64, 32, 1024, 8, 16, 16]
    names = lambda parts: [[r.start.name for r in p] for p in parts]  # noqa: E731
    assert names(partitions(reduces, 0)) == [[r.start.name] for r in reduces]
    assert names(partitions(reduces, 100)) == [["ar0", "ar1"], ["ar2"], ["ar3"], ["ar_ep"], ["ar_last"]]
    # one bucket per run: another group between two runs of "dp" keeps them apart (the order is the ranks' contract)
    assert names(partitions(reduces, float("inf"))) == [["ar0", "ar1", "ar2", "ar3"], ["ar_ep"], ["ar_last"]]


def test_a_partition_is_one_all_reduce_of_a_flat_buffer_sliced_back_into_each_gradient():
    gm = _backward()
    before = graph_signature(gm)
    left = apply_partitions(gm, partitions(gradient_reduces(gm, {"ar_router"}), 100))
    assert left == 5
    check_topological(gm)
    gm.graph.lint()
    colls = [n for n in gm.graph.nodes if is_collective(n)]
    assert [n.name for n in colls][:1] == ["all_reduce_partition0"] or "all_reduce_partition0" in [n.name for n in colls]
    merged = next(n for n in colls if n.name == "all_reduce_partition0")
    assert merged.meta["fsmoe"]["merged"] == ["ar0", "ar1"]
    flat = merged.args[0]
    assert flat.target is aten.cat.default and tuple(flat.meta["val"].shape) == (16 + 8,)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert "ar0" not in nodes and "wait_ar1" not in nodes
    # each average now reads its slice of the merged result, viewed back to the gradient's shape
    avg0, avg1 = nodes["avg0"], nodes["avg1"]
    assert avg0.args[0].target is aten.view.default and tuple(avg0.args[0].meta["val"].shape) == (4, 4)
    assert avg1.args[0].args[0].target is aten.slice.Tensor and avg1.args[0].args[0].args[2:] == (16, 24)
    # the verifier: the same all-reduces and bytes per group, counting the merged one as its members
    assert compare_collectives(before, graph_signature(gm)) is None


def _ctx(setting, costs=None) -> PassContext:
    return PassContext(config=FSMoEConfig(grad_partition=setting), graph_kind="backward", costs=costs)


def test_auto_keeps_per_parameter_on_a_link_without_a_fixed_cost_and_merges_where_alpha_dominates():
    names = lambda gm: sorted(n.name for n in gm.graph.nodes if is_collective(n))  # noqa: E731
    free = CostModel(node_ms={}, comm={"all_reduce/2": LinearCost(0.0, 1e-6)})
    gm = partition_grads(_backward(), ctx := _ctx("auto", free))
    assert names(gm) == ["ar0", "ar1", "ar2", "ar3", "ar_ep", "ar_last", "ar_router"]
    assert "kept per parameter" in ctx.notes[0] and "one bucket per group" in ctx.notes[0]
    costly = CostModel(node_ms={}, comm={"all_reduce/2": LinearCost(5.0, 1e-6)})
    gm = partition_grads(_backward(), ctx := _ctx("auto", costly))
    assert len(names(gm)) < 7 and "merged into" in ctx.notes[0]
    off = partition_grads(_backward(), _ctx("off", costly))
    assert len(names(off)) == 7


def test_the_option_is_validated_naming_the_valid_values():
    for bad in ("sometimes", 0, -5, 1.5, True):
        with pytest.raises(ValueError, match="'grad_partition' must be 'off', 'auto' or a number of bytes > 0"):
            FSMoEConfig(grad_partition=bad)
    assert FSMoEConfig(grad_partition=1 << 20).grad_partition == 1 << 20

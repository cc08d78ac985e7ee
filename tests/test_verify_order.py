"""passes.verify: topological order, per-group collective issue order, collectives up to chunking, streams."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.verify import (VerificationError, check_topological, collective_order, compare_collectives,
                                          graph_signature, verify)
from graph_builder import GraphBuilder

aten = torch.ops.aten


def _unchunked() -> fx.GraphModule:
    b = GraphBuilder()
    x = b.input("x", 8, 8)
    d = b.op("d", aten.mul.Tensor, x, 2.0)
    w = b.a2a("a2a", d, group="ep")
    e = b.op("e", aten.relu.default, w)
    r = b.all_reduce("ar", e, group="dp")
    return b.output(r)


def _chunked(chunks: int = 2, drop_last: bool = False) -> fx.GraphModule:
    """``_unchunked`` with the all-to-all split in ``chunks`` along dim 0 (meta origin "a2a"), then the all-reduce."""
    b = GraphBuilder()
    x = b.input("x", 8, 8)
    d = b.op("d", aten.mul.Tensor, x, 2.0)
    rows = 8 // chunks
    outs = []
    for c in range(chunks - (1 if drop_last else 0)):
        part = b.op(f"d_c{c}", aten.slice.Tensor, d, 0, c * rows, (c + 1) * rows)
        outs.append(b.a2a(f"a2a_c{c}", part, group="ep",
                          fsmoe={"layer": 0, "role": "dispatch", "chunk": c, "degree": chunks, "origin": "a2a"}))
    w = b.op("cat", aten.cat.default, outs)
    e = b.op("e", aten.relu.default, w)
    r = b.all_reduce("ar", e, group="dp")
    return b.output(r)


def _ctx(original: fx.GraphModule) -> PassContext:
    return PassContext(graph_kind="forward", original=graph_signature(original))


def test_collective_order_lists_op_and_input_shape_per_group_in_issue_order():
    assert collective_order(_unchunked()) == {"ep": ["all_to_all_single[8, 8]"], "dp": ["all_reduce[8, 8]"]}
    assert collective_order(_chunked()) == {"ep": ["all_to_all_single[4, 8]"] * 2, "dp": ["all_reduce[8, 8]"]}


def test_collective_order_writes_symbolic_sizes_as_question_marks():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    w = b.a2a("a2a", x)
    gm = b.output(w)
    gm.graph.find_nodes(op="placeholder")[0].meta["val"] = None  # size unknown
    assert collective_order(gm) == {"ep": ["all_to_all_single[?]"]}


def test_topological_check_names_the_node_used_before_it_is_computed():
    gm = _unchunked()
    check_topological(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    nodes["d"].prepend(nodes["e"])  # e now comes before its input chain
    with pytest.raises(VerificationError, match="node e uses wait_a2a before it is computed"):
        check_topological(gm)


def test_unscheduled_graph_must_keep_the_issue_order_per_group():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    y = b.a2a("one", x)
    z = b.all_gather("two", x, group="ep")
    gm = b.output(y, z)
    ctx = _ctx(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    nodes["one"].prepend(nodes["two"])  # all_gather now issued before the all_to_all on the same group
    gm.recompile()
    with pytest.raises(VerificationError, match="changed the collective issue order per process group"):
        verify(gm, ctx)


def test_chunked_and_scheduled_graph_keeps_its_collectives_up_to_chunking():
    ctx = _ctx(_unchunked())
    verify(_chunked(2), ctx)
    verify(_chunked(4), ctx)
    with pytest.raises(VerificationError, match=r"group ep: 256 bytes -> 192 bytes"):
        verify(_chunked(4, drop_last=True), ctx)


def test_a_collective_added_or_lost_is_caught_after_chunking():
    before = graph_signature(_unchunked())
    b = GraphBuilder()
    x = b.input("x", 8, 8)
    w = b.a2a("a2a", x, group="ep", fsmoe={"layer": 0, "origin": "a2a", "chunk": 0, "degree": 1})
    extra = b.a2a("extra", w, group="ep")
    r = b.all_reduce("ar", extra, group="dp")
    why = compare_collectives(before, graph_signature(b.output(r)))
    assert why is not None and "kinds per group" in why and "'ep': {'all_to_all_single': 2}" in why


def test_stream_annotations_must_put_collectives_and_waits_on_comm():
    gm = _unchunked()
    ctx = _ctx(gm)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.meta["fsmoe"] = {"task": "t", "stream": "comm" if "a2a" in n.name or "ar" in n.name else "compute"}
    verify(gm, ctx)
    next(n for n in gm.graph.nodes if n.name == "wait_a2a").meta["fsmoe"]["stream"] = "compute"
    with pytest.raises(VerificationError, match="node wait_a2a is annotated for stream 'compute', expected 'comm'"):
        verify(gm, ctx)

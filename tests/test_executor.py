"""GraphExecutor: plain and timed runs give the graph's outputs; task intervals nest inside the call."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fsmoe_compiler.runtime.executor import GraphExecutor
from graph_capture import grads_through


def _f(x, w1, w2):
    h = torch.relu(x @ w1)
    return (h @ w2).sum(0), h.mean()


def _graph():
    args = [torch.randn(64, 32), torch.randn(32, 48), torch.randn(48, 16)]
    return make_fx(_f)(*args), args


def test_plain_and_timed_runs_equal_the_graph():
    gm, args = _graph()
    expected = gm(*args)
    ex = GraphExecutor(gm)
    for out in (ex(args), ex.run(args), ex.run(args, timed=True)):
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert ex._boxed_call  # aot_autograd may call it with its argument list


def test_task_intervals_nest_in_the_call_and_follow_graph_order():
    gm, args = _graph()
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    task_of = {name: ("first" if i < len(names) // 2 else "second") for i, name in enumerate(names)}
    ex = GraphExecutor(gm, task_of)
    ex.run(args, timed=True)
    assert set(ex.last_timing) == {"first", "second"}
    total = ex.last_total_ms
    for start, end in ex.last_timing.values():
        assert 0.0 <= start <= end <= total
    assert ex.last_timing["first"][1] <= ex.last_timing["second"][0]


def test_without_task_map_every_call_node_is_its_own_task():
    gm, args = _graph()
    ex = GraphExecutor(gm)
    ex.run(args, timed=True)
    assert set(ex.last_timing) == {n.name for n in gm.graph.nodes if n.op == "call_function"}
    assert ex.last_total_ms >= max(e for _, e in ex.last_timing.values())


def test_executor_serves_as_aot_autograds_compiled_forward_and_backward():
    made: list[GraphExecutor] = []
    assert grads_through(lambda gm: made.append(GraphExecutor(gm)) or made[-1])
    assert len(made) == 2  # forward and backward


def test_an_interleaved_task_spans_from_its_first_node_to_its_last():
    gm, args = _graph()
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    task_of = {name: "outer" for name in names}
    task_of[names[1]] = "inner"  # outer, inner, outer, ...
    ex = GraphExecutor(gm, task_of)
    out = ex.run(args, timed=True)
    assert all(torch.equal(a, b) for a, b in zip(out, gm(*args)))
    (o0, o1), (i0, i1) = ex.last_timing["outer"], ex.last_timing["inner"]
    assert 0.0 <= o0 <= i0 <= i1 <= o1 <= ex.last_total_ms

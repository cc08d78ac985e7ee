"""passes.annotate: a schedule turned into a node order and stream annotations.

Schedules come from the scheduler on task graphs with an injected cost table (as
PyTorch's test_aten_comm_compute_reordering injects a runtime estimator); the node
order is asserted exactly. Numerics: the annotated graphs of a real MoE layer run on
real tensors (one process without collectives, and 2 gloo ranks with all-to-all).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch.testing import FileCheck

from fsmoe_compiler.passes.annotate import AnnotateError, annotate, order_nodes, task_order
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.graph_utils import apply_order
from fsmoe_compiler.passes.taskgraph import build_taskgraph, taskgraph
from fsmoe_compiler.passes.verify import check_topological, collective_order
from fsmoe_compiler.passes.streams import stream_of
from fsmoe_compiler.scheduler import Schedule, fixed_order_schedule, heuristic_schedule
from graph_builder import BWD_COSTS, FWD_COSTS, GraphBuilder, backward_ep, cost_table, forward_ep_chunked

aten = torch.ops.aten


def _names(nodes) -> list[str]:
    return [n.name for n in nodes]


def _annotated(gm: fx.GraphModule, costs: dict, phase: str, schedule_fn=heuristic_schedule):
    tg, tm = build_taskgraph(gm, cost_table(costs), phase)
    schedule = schedule_fn(tg)
    ctx = PassContext(graph_kind=phase)
    ctx.schedule, ctx.taskmap = schedule, tm
    return annotate(gm, ctx), tg, tm, schedule


class _Costs:
    """A stand-in for profiler.CostModel: only ``node_cost`` is used."""

    def __init__(self, table: dict) -> None:
        self.table = table

    def node_cost(self, node: fx.Node) -> float:
        return self.table.get(node.name, 0.0)


def test_chunked_forward_issues_dispatches_early_and_places_waits_right_before_their_users():
    gm, tg, tm, s = _annotated(forward_ep_chunked(), FWD_COSTS, "forward")
    assert s.makespan == 13.0
    order = _names(gm.graph.nodes)
    assert order == [
        "x", "w_gate", "w_expert",
        "x_c0", "disp_c0", "a2a_d0",          # chunk 0's dispatch goes out first ...
        "x_c1", "disp_c1", "a2a_d1",          # ... then chunk 1's
        "scores", "probs",                    # the router runs while both are in flight
        "wait_a2a_d0", "exp_c0", "act_c0", "a2a_c0",
        "wait_a2a_d1", "exp_c1", "act_c1", "a2a_c1",   # expert 1 overlaps combine 0
        "wait_a2a_c0", "comb_c0", "wait_a2a_c1", "comb_c1", "cat", "dense_out", "output",
    ]
    FileCheck().check("all_to_all_single.default(disp_c0").check("all_to_all_single.default(disp_c1").check(
        "mm.default(x, w_gate)").check("wait_tensor.default(a2a_d0)").check("mm.default(wait_a2a_d0").run(gm.code)
    for n in gm.graph.nodes:  # every wait sits right before its first user
        if n.name.startswith("wait_"):
            first_user = min(n.users, key=lambda u: order.index(u.name))
            assert order.index(first_user.name) == order.index(n.name) + 1, n.name
    check_topological(gm)


def test_in_flight_bound_places_the_oldest_wait_before_the_next_collective():
    from fsmoe_compiler.config import FSMoEConfig
    from fsmoe_compiler.passes.annotate import footprint_bytes

    gm = forward_ep_chunked()
    one = footprint_bytes(next(n for n in gm.graph.nodes if n.name == "a2a_d0"))
    assert one == 2 * 4 * 8 * 4  # input and output of a 4x8 fp32 exchange
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    ctx = PassContext(graph_kind="forward", config=FSMoEConfig(max_in_flight_mb=1.5 * one / 2**20))
    ctx.schedule, ctx.taskmap = heuristic_schedule(tg), tm
    order = _names(annotate(gm, ctx).graph.nodes)
    for a, b in (("a2a_d0", "a2a_d1"), ("a2a_d1", "a2a_c0"), ("a2a_c0", "a2a_c1")):
        # one exchange in flight at a time: each is waited on before the next is issued
        assert order.index(f"wait_{a}") < order.index(b), (a, order)
    assert order.index("scores") < order.index("wait_a2a_d0")  # the router still overlaps the first exchange
    assert order.index("a2a_d1") == order.index("wait_a2a_d0") + 2  # the next goes out once that wait is placed
    assert any("issued later than the schedule asks" in n and "a2a_d1" in n and "max_in_flight_mb" in n
               for n in ctx.notes), ctx.notes
    check_topological(gm)
    with pytest.raises(ValueError, match="'max_in_flight_mb' must be a number of MB > 0 or None.*got 0"):
        FSMoEConfig.from_options({"max_in_flight_mb": 0})


def test_stream_and_task_annotations_follow_the_task_map():
    gm, tg, tm, s = _annotated(forward_ep_chunked(), FWD_COSTS, "forward")
    streams = {n.name: n.meta["fsmoe"]["stream"] for n in gm.graph.nodes if "fsmoe" in n.meta}
    assert {k for k, v in streams.items() if v == "comm"} == {
        "a2a_d0", "wait_a2a_d0", "a2a_d1", "wait_a2a_d1", "a2a_c0", "wait_a2a_c0", "a2a_c1", "wait_a2a_c1"}
    assert streams["exp_c0"] == "compute" and streams["dense_out"] == "compute"
    tasks = {n.name: n.meta["fsmoe"].get("task") for n in gm.graph.nodes if "fsmoe" in n.meta}
    assert tasks["a2a_c1"] == tasks["wait_a2a_c1"] == "F.L0.c1.a2a1"
    assert tasks["exp_c1"] == tasks["act_c1"] == "F.L0.c1.compute1"
    assert tasks["dense_out"] == "F.dense0"
    node = {n.name: n for n in gm.graph.nodes}
    assert node["exp_c1"].meta["fsmoe"]["layer"] == 0 and node["exp_c1"].meta["fsmoe"]["chunk"] == 1  # kept
    assert "fsmoe" not in node["x"].meta  # placeholders belong to no task
    assert stream_of(node["a2a_d0"]) == "comm" and stream_of(node["x"]) == "compute"


def test_backward_runs_the_weight_gradient_while_the_input_gradient_all_to_all_is_in_flight():
    gm, tg, tm, s = _annotated(backward_ep(), BWD_COSTS, "backward")
    assert _names(gm.graph.nodes) == [
        "grad_out", "saved_x", "w_expert",
        "g_perm", "a2a_g", "w_t", "wait_a2a_g", "dx_mm", "a2a_dx",   # dX first, its all-to-all issued at once
        "x_t", "dw_mm",                                              # dW overlaps it
        "wait_a2a_dx", "dx_in", "output",
    ]
    assert s.makespan == 9.0


def test_issue_order_per_process_group_is_the_schedules_even_against_graph_order():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    outs = []
    for i in range(3):
        y = b.op(f"prep{i}", aten.mul.Tensor, x, float(i + 1))
        outs.append(b.a2a(f"a2a{i}", y, group="ep"))
    z = b.op("prep_dp", aten.relu.default, x)
    outs.append(b.all_reduce("ar", z, group="dp"))
    gm = b.output(*outs)
    tg, tm = build_taskgraph(gm, cost_table({}, 1.0), "forward")
    # a schedule that runs the all-to-alls in the order 2, 0, 1 (and the compute accordingly)
    order = {"compute": ["F.dense3", "F.dense2", "F.dense0", "F.dense1"],
             "inter": ["F.ar0", "F.a2a2", "F.a2a0", "F.a2a1"], "intra": []}
    s = fixed_order_schedule(tg, order)
    assert tm.nodes_of["F.dense2"] == ["prep2"] and tm.group["F.ar0"] == "dp"
    nodes = order_nodes(gm, s, tm)
    gm2 = copy.deepcopy(gm)
    out = gm2.graph.output_node()
    by = {n.name: n for n in gm2.graph.nodes}
    for n in nodes:
        if n.op != "placeholder" and n.name != "output":
            out.prepend(by[n.name])
    assert collective_order(gm2) == {"ep": ["all_to_all_single[4, 4]"] * 3, "dp": ["all_reduce[4, 4]"]}
    issued = [n for n in _names(nodes) if n.startswith(("a2a", "ar"))]
    assert issued == ["ar", "a2a2", "a2a0", "a2a1"]
    # deterministic: the same inputs give the same order (what every rank computes)
    assert _names(order_nodes(gm, s, tm)) == _names(nodes)


def test_a_collective_waits_for_the_previous_one_of_its_group_even_when_its_inputs_are_ready():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    slow = b.op("slow", aten.mul.Tensor, x, 2.0)
    first = b.a2a("first", slow)
    second = b.a2a("second", x)  # inputs ready at once, but the schedule issues it after `first`
    gm = b.output(first, second)
    tg, tm = build_taskgraph(gm, cost_table({"slow": 1.0, "first": 1.0, "second": 1.0}), "forward")
    s = fixed_order_schedule(tg, {"compute": ["F.dense0"], "inter": ["F.a2a0", "F.a2a1"], "intra": []})
    assert _names(order_nodes(gm, s, tm)) == ["x", "slow", "first", "second", "wait_first", "wait_second", "output"]


def test_a_collective_held_back_by_the_in_flight_bound_goes_out_when_a_node_reads_it():
    from fsmoe_compiler.passes.annotate import footprint_bytes

    b = GraphBuilder()
    x = b.input("x", 4, 4)
    first = b.a2a("first", b.op("d0", aten.mul.Tensor, x, 2.0))
    second = b.a2a("second", b.op("d1", aten.mul.Tensor, x, 3.0))
    start = second.args[0]
    rows = b.op("rows", aten.sym_size.int, start, 0)  # a size read off the exchange itself (dropless code does)
    use = b.op("use", aten.mul.Tensor, first, rows)
    gm = b.output(b.op("out", aten.add.Tensor, use, second))
    tg, tm = build_taskgraph(gm, cost_table({"d0": 1.0, "d1": 1.0, "first": 1.0, "second": 1.0}), "forward")
    s = heuristic_schedule(tg)
    bound = footprint_bytes(start) * 3 // 2  # one exchange in flight at a time
    held: list = []
    order = _names(order_nodes(gm, s, tm, max_in_flight_bytes=bound, held=held))
    assert held == ["second"]  # held back, then issued (after the oldest wait) when `rows` needed it
    assert order.index("first") < order.index("wait_first") < order.index("second") < order.index("rows"), order
    assert _names(order_nodes(gm, s, tm)).index("second") < order.index("second")  # unbounded: issued earlier


def _in_flight_at_issue(order: list[str], pairs: dict[str, str]) -> dict[str, list[str]]:
    """Per collective start (``pairs``: start -> wait name), the collectives issued and not yet waited when it goes."""
    out, flying = {}, []
    for name in order:
        if name in pairs:
            out[name] = list(flying)
            flying.append(name)
        for start in [f for f in flying if pairs[f] == name]:
            flying.remove(start)
    return out


@pytest.mark.parametrize("alone", [["a2a_d0"], ["a2a_c0"], ["a2a_d1", "a2a_c1"]])
def test_a_collective_that_flies_alone_has_nothing_in_flight_beside_it(alone):
    gm = forward_ep_chunked()
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    s = heuristic_schedule(tg)
    pairs = dict(tm.collective.values())
    tasks = {t for t, (start, _) in tm.collective.items() if start in alone}
    held: list = []
    order = _names(order_nodes(gm, s, tm, alone=tasks, held_alone=held))
    free = _names(order_nodes(gm, s, tm))
    flying, flying_free = _in_flight_at_issue(order, pairs), _in_flight_at_issue(free, pairs)
    for start in pairs:
        if start in alone:
            assert flying[start] == [], (start, order)  # issued with nothing in flight ...
        else:
            assert not set(flying[start]) & set(alone), (start, order)  # ... and nothing issued beside it
    assert held and set(held) <= set(pairs)  # what went later than the schedule asked is named
    # without the rule each of them shared the link
    assert all(flying_free[a] or any(a in f for f in flying_free.values()) for a in alone)
    assert _names(order_nodes(gm, s, tm, alone=set())) == free
    apply_order(gm, order_nodes(gm, s, tm, alone=tasks))
    check_topological(gm)


def test_nothing_moves_across_a_barrier():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    early = b.a2a("early", x)
    a = b.op("a", aten.relu.default, x)
    bar = b.graph.create_node("call_function", torch.ops.c10d.barrier.default, (a,), {}, name="c10d_barrier")
    late = b.a2a("late", x)  # its input is ready from the start, but it was written after the barrier
    d = b.op("d", aten.add.Tensor, early, 1.0)  # the wait of `early` is needed only after the barrier
    e = b.op("e", aten.add.Tensor, late, d)
    gm = b.output(e)
    gm, tg, tm, s = _annotated(gm, {"a": 1.0, "early": 5.0, "late": 5.0, "d": 1.0, "e": 1.0}, "forward")
    order = _names(gm.graph.nodes)
    assert order == ["x", "early", "a", "wait_early", "c10d_barrier", "late", "d", "wait_late", "e", "output"]
    assert bar.meta["fsmoe"]["task"] == "F.barrier0"


def test_random_ops_keep_their_relative_order():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    r1 = b.op("r1", aten.rand_like.default, x)
    w = b.a2a("comm", x)
    r2 = b.op("r2", aten.rand_like.default, w, fsmoe={"layer": 0, "role": "expert"})
    gm = b.output(r1, r2)
    tg, tm = build_taskgraph(gm, cost_table({"r1": 5.0, "comm": 1.0, "r2": 1.0}), "forward")
    assert (tm.task_of["r1"], tm.task_of["r2"]) in tg.deps
    order = _names(order_nodes(gm, heuristic_schedule(tg), tm))
    assert order.index("r1") < order.index("r2")


def test_an_inconsistent_schedule_still_gives_a_topological_order():
    gm = forward_ep_chunked()
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    s = heuristic_schedule(tg)
    bad = Schedule(start={t: -v for t, v in s.start.items()}, end=dict(s.end),
                   order={r: list(reversed(ts)) for r, ts in s.order.items()}, makespan=s.makespan)
    nodes = order_nodes(gm, bad, tm)
    pos = {n: i for i, n in enumerate(nodes)}
    assert all(pos[a] < pos[n] for n in nodes for a in n.all_input_nodes)
    assert task_order(s, tm)[:3] == ["F.L0.c0.compute0", "F.L0.c0.a2a0", "F.L0.c1.compute0"]


def test_annotate_rejects_a_task_map_of_another_graph_and_skips_without_a_schedule():
    gm = forward_ep_chunked()
    tg, tm = build_taskgraph(backward_ep(), cost_table(BWD_COSTS), "backward")
    with pytest.raises(AnnotateError, match="in no task"):
        order_nodes(gm, heuristic_schedule(tg), tm)
    ctx = PassContext(graph_kind="forward")
    assert annotate(gm, ctx) is gm and "annotate skipped (no schedule)" in ctx.notes[-1]
    with pytest.raises(AnnotateError, match="no schedule"):
        annotate(gm, PassContext(graph_kind="forward", strict=True))


def test_taskgraph_pass_reads_the_cost_model_from_the_context():
    gm = forward_ep_chunked()
    ctx = PassContext(graph_kind="forward")
    ctx.costs = _Costs(FWD_COSTS)
    assert taskgraph(gm, ctx) is gm
    assert ctx.taskgraph["F.L0.c0.compute1"].duration == 3.5 and "F.dense0" in ctx.taskmap.nodes_of
    ctx2 = PassContext(graph_kind="forward")
    ctx2.costs = None
    taskgraph(gm, ctx2)
    assert ctx2.taskgraph.total("compute") == 0.0 and "no cost model" in ctx2.notes[-1]


# ---------------------------------------------------------------------------
# real tensors
# ---------------------------------------------------------------------------

def _scheduling_backend(costs, log: dict, degree: int = 1, max_in_flight_mb: float | None = None):
    """aot_autograd: recognize -> [chunk] -> taskgraph -> heuristic schedule -> annotate -> verify, both graphs."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from fsmoe_compiler.config import FSMoEConfig
    from fsmoe_compiler.passes.recognize import recognize
    from fsmoe_compiler.passes.verify import graph_signature, verify

    regions: dict = {}

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            ctx = PassContext(graph_kind=kind, regions=dict(regions), original=graph_signature(gm), strict=True,
                              config=FSMoEConfig(max_in_flight_mb=max_in_flight_mb))
            before = [n.name for n in gm.graph.nodes]
            recognize(gm, ctx)
            regions.update(ctx.regions)
            if degree > 1:  # the chunk pass (passes/chunk.py) splits each region r ways
                from fsmoe_compiler.passes.chunk import chunk

                ctx.degrees = {r.layer: degree for r in ctx.regions.get(kind, [])}
                chunk(gm, ctx)
            ctx.costs = costs
            taskgraph(gm, ctx)
            ctx.schedule = heuristic_schedule(ctx.taskgraph)
            annotate(gm, ctx)
            verify(gm, ctx)
            log[kind] = {"moved": before != [n.name for n in gm.graph.nodes], "order": collective_order(gm),
                         "held": any("issued later than the schedule asks" in n for n in ctx.notes),
                         "tasks": len(ctx.taskmap.nodes_of),
                         "streams": sorted({n.meta["fsmoe"]["stream"] for n in gm.graph.nodes if "fsmoe" in n.meta
                                            and "stream" in n.meta["fsmoe"]})}
            return make_boxed_func(gm.forward)
        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


class _CostByKind:
    """Deterministic costs from the op: matmuls 2 ms, collectives 3 ms, the rest 0.1 ms."""

    def node_cost(self, node: fx.Node) -> float:
        name = str(node.target)
        if "all_to_all" in name:
            return 3.0
        if "mm" in name:
            return 2.0
        return 0.1


def _run_layer(layer, x, backend=None):
    run = torch.compile(layer, backend=backend, fullgraph=True) if backend is not None else layer
    y, aux = run(x)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + aux
    grads = torch.autograd.grad(loss, [p for p in layer.parameters()] + [x])
    return y.detach(), grads


def test_annotated_graphs_compute_what_eager_computes_on_one_process():
    from fsmoe_compiler.moe import MoELayer

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="gshard", dispatch="capacity", ep_group="local")
    x = torch.randn(2, 6, 8, requires_grad=True)
    log: dict = {}
    y, grads = _run_layer(layer, x, _scheduling_backend(_CostByKind(), log))
    y_ref, grads_ref = _run_layer(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)
    assert log["forward"]["tasks"] > 1 and log["backward"]["tasks"] > 1
    assert log["forward"]["streams"] == ["compute"]  # no collectives on one process


def _ep_rank(rank: int, world_size: int) -> dict:
    from fsmoe_compiler.moe import MoELayer

    out = {}
    # dropless: symbolic split sizes, a size read off an all-to-all; chunked: 2 chunks by passes/chunk.py
    # dropless under the default in-flight bound (sizes known only at run time); "one_in_flight": a bound below
    # one exchange's buffers, so each waits for the one before (max_in_flight_mb)
    for case, dispatch, degree, bound in (("capacity", "capacity", 1, None), ("dropless", "dropless", 1, 5120.0),
                                          ("chunked", "capacity", 2, None), ("one_in_flight", "capacity", 2, 1e-6)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        layer = MoELayer(8, 16, 4, router="gshard", dispatch=dispatch)
        x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        log: dict = {}
        with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
            y, grads = _run_layer(layer, x, _scheduling_backend(_CostByKind(), log, degree, bound))
        y_ref, grads_ref = _run_layer(layer, x)
        err = max([(y - y_ref).abs().max().item()] + [(g - r).abs().max().item() for g, r in zip(grads, grads_ref)])
        out[case] = {"err": err, "log": log, "scale": y_ref.abs().max().item()}
    return out


def test_annotated_ep_graphs_match_eager_on_two_gloo_ranks_with_one_issue_order(rank_pool):
    results = rank_pool.run(_ep_rank, timeout_s=180, pg_timeout_s=60)
    for per_rank in results:
        for case, r in per_rank.items():
            assert r["scale"] > 1e-3 and r["err"] < 1e-5, (case, r)
            assert r["log"]["forward"]["moved"] and r["log"]["forward"]["streams"] == ["comm", "compute"]
        assert per_rank["capacity"]["log"]["forward"]["order"]["0"] == ["all_to_all_single[4, 8, 8]"] * 2
        assert "all_to_all_single[?, 8]" in per_rank["dropless"]["log"]["backward"]["order"]["0"]
        assert len(per_rank["chunked"]["log"]["forward"]["order"]["0"]) == 4  # 2 chunks x (dispatch, combine)
        assert per_rank["one_in_flight"]["log"]["forward"]["held"] and not per_rank["chunked"]["log"]["forward"]["held"]
    # same tasks and the same per-group issue order on both ranks
    assert all(results[0][k]["log"] == results[1][k]["log"] for k in results[0])


def test_a_sequential_schedule_waits_for_each_collective_at_once():
    gm = forward_ep_chunked()
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    from fsmoe_compiler.passes.taskgraph import sequential_order

    s = fixed_order_schedule(tg, sequential_order(tg, tm), method="sequential")
    ctx = PassContext(graph_kind="forward")
    ctx.schedule, ctx.taskmap = s, tm
    order = _names(annotate(gm, ctx).graph.nodes)
    for name in ("a2a_d0", "a2a_d1", "a2a_c0", "a2a_c1"):
        assert order[order.index(name) + 1] == f"wait_{name}"
    assert order[3:8] == ["scores", "probs", "x_c0", "disp_c0", "a2a_d0"]


def test_stream_recorder_passes_the_schedule_and_names_a_use_without_its_event():
    from fsmoe_compiler.passes.verify import VerificationError, verify
    from fsmoe_compiler.passes.streams import StreamHazard, check_streams

    gm, _, _, _ = _annotated(forward_ep_chunked(), FWD_COSTS, "forward")
    events = check_streams(gm)
    assert [e for e in events if e[1] == "a2a_d0"] == [("issue", "a2a_d0"), ("wait", "a2a_d0")]
    assert events.index(("issue", "a2a_d1")) < events.index(("wait", "a2a_d0"))  # two in flight at once
    node = {n.name: n for n in gm.graph.nodes}
    # a compute node reading the exchanged buffer before its wait: the recorder names both
    bad = copy.deepcopy(gm)
    b = {n.name: n for n in bad.graph.nodes}
    b["scores"].replace_input_with(b["x"], b["a2a_d0"])  # scores runs while a2a_d0 is in flight
    with pytest.raises(StreamHazard, match="scores .compute stream. reads the result of collective a2a_d0 before"):
        check_streams(bad)
    with pytest.raises(VerificationError, match="forward graph: scores"):
        verify(bad, PassContext(graph_kind="forward"))
    # an in-place write into a buffer an exchange is still reading
    bad = copy.deepcopy(gm)
    b = {n.name: n for n in bad.graph.nodes}
    with bad.graph.inserting_after(b["a2a_d0"]):
        bad.graph.call_function(torch.ops.aten.mul_.Tensor, (b["disp_c0"], 2.0))
    with pytest.raises(StreamHazard, match="writes disp_c0 while collective a2a_d0 .comm stream. still uses it"):
        check_streams(bad)
    # a collective never waited for
    bad = copy.deepcopy(gm)
    b = {n.name: n for n in bad.graph.nodes}
    b["wait_a2a_c1"].replace_all_uses_with(b["act_c1"])
    bad.graph.erase_node(b["wait_a2a_c1"])
    with pytest.raises(StreamHazard, match="a2a_c1 still in flight when the graph returns"):
        check_streams(bad)
    assert node["a2a_d0"].meta["fsmoe"]["stream"] == "comm"

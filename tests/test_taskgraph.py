"""passes.taskgraph: FX graph -> scheduler TaskGraph, with a fixed cost table injected.

Graphs are built by hand with ``_c10d_functional`` ops (building them needs no
process group; they are never run here) and ``meta["fsmoe"]`` as recognize/chunk
write it, by ``GraphBuilder`` of ``graph_builder.py`` (shared with test_annotate.py
and test_verify_order.py).
"""

from __future__ import annotations

import random

import networkx as nx
import pytest
import torch

from fsmoe_compiler.passes.taskgraph import TaskMap, build_taskgraph, classify_nodes, sequential_order, tutel_order
from fsmoe_compiler.scheduler import fixed_order_schedule, heuristic_schedule, validate_schedule
from graph_builder import BWD_COSTS, FWD_COSTS, GraphBuilder, backward_ep, cost_table, forward_ep_chunked, region

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


# ---------------------------------------------------------------------------


def test_each_collective_with_its_wait_is_one_task_on_the_link_priced_by_its_start():
    gm = forward_ep_chunked()
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    coll = {t.id: t for t in tg if t.resource != "compute"}
    assert sorted(coll) == ["F.L0.c0.a2a0", "F.L0.c0.a2a1", "F.L0.c1.a2a0", "F.L0.c1.a2a1"]
    assert tm.nodes_of["F.L0.c0.a2a0"] == ["a2a_d0", "wait_a2a_d0"]
    assert tm.collective["F.L0.c1.a2a1"] == ("a2a_c1", "wait_a2a_c1")
    assert all(t.resource == "inter" and t.kind == "all_to_all" and t.duration == 2.0 for t in coll.values())
    assert coll["F.L0.c0.a2a0"].role == "dispatch" and coll["F.L0.c0.a2a1"].role == "combine"
    assert coll["F.L0.c0.a2a0"].size == 4 * 8 * 4  # bytes of the input
    assert tm.group["F.L0.c0.a2a0"] == "ep"


def test_a_collectives_host_cpu_time_is_a_compute_task_between_its_inputs_and_users_with_no_nodes():
    gm = forward_ep_chunked()
    plain, _ = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward",
                             cpu_cost=lambda n: 0.5 if n.name == "a2a_d0" else 0.0)
    assert set(tg.tasks) - set(plain.tasks) == {"F.L0.c0.a2a0.cpu"} and tm.cpu_of == {"F.L0.c0.a2a0.cpu": "F.L0.c0.a2a0"}
    cpu = tg["F.L0.c0.a2a0.cpu"]
    assert (cpu.resource, cpu.kind, cpu.duration, cpu.role) == ("compute", "host_cpu", 0.5, "dispatch")
    assert set(tg.preds(cpu.id)) == set(tg.preds("F.L0.c0.a2a0")) and tg.preds(cpu.id)
    assert set(tg.succs(cpu.id)) == set(tg.succs("F.L0.c0.a2a0")) and tg.succs(cpu.id)
    assert cpu.id not in tm.nodes_of and all(cpu.id not in d for d in tm.deps)  # annotate never sees it
    assert tg.total("compute") == pytest.approx(plain.total("compute") + 0.5)
    for order in (sequential_order(tg, tm), tutel_order(tg, tm)):  # the baselines place it too
        assert cpu.id in order["compute"]
        validate_schedule(tg, fixed_order_schedule(tg, order))
    # overlapping the exchange with compute gains at most what the host leaves free
    assert heuristic_schedule(tg).makespan >= heuristic_schedule(plain).makespan


def test_region_nodes_group_by_layer_chunk_and_nearest_collectives_with_readable_ids():
    gm = forward_ep_chunked()
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    assert tm.nodes_of == {
        "F.L0.compute0": ["scores", "probs"],
        "F.L0.c0.compute0": ["x_c0", "disp_c0"],
        "F.L0.c0.a2a0": ["a2a_d0", "wait_a2a_d0"],
        "F.L0.c0.compute1": ["exp_c0", "act_c0"],
        "F.L0.c0.a2a1": ["a2a_c0", "wait_a2a_c0"],
        "F.L0.c0.compute2": ["comb_c0"],
        "F.L0.c1.compute0": ["x_c1", "disp_c1"],
        "F.L0.c1.a2a0": ["a2a_d1", "wait_a2a_d1"],
        "F.L0.c1.compute1": ["exp_c1", "act_c1"],
        "F.L0.c1.a2a1": ["a2a_c1", "wait_a2a_c1"],
        "F.L0.c1.compute2": ["comb_c1"],
        "F.L0.compute1": ["cat"],
        "F.dense0": ["dense_out"],
    }
    t = tg["F.L0.c1.compute1"]
    assert (t.layer, t.chunk, t.role, t.phase, t.duration) == (0, 1, "expert", "forward", 3.5)
    assert tg["F.dense0"].layer == -1 and tg["F.dense0"].role == "dense"
    assert tg["F.L0.compute1"].chunk == -1  # glue: no chunk
    assert set(tg.preds("F.L0.c0.a2a1")) == {"F.L0.c0.compute1"}
    assert set(tg.preds("F.L0.compute1")) == {"F.L0.c0.compute2", "F.L0.c1.compute2"}
    assert set(tg.preds("F.dense0")) == {"F.L0.compute1"}
    validate_schedule(tg, heuristic_schedule(tg))


def test_weight_gradient_is_a_task_apart_from_the_input_gradient_chain():
    tg, tm = build_taskgraph(backward_ep(), cost_table(BWD_COSTS), "backward")
    dx, dw = tm.task_of["dx_mm"], tm.task_of["dw_mm"]
    assert dx != dw
    assert tm.nodes_of[dx] == ["w_t", "dx_mm"]  # the free transpose joins its user
    assert tm.nodes_of[dw] == ["x_t", "dw_mm"]
    assert tg[dw].role == "expert_wgrad" and tg[dx].role == "expert"
    assert tg.succs(dw) == [] and tg.succs(dx) == ["B.L0.a2a1"]
    # the scheduler can now run dW while the dX all-to-all is in flight
    s = heuristic_schedule(tg)
    assert s.order["compute"].index(dx) < s.order["compute"].index(dw)
    assert s.start[dw] < s.end["B.L0.a2a1"]


def test_a_view_read_by_both_gradients_does_not_tie_the_input_gradient_to_the_weight_gradient():
    b = GraphBuilder()
    g = b.input("grad", 8, 8)
    xs = b.input("saved_x", 8, 8)
    w = b.input("w", 8, 8)
    recv = b.a2a("a2a_g", g, fsmoe=region(0, "combine"))
    b.fsmoe = region(0, "expert")
    rv = b.op("recv_view", aten.view.default, recv, [8, 8])  # read by dW (first) and dX
    dw = b.op("dw_mm", aten.mm.default, b.op("x_t", aten.t.default, xs), rv)
    cl = b.op("cl", aten.clone.default, rv)
    clv = b.op("cl_view", aten.view.default, cl, [8, 8])  # its producer's task takes it
    dw2 = b.op("dw2_mm", aten.mm.default, clv, w)
    dx = b.op("dx_mm", aten.mm.default, clv, b.op("w_t", aten.t.default, w))
    back = b.a2a("a2a_dx", dx, fsmoe=region(0, "dispatch"))
    gm = b.output(back, dw, dw2)
    tg, tm = build_taskgraph(gm, cost_table({"dw_mm": 3.0, "dx_mm": 3.0, "dw2_mm": 3.0, "cl": 1.0}), "backward")
    assert tm.nodes_of["B.L0.compute0"] == ["recv_view"] and tg["B.L0.compute0"].duration == 0.0
    assert tm.nodes_of[tm.task_of["cl"]] == ["cl", "cl_view", "w_t", "dx_mm"]
    assert tm.nodes_of[tm.task_of["dw_mm"]] == ["x_t", "dw_mm", "dw2_mm"]
    assert tg[tm.task_of["dw_mm"]].role == "expert_wgrad"
    assert tm.task_of["dw_mm"] not in nx.ancestors(tg.g, tm.task_of["dx_mm"])


def test_outside_regions_compute_forms_maximal_runs_between_collectives():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    a = b.op("a", aten.relu.default, x)
    v = b.op("v", aten.view.default, a, [16])
    c = b.op("c", aten.neg.default, v)
    w = b.all_reduce("ar", c)
    d = b.op("d", aten.relu.default, w)
    e = b.op("e", aten.relu.default, x, fsmoe=region(3, "expert"))
    f = b.op("f", aten.add.Tensor, d, 1.0)
    gm = b.output(f, e)
    tg, tm = build_taskgraph(gm, cost_table({"a": 1, "c": 1, "ar": 5, "d": 1, "e": 2, "f": 1}), "backward")
    assert tm.nodes_of["B.dense0"] == ["a", "v", "c"]
    assert tm.nodes_of["B.dense1"] == ["d"]
    assert tm.nodes_of["B.L3.compute0"] == ["e"]
    assert tm.nodes_of["B.dense2"] == ["f"]  # the region node broke the run
    assert tg["B.ar0"].role == "grad_sync" and tg["B.ar0"].resource == "inter"
    assert tg["B.dense0"].duration == 2.0


def test_grouping_that_would_create_a_cycle_is_split_until_acyclic():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    # a and c share a key (layer 0, no collectives) but a dense node sits between them: {a, c} is not convex
    a = b.op("a", aten.relu.default, x, fsmoe=region(0, "expert"))
    m = b.op("m", aten.neg.default, a)
    c = b.op("c", aten.add.Tensor, m, a, fsmoe=region(0, "expert"))
    # two convex groups that depend on each other: p1 -> q1 and q2 -> p2
    p1 = b.op("p1", aten.relu.default, x, fsmoe=region(1, "expert"))
    q1 = b.op("q1", aten.neg.default, p1, fsmoe=region(2, "expert"))
    q2 = b.op("q2", aten.neg.default, x, fsmoe=region(2, "expert"))
    p2 = b.op("p2", aten.add.Tensor, q2, x, fsmoe=region(1, "expert"))
    gm = b.output(c, m, q1, p2)  # m is also an output, so it stays outside the region
    tg, tm = build_taskgraph(gm, cost_table({}, 1.0), "forward")
    assert nx.is_directed_acyclic_graph(tg.g)
    assert tm.nodes_of == {"F.L0.compute0": ["a"], "F.dense0": ["m"], "F.L0.compute1": ["c"],  # {a, c} made convex
                           "F.L1.compute0": ["p1"], "F.L2.compute0": ["q1", "q2"],  # {p1, p2} halved: no cycle
                           "F.L1.compute1": ["p2"]}
    for tid, names in tm.nodes_of.items():  # every node in exactly one task
        assert all(tm.task_of[n] == tid for n in names)
    assert sorted(tm.task_of) == sorted(n.name for n in gm.graph.nodes if n.op == "call_function")
    # ids are stable: building again gives the same map
    assert build_taskgraph(gm, cost_table({}, 1.0), "forward")[1].nodes_of == tm.nodes_of


def test_unmodelled_communication_and_mutation_are_barriers_with_every_task_ordered_around_them():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    buf = b.input("buf", 4, 4)
    a = b.op("a", aten.relu.default, x)
    bar = b.graph.create_node("call_function", torch.ops.c10d.barrier.default, (a,), {}, name="c10d_barrier")
    w = b.a2a("late", x)
    d = b.op("d", aten.add.Tensor, w, 1.0)
    cp = b.op("copy", aten.copy_.default, buf, d)
    gm = b.output(d)
    kinds = classify_nodes(gm.graph)
    assert kinds[bar] == "barrier" and kinds[cp] == "barrier" and kinds[w] == "wait"
    tg, tm = build_taskgraph(gm, cost_table({}, 1.0), "forward")
    assert tm.barriers == ["F.barrier0", "F.barrier1"]
    assert tm.segment["late"] == 1 and tm.segment["a"] == 0
    assert ("F.dense0", "F.barrier0") in tg.deps and ("F.barrier0", "F.a2a0") in tg.deps
    assert ("F.barrier0", "F.barrier1") in tg.deps and ("F.dense1", "F.barrier1") in tg.deps


def test_helpers_outside_a_region_that_only_feed_it_join_the_region():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    a = b.op("a", aten.relu.default, x, fsmoe=region(0, "router"))
    ar = b.op("ar", aten.arange.default, 4, device="meta")  # unlabelled helper feeding only the region
    fl = b.op("fl", aten.full_like.default, a, 2.0)
    c = b.op("c", aten.add.Tensor, a, fl, fsmoe=region(0, "router"))
    d = b.op("d", aten.add.Tensor, c, ar, fsmoe=region(0, "router"))
    loss = b.op("loss", aten.mean.default, a)  # feeds the output: stays dense
    gm = b.output(d, loss)
    tg, tm = build_taskgraph(gm, cost_table({}, 1.0), "forward")
    assert tm.nodes_of == {"F.L0.compute0": ["a", "ar", "fl", "c", "d"], "F.dense0": ["loss"]}


def test_costs_must_be_finite_and_non_negative():
    with pytest.raises(ValueError, match="cost of node exp_c0 must be a finite number"):
        build_taskgraph(forward_ep_chunked(), cost_table({"exp_c0": float("nan")}), "forward")
    with pytest.raises(ValueError, match="phase must be"):
        build_taskgraph(forward_ep_chunked(), cost_table({}), "sideways")


def test_a_size_read_off_a_collective_output_does_not_make_it_a_barrier():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    w = b.a2a("a2a", x)
    start = w.args[0]
    size = b._node(aten.sym_size.int, (start, 0), "size", 4)
    y = b.op("y", aten.mul.Tensor, w, 2.0)
    gm = b.output(y, size)
    kinds = classify_nodes(gm.graph)
    assert kinds[start] == "collective" and kinds[w] == "wait"
    tg, tm = build_taskgraph(gm, cost_table({}, 1.0), "forward")
    assert tm.nodes_of["F.a2a0"] == ["a2a", "wait_a2a"] and tm.barriers == []


def test_a_wait_on_a_completed_tensor_is_the_identity_not_a_barrier():
    """``wait_tensor(all_reduce(g))`` traces as two waits (funcol adds its own); the second must not pin every
    task to its side, or no gradient all-reduce could ever move."""
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    g = b.input("g", 4, 4)
    w = b.all_reduce("ar", g)
    again = b._node(c10d.wait_tensor.default, (w,), "wait_again", torch.empty_like(w.meta["val"]))
    scaled = b.op("scaled", aten.div.Tensor, again, 2.0)
    y = b.a2a("a2a", b.op("a", aten.relu.default, x))
    gm = b.output(scaled, y)
    kinds = classify_nodes(gm.graph)
    assert kinds[w] == "wait" and kinds[again] == "compute"
    tg, tm = build_taskgraph(gm, cost_table({}, 1.0), "backward")
    assert tm.barriers == []
    assert tm.task_of["wait_again"] == tm.task_of["scaled"]  # joins its user, like a view
    assert nx.has_path(tg.g, "B.ar0", tm.task_of["scaled"])
    # the all-reduce and the all-to-all are independent: either may go first on the link
    assert not nx.has_path(tg.g, "B.ar0", "B.a2a0") and not nx.has_path(tg.g, "B.a2a0", "B.ar0")


def test_all_gather_groups_run_on_the_intra_link_and_a2a_groups_on_inter():
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    r = b.a2a("a", x, group="ep")
    g = b.all_gather("ag", r, group="esp")
    gm = b.output(g)
    tg, _ = build_taskgraph(gm, cost_table({}, 1.0), "forward")
    assert tg["F.a2a0"].resource == "inter" and tg["F.ag0"].resource == "intra"
    # one process group for everything: one link
    b = GraphBuilder()
    x = b.input("x", 4, 4)
    g = b.all_gather("ag", b.a2a("a", x, group="w"), group="w")
    tg, _ = build_taskgraph(b.output(g), cost_table({}, 1.0), "forward")
    assert tg["F.ag0"].resource == "inter"


def test_sequential_and_tutel_orders_replay_without_deadlock_and_tutel_pipelines_the_chunks():
    gm = forward_ep_chunked()
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    seq = sequential_order(tg, tm)
    assert seq["inter"] == ["F.L0.c0.a2a0", "F.L0.c0.a2a1", "F.L0.c1.a2a0", "F.L0.c1.a2a1"]
    assert seq["compute"] == ["F.L0.compute0", "F.L0.c0.compute0", "F.L0.c0.compute1", "F.L0.c0.compute2",
                              "F.L0.c1.compute0", "F.L0.c1.compute1", "F.L0.c1.compute2", "F.L0.compute1", "F.dense0"]
    tut = tutel_order(tg, tm)  # every chunk's dispatch, then the experts chunk by chunk, then the combines
    assert tut["compute"] == ["F.L0.compute0", "F.L0.c0.compute0", "F.L0.c1.compute0", "F.L0.c0.compute1",
                              "F.L0.c1.compute1", "F.L0.c0.compute2", "F.L0.c1.compute2", "F.L0.compute1", "F.dense0"]
    assert tut["inter"] == ["F.L0.c0.a2a0", "F.L0.c1.a2a0", "F.L0.c0.a2a1", "F.L0.c1.a2a1"]
    s_seq = validate_schedule(tg, fixed_order_schedule(tg, seq))
    s_tut = validate_schedule(tg, fixed_order_schedule(tg, tut))
    s_ours = validate_schedule(tg, heuristic_schedule(tg))
    assert (s_seq.makespan, s_tut.makespan, s_ours.makespan) == (19.25, 14.5, 13.0)


def test_tutel_order_in_the_backward_runs_weight_gradients_with_their_stage():
    tg, tm = build_taskgraph(backward_ep(), cost_table(BWD_COSTS), "backward")
    order = tutel_order(tg, tm)
    validate_schedule(tg, fixed_order_schedule(tg, order))
    assert order["inter"] == ["B.L0.a2a0", "B.L0.a2a1"]


def test_taskmap_is_the_contract_record():
    tm = TaskMap(task_of={"a": "t"}, nodes_of={"t": ["a"]})
    assert tm.task_of == {"a": "t"} and tm.nodes_of == {"t": ["a"]} and tm.deps == []


def test_our_schedulers_start_from_the_best_of_list_scheduling_and_the_baseline_orders():
    """On random cost tables the baselines sometimes beat plain list scheduling; ours is never worse than any."""
    from fsmoe_compiler.passes.solve import baseline_schedules, solve_taskgraph

    rng = random.Random(0)
    baseline_won = 0
    for i in range(60):
        phase = "forward" if i % 2 else "backward"
        gm = forward_ep_chunked(rng.choice([2, 3, 4])) if phase == "forward" else backward_ep()
        costs = {n.name: rng.choice([0.1, 1.0, 4.0]) * rng.random() for n in gm.graph.nodes}
        tg, tm = build_taskgraph(gm, cost_table(costs), phase)
        best_baseline = min(s.makespan for s in baseline_schedules(tg, tm).values())
        baseline_won += best_baseline < heuristic_schedule(tg).makespan - 1e-9
        for scheduler in ("heuristic", "cpsat"):
            s = validate_schedule(tg, solve_taskgraph(tg, tm, scheduler, 0.05))
            assert s.makespan <= min(best_baseline, heuristic_schedule(tg).makespan) + 1e-9, (i, scheduler)
    assert baseline_won > 0  # the guarantee above is not vacuous on these graphs

"""codegen="inductor": the scheduled graph compiled by Inductor with the schedule's order pinned.

Structure: ``passes.pin_order`` ties each collective and wait to the kernels
around it; on a hand-built chunked layer scheduled with an injected cost
table, Inductor's output code keeps every collective's issue position and
every wait's position against the matmuls only when pinned (FileCheck, and
``check_order`` which the backend runs on every compile). Numerics: a toy MoE
in a world of one, and the torchtitan-style dropless layer on 2 gloo ranks,
train equal to eager with both graphs running Inductor's code.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing import FileCheck

from fsmoe_compiler import inductor_codegen
from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.inductor_codegen import OrderLost, TraceState, check_order, emitted_order, planned_order
from fsmoe_compiler.ops import is_communication
from fsmoe_compiler.passes.annotate import annotate
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.pin_order import order_deps, own_kernel, pin_order
from fsmoe_compiler.passes.taskgraph import build_taskgraph
from fsmoe_compiler.scheduler import heuristic_schedule
from graph_builder import FWD_COSTS, cost_table, forward_ep_chunked
from graph_capture import fake_world


def _scheduled() -> fx.GraphModule:
    """The chunked layer in the order the list scheduler gives it on the injected costs: both dispatches
    issued before the router's matmul, each wait right before its expert's matmul."""
    gm = forward_ep_chunked()
    tg, tm = build_taskgraph(gm, cost_table(FWD_COSTS), "forward")
    ctx = PassContext(graph_kind="forward")
    ctx.schedule, ctx.taskmap = heuristic_schedule(tg), tm
    return annotate(gm, ctx)


def _on_world(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its collectives on the default group (Inductor resolves the group it compiles for)."""
    import torch.distributed as dist

    for n in gm.graph.nodes:
        if is_communication(n) and n.target != torch.ops._c10d_functional.wait_tensor.default:
            n.args = (*n.args[:-1], dist.group.WORLD.group_name)
    gm.recompile()
    return gm


def _trace_state(gm: fx.GraphModule) -> TraceState:
    mode = FakeTensorMode()
    inputs = [mode.from_tensor(torch.randn(n.meta["val"].shape)) for n in gm.graph.nodes if n.op == "placeholder"]
    return TraceState("forward", None, inputs)


def test_order_deps_tie_each_kernel_to_the_communication_around_it():
    gm = _scheduled()
    deps = order_deps(gm.graph)
    name = {n: n.name for n in gm.graph.nodes}
    got = {name[n]: [name[d] for d in ds] for n, ds in deps.items()}
    # both dispatches go out before the router matmul; the second is chained to the first
    assert got["a2a_d1"] == ["a2a_d0"]
    assert got["scores"] == ["a2a_d1"]
    # a wait comes after the kernels before it; the expert matmul after the wait
    assert got["wait_a2a_d0"] == ["a2a_d1", "scores"]
    assert got["exp_c0"] == ["wait_a2a_d0"]
    assert got["a2a_c0"] == ["wait_a2a_d0", "exp_c0"]
    # pointwise ops are never tied (they would have to be materialised)
    assert not {"probs", "act_c0", "disp_c0", "comb_c0", "cat"} & set(got)
    assert not any(own_kernel(n) for n in gm.graph.nodes if n.name in ("probs", "act_c0", "x_c0"))
    # every dependency points back in graph order: no cycle is possible
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert all(order[d] < order[n] for n, ds in deps.items() for d in ds)


def test_pin_order_wraps_the_tied_nodes_and_computes_the_same_graph():
    gm = _scheduled()
    before = [n.name for n in gm.graph.nodes]
    tied = [n.name for n in order_deps(gm.graph)]
    ctx = PassContext(graph_kind="forward")
    pinned = pin_order(gm, ctx)
    wrapped = [n.name for n in pinned.graph.nodes if getattr(n.target, "__name__", "") == "control_deps"]
    assert wrapped == tied and len(wrapped) == 10  # every tied node wrapped, its name and place kept
    assert [n.name for n in pinned.graph.nodes if not n.name.startswith("subgraph_")] == before
    assert ctx.notes and "control dependencies" in ctx.notes[0]


@pytest.mark.timeout(300)
def test_inductor_code_keeps_the_scheduled_order_only_when_pinned():
    with fake_world():
        _compile_and_check(_on_world(_scheduled()))


def _compile_and_check(gm: fx.GraphModule) -> None:
    state = _trace_state(gm)
    planned = planned_order(inductor_codegen.decompose(gm, state).graph)
    # start: nothing before the dispatches; a wait, then the expert matmul, then its combine goes out
    assert planned[:4] == [("start", 0), ("all_to_all_single", 0), ("all_to_all_single", 1), ("wait_tensor", 1)]
    built = inductor_codegen.compile_graph(gm, state, pin=True)  # raises OrderLost if the order moved
    assert built.pins > 0 and emitted_order(built.code) == planned
    code = built.code.split("def call(", 1)[1]
    FileCheck().check("all_to_all_single").check("all_to_all_single").check("extern_kernels.mm(").check(
        "wait_tensor").check("extern_kernels.mm(").check("all_to_all_single").check("wait_tensor").run(code)
    # left to order it itself, Inductor (torch 2.13) waits for the first dispatch right after issuing it,
    # before the second goes out: the check says where
    loose = inductor_codegen.compile_graph(gm, state, pin=False)
    assert loose.pins == 0 and emitted_order(loose.code) != planned
    with pytest.raises(OrderLost, match="the scheduled graph issues"):
        check_order(planned, loose.code)


def test_check_order_names_the_first_moved_matmul_or_collective():
    planned = [("start", 0), ("all_to_all_single", 1), ("wait_tensor", 1)]
    code = ("def call(args):\n  buf0 = torch.ops._c10d_functional.all_to_all_single.default(x)\n"
            "  torch.ops._c10d_functional.wait_tensor.default(buf0)\n  extern_kernels.mm(a, b, out=c)\n"
            "  extern_kernels.mm(d, e, out=f)\n")
    with pytest.raises(OrderLost, match=re.escape("2 matmul(s) run after communication op 2 (wait_tensor) in "
                                                  "Inductor's code, 1 in the scheduled graph")):
        check_order(planned, code)  # the matmul planned under the exchange now runs after its wait
    check_order([("start", 0), ("all_to_all_single", 0), ("wait_tensor", 2)], code)
    check_order([("start", 0), ("all_to_all_single", 1), ("wait_tensor", 3)], code)  # Inductor dissolved some
    with pytest.raises(OrderLost, match=re.escape("issues ['all_to_all_single', 'all_to_all_single', "
                                                  "'wait_tensor'], Inductor's code ['all_to_all_single', "
                                                  "'wait_tensor']")):
        check_order([("start", 0), ("all_to_all_single", 0), ("all_to_all_single", 0), ("wait_tensor", 2)], code)


def test_codegen_option_names_the_valid_choices():
    assert FSMoEConfig.from_options({"codegen": "inductor"}).codegen == "inductor"
    with pytest.raises(ValueError, match="'codegen' must be one of 'eager', 'inductor', got 'triton'"):
        FSMoEConfig.from_options({"codegen": "triton"})


def test_graph_without_communication_is_left_unpinned():
    gm = _scheduled()
    for n in list(gm.graph.nodes):
        if is_communication(n):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.recompile()
    assert order_deps(gm.graph) == {}
    ctx = PassContext(graph_kind="forward")
    assert pin_order(gm, ctx) is gm and not ctx.notes


# ------------------------------------------------------------------------------------------------ numerics


def _toy_job(rank: int, world_size: int, steps: int, cache_dir: str | None = None) -> dict:
    """The prepared GPU check's toy MoE (functional all-to-all in a world of ``world_size``) trained eagerly and
    with ``codegen="inductor"`` from the same weights; worst gradient gap per step, and what the report says."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import gpu_check

    import fsmoe_compiler

    torch.manual_seed(0)
    model = gpu_check.ToyMoE()
    torch.manual_seed(0)
    ref = gpu_check.ToyMoE()
    options = {**gpu_check.OPTIONS, "codegen": "inductor", "cache_dir": cache_dir}
    compiled = torch.compile(model, backend="fsmoe", options=options)
    gaps = []
    for step in range(steps):
        x = torch.randn(gpu_check.TOKENS, gpu_check.D_MODEL, generator=torch.Generator().manual_seed(rank + step))
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        loss, want = compiled(x), ref(x)
        loss.backward()
        want.backward()
        gap = {"loss": float((loss - want).abs())}
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if not torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5):
                gap[name] = float((p.grad - q.grad).abs().max())
        gaps.append(gap)
    rep = fsmoe_compiler.report(compiled)
    return {"gaps": gaps, "codegen": {g.kind: (g.codegen, g.codegen_s) for g in rep.graphs()},
            "measured": {s.codegen: len(s.measured_calls_ms) for s in rep.schedules()},
            "calibration": {g.kind: (g.schedule.calibration, g.schedule.calibration_from) for g in rep.graphs()},
            "rendered": rep.render(),
            "notes": [n for g in rep.graphs() for n in g.notes if n.startswith("codegen")]}


def _toy_twice(rank: int, world_size: int, steps: int, cache_dir: str) -> list[dict]:
    """Two runs of :func:`_toy_job` sharing a profile cache, Dynamo reset between them (a new job)."""
    first = _toy_job(rank, world_size, steps, cache_dir)
    torch._dynamo.reset()
    return [first, _toy_job(rank, world_size, steps, cache_dir)]


def _check_toy(res: dict, steps: int) -> None:
    for step, gap in enumerate(res["gaps"]):
        assert gap["loss"] <= 1e-5 and set(gap) == {"loss"}, f"step {step}: differs from eager: {gap}"
    assert set(res["codegen"]) == {"forward", "backward"}
    for kind, (codegen, seconds) in res["codegen"].items():
        assert codegen == "inductor" and seconds > 0, (kind, codegen, seconds, res["notes"])
    assert res["measured"] == {"inductor": steps - 4}  # the calls after warm-up, profiling and the timed call
    assert len(res["notes"]) == 2 and all("compiled by Inductor" in n and "control dependencies" in n
                                          for n in res["notes"]), res["notes"]


@pytest.mark.timeout(300)
def test_toy_moe_runs_inductor_code_and_trains_equal_to_eager_in_a_world_of_one():
    from fsmoe_compiler.launch import run_ranks

    (res,) = run_ranks(_toy_job, 1, (6,), timeout_s=280)
    _check_toy(res, 6)


@pytest.mark.timeout(300)
def test_inductor_code_is_calibrated_against_the_plain_graph_and_a_later_run_predicts_with_it(tmp_path):
    from fsmoe_compiler.launch import run_ranks

    ((first, second),) = run_ranks(_toy_twice, 1, (7, str(tmp_path)), timeout_s=280)  # 3 compiled calls
    for kind, (factor, source) in first["calibration"].items():  # learned from this run's scheduled calls
        assert source == "this run" and 0.05 < factor < 20, (kind, factor, source)
    assert "so" in first["rendered"] and "is predicted from now on" in first["rendered"]
    assert len(list(tmp_path.glob("calibration-*.json"))) == 2  # one per graph
    for kind, (factor, source) in second["calibration"].items():  # read back: the cache's factor, not relearned
        assert source == "cache" and factor == first["calibration"][kind][0], (kind, factor, source)
    assert "learned by an earlier run" in second["rendered"]
    _check_toy(second, 7)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_toy_moe_runs_inductor_code_and_trains_equal_to_eager_on_two_ranks(rank_pool):
    for res in rank_pool.run(_toy_job, (6,), timeout_s=280):
        _check_toy(res, 6)

"""Peak memory of an ATen graph in its node order (``fsmoe_compiler.memory``), and the report's line for it.

A small graph traced with fake tensors makes two large temporaries in a row;
run in traced order only one is alive at a time, and moved as a scheduler
moves an early-issued node (the second made before the first is consumed)
both are: the peak grows by exactly one temporary. Views share their base's
storage, the inputs stay alive, and the report prints the scheduled peak
against the traced one.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fsmoe_compiler.memory import memory_profile, peak_bytes
from fsmoe_compiler.records import ScheduleReport
from fsmoe_compiler.reporting.tables import schedule_summary

X = (4, 8)  # float32: 128 bytes
BIG = 10 * 4 * 8 * 4  # x.repeat(10, 1): 1280 bytes
SCALAR = 4


def _two_temporaries(x):
    y1 = x.repeat(10, 1)
    s1 = y1.sum()
    y2 = x.repeat(10, 1)
    s2 = y2.sum()
    return s1 + s2


def _graph():
    return make_fx(_two_temporaries, tracing_mode="fake")(torch.randn(*X))


def test_traced_order_holds_one_temporary_at_a_time():
    gm = _graph()
    assert peak_bytes(gm.graph) == 128 + BIG + 2 * SCALAR  # y2 and the two sums, after y1 went
    profile = memory_profile(gm.graph)
    assert profile[0] == 128 and profile[-1] == 128 + SCALAR  # the input and the result stay, the rest is freed


def test_moving_an_allocation_earlier_grows_the_peak_by_what_it_keeps_alive():
    gm = _graph()
    by_name = {n.name: n for n in gm.graph.nodes}
    by_name["sum_1"].prepend(by_name["repeat_1"])  # the second temporary made before the first is consumed
    gm.recompile()
    assert [n.name for n in gm.graph.nodes][1:4] == ["repeat", "repeat_1", "sum_1"]
    assert peak_bytes(gm.graph) == 128 + 2 * BIG + SCALAR


def test_a_view_shares_its_base_storage():
    def viewed(x):
        y = x.repeat(10, 1)
        return y.view(-1).sum() + y.t().sum()

    gm = make_fx(viewed, tracing_mode="fake")(torch.randn(*X))
    assert peak_bytes(gm.graph) == 128 + BIG + 2 * SCALAR  # the view and the transpose allocate nothing


def test_the_report_prints_the_scheduled_peak_against_the_traced_one():
    sched = ScheduleReport("cpsat", {0: 2}, {2: 1.0}, 1.0, [], peak_bytes=3 << 20, traced_peak_bytes=2 << 20)
    assert ("peak memory in graph order (tensors alive, inputs included): scheduled 3.0 MiB, as traced 2.0 MiB "
            "(+50.0 %)") in schedule_summary(sched)
    assert "peak memory" not in schedule_summary(ScheduleReport("cpsat", {}, {}, 1.0, []))


# ------------------------------------------------------------------------------------------------ the bound


def _reordered():
    gm = _graph()
    by_name = {n.name: n for n in gm.graph.nodes}
    by_name["sum_1"].prepend(by_name["repeat_1"])
    gm.recompile()
    return gm


def _bounded(bound: float, strict: bool = False):
    """``planner._within_memory`` on the reordered graph (peak 2692 B) against the traced one (1416 B), with a
    stand-in schedule pipeline that records the scheduler it was asked for."""
    from fsmoe_compiler.config import FSMoEConfig
    from fsmoe_compiler.planner import Pipelines, _within_memory
    from fsmoe_compiler.passes.context import PassContext

    asked = []

    def schedule(gm, ctx):
        asked.append(ctx.config.scheduler)
        return gm

    traced, unordered = _graph(), _graph()
    ctx = PassContext(graph_kind="backward", config=FSMoEConfig(), strict=strict)
    gm, out, peak = _within_memory(_reordered(), ctx, unordered, peak_bytes(traced.graph), bound,
                                   Pipelines(chunk=None, screen=None, schedule=schedule))
    assert peak == peak_bytes(gm.graph)  # the peak of the graph that runs
    return gm, out, unordered, asked


def test_a_schedule_within_the_bound_is_kept():
    gm, ctx, unordered, asked = _bounded(1.0)  # 2692 <= 2 x 1416
    assert gm is not unordered and asked == [] and ctx.config.scheduler == "cpsat" and ctx.notes == []


def test_a_schedule_over_the_bound_runs_its_chunks_in_traced_order_and_says_why():
    gm, ctx, unordered, asked = _bounded(0.5)
    assert gm is unordered and asked == ["sequential"] and ctx.config.scheduler == "sequential"
    assert ctx.notes == ["memory: the cpsat schedule keeps 2.6 KiB of tensors alive at once against 1.4 KiB as "
                         "traced (+90 %, over max_peak_growth=0.5): the chunks run in traced order instead"]


def test_strict_raises_naming_the_bound():
    import pytest

    from fsmoe_compiler.planner import PlanError

    with pytest.raises(PlanError, match=r"\(\+90 %, over max_peak_growth=0.5\); raise max_peak_growth \(or None\)"):
        _bounded(0.5, strict=True)


def test_the_option_is_validated():
    import pytest

    from fsmoe_compiler.config import FSMoEConfig

    assert FSMoEConfig.from_options({"max_peak_growth": None}).max_peak_growth is None
    for bad in (-0.1, "50%", True, float("inf")):
        with pytest.raises(ValueError, match=r"'max_peak_growth' must be a number >= 0 .* or None \(no bound\), got"):
            FSMoEConfig.from_options({"max_peak_growth": bad})

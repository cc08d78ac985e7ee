"""The whole-or-split choice (``split_choice.SplitOrWhole``) and how it times its variants (``call_timer.CallTimer``).

``CallTimer`` times a call's forward and PyTorch's backward of it through
autograd hooks: a traced function whose forward and backward sleep for known
times shows the recorded span covers both, once per call and only once its
backward ran, that another graph's backward over the same parameters adds
nothing, that calls made before ``ready()`` are not timed, and that no hook is
left behind. ``SplitOrWhole`` on made-up timings (a fake clock the variants
advance): variants run in turn, ``BLOCK`` calls each, until each has its timed
calls; the fastest is kept unless an earlier one (as traced, whole, fewer
ranges) is within the margin; a compiled graph that fell back is never
preferred; the losers' records are dropped and their graphs let go; when the
graph as traced wins, the record it shares with the whole graph says the
compiled graphs do not run.
"""

from __future__ import annotations

import time
from unittest import mock

import pytest
import torch
import torch.fx as fx

from fsmoe_compiler import call_timer, records, split_choice
from fsmoe_compiler.call_timer import CallTimer

FORWARD_S, BACKWARD_S = 0.02, 0.05


class _Sleep(torch.autograd.Function):
    """Identity that sleeps ``FORWARD_S`` in forward and ``BACKWARD_S`` in backward."""

    @staticmethod
    def forward(ctx, x):
        time.sleep(FORWARD_S)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(BACKWARD_S)
        return grad


def slow(x):
    return _Sleep.apply(x)


fx.wrap("slow")


class _Net(torch.nn.Module):
    def forward(self, x, w):
        return (slow(x @ w).relu(),)


def _inputs():
    torch.manual_seed(0)
    return torch.randn(4, 8), torch.randn(8, 3, requires_grad=True)


# ------------------------------------------------------------------------------------------------ CallTimer


def test_call_timer_equals_the_graph_and_times_forward_plus_backward_once_per_call():
    gm = fx.symbolic_trace(_Net())
    timed = CallTimer(gm)
    x, w = _inputs()
    (out,) = timed(x, w)
    assert timed.calls_ms == []  # not before its backward
    out.sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    (ref,) = gm(x, ref_w)
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(w.grad, ref_w.grad)
    (ms,) = timed.calls_ms
    assert (FORWARD_S + BACKWARD_S) * 1e3 <= ms < (FORWARD_S + BACKWARD_S) * 1e3 + 40, timed.calls_ms
    (w * 2).sum().backward()  # another graph's backward over the same parameter: the stale hook stays quiet
    assert len(timed.calls_ms) == 1
    for _ in range(3):
        timed(x, w)[0].sum().backward()
    assert len(timed.calls_ms) == 4
    timed.release()
    assert w._backward_hooks is None  # no hook, and no empty hook table, left on the parameter


def test_call_timer_release_keeps_the_users_own_parameter_hooks():
    timed = CallTimer(fx.symbolic_trace(_Net()))
    x, w = _inputs()
    seen = []
    w.register_hook(lambda g: seen.append(g.shape))
    timed(x, w)[0].sum().backward()
    timed.release()
    assert len(w._backward_hooks) == 1 and len(timed.calls_ms) == 1
    (w * 2).sum().backward()
    assert seen == [w.shape, w.shape]  # the user's hook still fires after ours are gone


def test_call_timer_times_the_forward_alone_without_a_backward_and_nothing_before_ready():
    ready = [False]
    timed = CallTimer(fx.symbolic_trace(_Net()), ready=lambda: ready[0])
    x, w = _inputs()
    timed(x, w)[0].sum().backward()
    assert timed.calls_ms == [] and not w._backward_hooks  # not ready: not timed, no hook set
    ready[0] = True
    with torch.no_grad():
        timed(x, w)
    (ms,) = timed.calls_ms
    assert FORWARD_S * 1e3 <= ms < (FORWARD_S + BACKWARD_S) * 1e3


# ------------------------------------------------------------------------------------------------ SplitOrWhole


class _Clock:
    """A fake ``call_timer`` clock: the variants advance it by their call's milliseconds."""

    def __init__(self) -> None:
        self.s = 0.0

    def __call__(self) -> float:
        return self.s


@pytest.fixture
def clock():
    c = _Clock()
    with mock.patch.object(call_timer, "_now", c):
        yield c


def _variant(name: str, call_ms: float, log: list[str], clock: _Clock, fallback: bool = False, planned: bool = True):
    """A compiled variant: its record (forward and backward graphs, planned or fallen back) and a callable that
    logs its name and takes ``call_ms`` on ``clock`` (no backward through its result: the forward is its time)."""
    rec = records.new_record(None, [])
    for kind in ("forward", "backward"):
        sched = records.ScheduleReport("cpsat", {}, {}, 0.0, []) if planned and not fallback else None
        rec.graphs.append(records.GraphReport(kind, [], [], "boom" if fallback else None, 0, schedule=sched))

    def fn(*args):
        log.append(name)
        clock.s += call_ms / 1e3
        return name

    return split_choice.Variant(name, fn, rec)


@pytest.mark.parametrize("whole_ms, split_ms, want", [(10.0, 4.0, "2 ranges"), (4.0, 10.0, "whole")])
def test_split_or_whole_runs_whole_and_split_in_turn_until_both_are_timed_then_keeps_the_faster(
        clock, whole_ms, split_ms, want):
    log: list[str] = []
    whole, split = _variant("whole", whole_ms, log, clock), _variant("2 ranges", split_ms, log, clock)
    before = split_choice.unsettled()
    choice = split_choice.SplitOrWhole([whole, split], key=f"test-{whole_ms}", voting=False)
    assert split_choice.unsettled() == before + 1
    n, block = split_choice.MEASURED_CALLS, split_choice.BLOCK
    results = [choice(i) for i in range(2 * n + 2)]
    assert log[:2 * n] == (["whole"] * block + ["2 ranges"] * block) * (n // block), log  # in turn, BLOCK calls each
    assert results[2 * n:] == [want] * 2 and choice.chosen == want, (log, results)
    assert choice.runs == {"whole": n, "2 ranges": n}
    assert split_choice.unsettled() == before
    winner, loser = (split, whole) if want == "2 ranges" else (whole, split)
    assert winner.record in records._RECORDS and loser.record not in records._RECORDS
    assert [v.name for v in choice.variants] == [want]  # the loser's graphs are let go
    other = "whole" if want == "2 ranges" else "2 ranges"
    assert winner.record.token_split == [
        f"token split: {want} chosen, forward + backward measured {min(whole_ms, split_ms):.1f} ms (slowest rank, "
        f"faster half of calls) against {other} {max(whole_ms, split_ms):.1f} ms"]
    records.drop(winner.record)


def test_split_or_whole_measures_every_range_count_and_keeps_the_fastest(clock):
    """Three variants run in turn until each is timed, and the fastest (here the middle one) is kept."""
    log: list[str] = []
    made = [_variant(name, ms, log, clock) for name, ms in (("whole", 9.0), ("2 ranges", 5.0), ("4 ranges", 7.0))]
    choice = split_choice.SplitOrWhole(made, key="test-three", voting=False)
    n, block = split_choice.MEASURED_CALLS, split_choice.BLOCK
    results = [choice() for _ in range(3 * n + 3)]
    assert log[:3 * n] == [name for name in ("whole", "2 ranges", "4 ranges") for _ in range(block)] * (n // block), log
    assert choice.chosen == "2 ranges" and results[3 * n:] == ["2 ranges"] * 3
    assert [v.record in records._RECORDS for v in made] == [False, True, False]
    records.drop(made[1].record)


@pytest.mark.parametrize("split_ms, want", [(9.8, "whole"), (9.6, "2 ranges")])
def test_split_or_whole_keeps_the_whole_graph_unless_a_split_wins_by_more_than_the_margin(clock, split_ms, want):
    """Within MARGIN (3 %) of the fastest, the whole graph (then fewer ranges) is kept: noise must not pick a split."""
    log: list[str] = []
    made = [_variant(name, ms, log, clock) for name, ms in (("whole", 10.0), ("2 ranges", split_ms), ("4 ranges", 9.9))]
    choice = split_choice.SplitOrWhole(made, key=f"test-margin-{split_ms}", voting=False)
    for _ in range(3 * split_choice.MEASURED_CALLS + 1):
        choice()
    assert choice.chosen == want
    for v in made:
        records.drop(v.record)


def test_split_or_whole_times_a_compiled_graph_only_once_it_is_planned(clock):
    """Calls before a compiled graph's schedules are in (warm-up, profiling) are slower and not what it will run:
    they are not counted."""
    log: list[str] = []
    whole = _variant("whole", 1.0, log, clock, planned=False)
    split = _variant("2 ranges", 5.0, log, clock)
    choice = split_choice.SplitOrWhole([whole, split], key="test-planned", voting=False)
    for _ in range(8):
        choice()
    assert choice.chosen is None and whole.run.calls_ms == []
    for g in whole.record.graphs:
        g.schedule = records.ScheduleReport("cpsat", {}, {}, 0.0, [])
    for _ in range(8):
        choice()
    assert choice.chosen == "whole"
    records.drop(whole.record)


def test_fast_half_ms_leaves_out_the_slow_calls():
    assert split_choice.fast_half_ms([30.0, 10.0, 12.0, 50.0]) == 11.0  # the first call after a switch and a noisy one
    assert split_choice.fast_half_ms([7.0]) == 7.0
    assert split_choice.fast_half_ms([9.0, 5.0, 6.0]) == 5.0


def test_split_or_whole_wants_the_whole_graph_first(clock):
    split = _variant("2 ranges", 1.0, [], clock)
    with pytest.raises(ValueError, match=r"whole graph first \(after 'as traced', if given\), got \['2 ranges'\]"):
        split_choice.SplitOrWhole([split], key="test-order", voting=False)
    records.drop(split.record)


def test_split_or_whole_never_prefers_a_variant_that_fell_back(clock):
    """A compiled graph that fell back runs as traced: it counts as infinitely slow and is not run in turn."""
    log: list[str] = []
    whole = _variant("whole", 1.0, log, clock, fallback=True)
    split = _variant("2 ranges", 50.0, log, clock)
    choice = split_choice.SplitOrWhole([whole, split], key="test-fallback", voting=False)
    n = split_choice.MEASURED_CALLS
    assert [choice() for _ in range(n + 1)] == ["2 ranges"] * (n + 1)
    assert choice.chosen == "2 ranges" and choice.runs == {"2 ranges": split_choice.MEASURED_CALLS}
    records.drop(split.record)
    records.drop(whole.record)


@pytest.mark.parametrize("compiled_ms, want", [(1000.0, "as traced"), (1.0, "2 ranges")])
def test_split_or_whole_keeps_the_graph_as_traced_unless_a_compiled_one_wins(compiled_ms, want):
    """Dynamo's graph run as traced (about 70 ms here, forward and PyTorch's backward, on the real clock) runs in
    turn with the compiled ones; it is kept when they are slower, and then the record it shares with the whole graph
    says the compiled graphs run as traced."""
    log: list[str] = []
    real = _Clock()  # the compiled stand-ins advance it; the real clock runs under it for the graph as traced
    whole = _variant("whole", compiled_ms, log, real)
    split = _variant("2 ranges", compiled_ms / 2, log, real)
    gm = fx.symbolic_trace(_Net())
    traced = split_choice.Variant(split_choice.AS_TRACED, gm, whole.record)
    choice = split_choice.SplitOrWhole([traced, whole, split], key=f"test-as-traced-{compiled_ms}", voting=False)
    x, w = _inputs()
    n, block = split_choice.MEASURED_CALLS, split_choice.BLOCK
    with mock.patch.object(call_timer, "_now", lambda: time.perf_counter() + real.s):
        for _ in range(3 * n + 2):
            out = choice(x, w)
            if not isinstance(out, str):
                out[0].sum().backward()
    assert choice.chosen == want, (log, traced.run.calls_ms)
    assert choice.runs == {"as traced": n, "whole": n, "2 ranges": n}
    assert len(traced.run.calls_ms) == n  # one timing per as-traced call
    assert w._backward_hooks is None
    assert [v.name for v in choice.variants] == [want]  # the losers are let go
    if want == "as traced":
        assert choice._run is gm
        assert whole.record in records._RECORDS and split.record not in records._RECORDS
        assert all(g.fallback.startswith("runs as traced: Dynamo's graph, run by PyTorch, was the fastest")
                   for g in whole.record.graphs)
        assert whole.record.split_choice[0].startswith("token split: as traced chosen")
        records.drop(whole.record)
    else:
        assert whole.record not in records._RECORDS and split.record in records._RECORDS
        assert "as traced" in split.record.split_choice[0]
        records.drop(split.record)

"""TaskGraph and Schedule records: malformed input fails loudly, validate_schedule catches every kind of bad schedule."""

import math

import pytest

from fsmoe_compiler.scheduler import (RESOURCES, Schedule, ScheduleError, Task, TaskGraph, fixed_order_schedule,
                                      list_schedule, validate_schedule)


def small_graph() -> TaskGraph:
    g = TaskGraph(name="small")
    g.add("a", "a2a", "inter", 2.0)
    g.add("b", "expert", "compute", 3.0)
    g.add("c", "a2a", "inter", 1.0)
    g.add("d", "expert", "compute", 1.5)
    g.add_dep("a", "b")
    g.add_dep("b", "c")
    g.add_dep("a", "d")
    return g


@pytest.mark.parametrize("res", ["gpu", "Compute", ""])
def test_unknown_resource_names_valid_choices(res):
    with pytest.raises(ValueError) as e:
        Task("x", "expert", res, 1.0)
    msg = str(e.value)
    assert repr(res) in msg and all(r in msg for r in RESOURCES)


@pytest.mark.parametrize("dur", [-1.0, float("nan"), float("inf"), -1e-9])
def test_bad_duration_is_rejected(dur):
    with pytest.raises(ValueError, match="duration"):
        Task("x", "expert", "compute", dur)


def test_bad_phase_is_rejected():
    with pytest.raises(ValueError, match="forward"):
        Task("x", "expert", "compute", 1.0, phase="sideways")


def test_duplicate_id_is_rejected():
    g = small_graph()
    with pytest.raises(ValueError, match="duplicate task id 'a'"):
        g.add("a", "expert", "compute", 1.0)


def test_dependency_on_unknown_task_names_it():
    g = small_graph()
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        g.add_dep("a", "zz")
    with pytest.raises(ValueError, match="unknown task 'yy'"):
        g.add_dep("yy", "a")


def test_cycle_is_reported_with_its_tasks():
    g = small_graph()
    g.add_dep("c", "a")  # a -> b -> c -> a
    with pytest.raises(ValueError, match="cycle") as e:
        g.validate()
    assert all(t in str(e.value) for t in "abc")
    with pytest.raises(ValueError, match="cycle"):
        list_schedule(g)
    with pytest.raises(ValueError, match="depends on itself"):
        g.add_dep("a", "a")


def test_graph_queries_and_networkx_view():
    g = small_graph()
    assert len(g) == 4 and "a" in g and g["b"].duration == 3.0
    assert sorted(g.succs("a")) == ["b", "d"] and g.preds("c") == ["b"]
    assert g.total("inter") == 3.0 and g.total("compute") == 4.5 and g.total("intra") == 0.0
    assert g.g.number_of_edges() == 3 and set(g.g.nodes()) == {"a", "b", "c", "d"}
    g.add_dep("a", "b")  # duplicate edge is a no-op
    assert len(g.deps) == 3


def test_validate_schedule_accepts_a_valid_schedule():
    g = small_graph()
    s = list_schedule(g)
    validate_schedule(g, s)
    # a: [0,2) inter; b: [2,5) compute; d: [2,3.5)?? d and b share compute -> one waits
    assert s.makespan == pytest.approx(max(s.end.values()))
    assert s.start["b"] >= s.end["a"] and s.start["c"] >= s.end["b"]


def _sched(g, start):
    return Schedule.from_times(g, start)


def test_validate_schedule_rejects_dependency_violation():
    g = small_graph()
    s = _sched(g, {"a": 0.0, "b": 1.0, "c": 5.0, "d": 5.0})  # b starts before a ends
    with pytest.raises(ScheduleError, match="'a' -> 'b' violated"):
        validate_schedule(g, s)


def test_validate_schedule_rejects_overlap_on_a_resource():
    g = small_graph()
    s = _sched(g, {"a": 0.0, "b": 2.0, "c": 5.0, "d": 3.0})  # b [2,5) and d [3,4.5) on compute
    with pytest.raises(ScheduleError, match="overlap on resource 'compute'"):
        validate_schedule(g, s)


def test_validate_schedule_rejects_missing_extra_wrong_makespan_and_duration():
    g = small_graph()
    good = _sched(g, {"a": 0.0, "b": 2.0, "c": 5.0, "d": 5.0})
    validate_schedule(g, good)
    missing = _sched(g, {"a": 0.0, "b": 2.0, "c": 5.0})
    with pytest.raises(ScheduleError, match="not scheduled"):
        validate_schedule(g, missing)
    bad = Schedule(start=dict(good.start), end=dict(good.end), order=good.order, makespan=99.0)
    with pytest.raises(ScheduleError, match="makespan"):
        validate_schedule(g, bad)
    end = dict(good.end)
    end["b"] = 4.0
    with pytest.raises(ScheduleError, match="duration"):
        validate_schedule(g, Schedule(start=good.start, end=end, order=good.order, makespan=good.makespan))
    order = {r: list(v) for r, v in good.order.items()}
    order["compute"].append("b")
    with pytest.raises(ScheduleError, match="more than once"):
        validate_schedule(g, Schedule(start=good.start, end=good.end, order=order, makespan=good.makespan))
    extra = dict(good.start, zz=0.0)
    with pytest.raises(ScheduleError, match="unknown task"):
        validate_schedule(g, Schedule(start=extra, end=dict(good.end, zz=0.0), order=good.order,
                                      makespan=good.makespan))


def test_fixed_order_runs_fifo_and_detects_deadlock():
    g = small_graph()
    s = fixed_order_schedule(g, {"inter": ["a", "c"], "compute": ["d", "b"]})
    validate_schedule(g, s)
    # d runs first on compute [2, 3.5), then b [3.5, 6.5), then c [6.5, 7.5)
    assert s.start["b"] == pytest.approx(3.5) and s.makespan == pytest.approx(7.5)
    with pytest.raises(ValueError, match="deadlock"):
        fixed_order_schedule(g, {"inter": ["c", "a"], "compute": ["b", "d"]})
    with pytest.raises(ValueError, match="exactly once"):
        fixed_order_schedule(g, {"inter": ["a"], "compute": ["b", "d"]})


def test_zero_duration_tasks_are_fine():
    g = TaskGraph()
    g.add("x", "loss", "compute", 0.0)
    g.add("y", "expert", "compute", 1.0)
    g.add_dep("x", "y")
    s = list_schedule(g)
    validate_schedule(g, s)
    assert s.makespan == 1.0 and not math.isnan(s.start["x"])

"""Chrome trace export: valid JSON, one track per resource, bars as long as the tasks."""

import json

from fsmoe_compiler.reporting.trace import schedule_to_chrome_trace
from fsmoe_compiler.scheduler.schedule import Schedule, validate_schedule
from fsmoe_compiler.scheduler.taskgraph import RESOURCES, TaskGraph


def _tiny():
    g = TaskGraph(name="tiny")
    g.add("a2a0", "a2a", "inter", 1.5, chunk=0, role="dispatch")
    g.add("ag0", "allgather", "intra", 0.5, chunk=0)
    g.add("exp0", "expert", "compute", 2.0, chunk=0)
    g.add("a2a1", "a2a", "inter", 1.5, chunk=1, role="dispatch")
    g.add_dep("a2a0", "ag0")
    g.add_dep("ag0", "exp0")
    s = Schedule.from_times(g, {"a2a0": 0.0, "ag0": 1.5, "exp0": 2.0, "a2a1": 1.5}, method="t")
    validate_schedule(g, s)
    return g, s


def test_trace_is_valid_json_with_a_track_per_resource(tmp_path):
    g, s = _tiny()
    path = tmp_path / "t.json"
    schedule_to_chrome_trace({"ours": s, "sequential": s}, path, graph=g, metadata={"config": "x"})
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    assert trace["metadata"]["config"] == "x" and trace["metadata"]["makespan_ms"]["ours"] == s.makespan
    procs = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(procs.values()) == ["ours", "sequential"]
    for pid in procs:
        tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == pid}
        assert sorted(tracks.values()) == sorted(RESOURCES)
        assert len(set(tracks)) == len(RESOURCES)  # one tid per resource
        bars = [e for e in events if e["ph"] == "X" and e["pid"] == pid]
        assert len(bars) == len(g)
        for e in bars:
            task = g[e["name"]]
            assert tracks[e["tid"]] == task.resource
            assert e["dur"] == task.duration * 1e3  # microseconds
            assert e["ts"] == s.start[task.id] * 1e3
            assert e["args"]["kind"] == task.kind


def test_trace_of_one_schedule_without_graph_returns_the_object():
    _, s = _tiny()
    trace = schedule_to_chrome_trace(s, name="only")
    assert trace["displayTimeUnit"] == "ms"
    bars = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in bars} == set(s.start)
    json.dumps(trace)

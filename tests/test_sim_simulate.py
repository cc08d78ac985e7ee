"""The simulator on a slice of FSMoE's grid, and the ``simulate`` subcommand end to end."""

import json

import pytest

from fsmoe_compiler.scheduler.schedule import validate_schedule
from fsmoe_compiler.sim.cli import main
from fsmoe_compiler.sim.grid import fsmoe_grid, parse_config
from fsmoe_compiler.sim.methods import BASELINES, LOWER_BOUND, OURS, REPORTED_METHODS
from fsmoe_compiler.sim.presets import get_preset
from fsmoe_compiler.sim.simulate import simulate_grid, simulate_point
from fsmoe_compiler.sim.summary import summarize

#: 8 points spread over every axis of the grid (gpus, ffn, B, L, M, H/M, f all vary).
SLICE = fsmoe_grid()[::187]


@pytest.mark.parametrize("preset", ["fsmoe-testbed", "h100-ib400"])
def test_a_grid_slice_gives_valid_schedules_and_ours_never_loses_to_sequential(preset):
    for spec in SLICE:
        res, plans = simulate_point(spec, get_preset(preset, spec.gpus), validate=True, keep_schedules=True)
        assert set(res.makespan_ms) == set(REPORTED_METHODS)
        for name, plan in plans.items():
            if name != LOWER_BOUND:
                validate_schedule(plan.graph, plan.schedule)
        ms = res.makespan_ms
        assert ms[OURS] <= ms["sequential"] * (1 + 1e-9)
        assert ms[LOWER_BOUND] <= min(ms[m] for m in REPORTED_METHODS if m != LOWER_BOUND) * (1 + 1e-9)


def test_stacks_of_layers_simulate_and_validate():
    spec = parse_config("B=4,L=512,M=2048,H=8192,f=2.4,gpus=32,ffn=gpt")
    res, plans = simulate_point(spec, get_preset("fsmoe-testbed", 32), layers=3, validate=True, keep_schedules=True)
    assert len(res.detail["r_fwd"]) == 3
    assert res.makespan_ms[OURS] <= res.makespan_ms["sequential"]
    # dense gradients of each layer are all-reduced over the inter-node link
    assert any(t.kind == "all_reduce" for t in plans[OURS].graph)


def test_summary_over_a_slice_and_parallel_workers_agree():
    one = simulate_grid(SLICE[:6], "fsmoe-testbed", workers=1)
    two = simulate_grid(SLICE[:6], "fsmoe-testbed", workers=2)
    assert [r.makespan_ms for r in one] == [r.makespan_ms for r in two]
    s = summarize(one)
    assert s.n == 6 and set(s.speedup) == set(BASELINES)
    assert s.speedup["sequential"].geomean >= 1.0
    assert s.speedup["sequential"].min <= s.speedup["sequential"].geomean <= s.speedup["sequential"].max
    assert s.gap_median >= -1e-9 and 0.0 <= s.optimal_fraction <= 1.0


def test_cli_grid_json_has_the_documented_keys(tmp_path, capsys):
    out = tmp_path / "grid.json"
    assert main(["--grid", "fsmoe", "--limit", "4", "--preset", "fsmoe-testbed", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "geomean" in printed and "fsmoe-testbed" in printed
    data = json.loads(out.read_text())
    assert {"grid", "layers", "points", "wall_s", "presets"} <= set(data)
    assert data["points"] == 4
    rec = data["presets"]["fsmoe-testbed"]
    assert {"preset", "n", "speedup", "best_possible_speedup", "gap_to_lower_bound", "solver_ms_per_point",
            "optimal_fraction", "wins", "wall_s"} <= set(rec)
    assert set(rec["speedup"]) == set(BASELINES)
    assert set(rec["speedup"]["tutel"]) == {"geomean", "min", "max"}
    assert set(rec["gap_to_lower_bound"]) == {"median", "max"}
    assert set(rec["solver_ms_per_point"]) == {"mean", "median", "max"}


def test_cli_config_prints_makespans_and_writes_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    cfg = "B=4,L=512,M=2048,H=8192,f=2.4,gpus=32,ffn=gpt"
    assert main(["--config", cfg, "--layers", "2", "--trace", str(trace)]) == 0
    printed = capsys.readouterr().out
    for m in REPORTED_METHODS:
        assert m in printed
    events = json.loads(trace.read_text())["traceEvents"]
    procs = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {OURS, *BASELINES} <= procs
    # bars last as long as their tasks: check ours against a fresh plan of the same stack
    _, plans = simulate_point(parse_config(cfg), get_preset("fsmoe-testbed", 32), layers=2, keep_schedules=True)
    pid = next(e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name" and e["args"]["name"] == OURS)
    graph = plans[OURS].graph
    bars = [e for e in events if e["ph"] == "X" and e["pid"] == pid]
    assert len(bars) == len(graph)
    for e in bars:
        assert e["dur"] == pytest.approx(graph[e["name"]].duration * 1e3, rel=1e-9, abs=1e-9)


def test_cli_errors_name_the_bad_value_and_the_choices(capsys):
    assert main(["--grid", "fsmoe", "--preset", "tpu-pod"]) == 2
    err = capsys.readouterr().err
    assert "tpu-pod" in err and "fsmoe-testbed" in err and "h100-ib400" in err and "local" in err
    assert main(["--config", "B=4,L=512,M=2048,f=2.4,ffn=relu"]) == 2
    err = capsys.readouterr().err
    assert "relu" in err and "gpt" in err and "swiglu" in err
    assert main(["--config", "B=4,L=512,M=2048"]) == 2
    assert "missing f" in capsys.readouterr().err
    assert main(["--grid", "huge"]) == 2
    assert "huge" in capsys.readouterr().err
    assert main(["--config", "B=4,L=512,M=2048,f=2.4", "--preset", "fsmoe-testbed", "--layers", "0"]) == 2
    assert main(["--config", "B=4,L=512,M=2048,f=2.4,gpus=24"]) == 2  # testbed measured at 16/32/48 only
    assert "gpus=24" in capsys.readouterr().err


def test_cli_show_costs_prints_the_preset_constants(capsys):
    assert main(["--config", "B=2,L=256,M=1024,f=1.2,gpus=48", "--show-costs"]) == 0
    out = capsys.readouterr().out
    assert "2.32e-06" in out and "4.951e-06" in out  # testbed A2A / all-reduce beta at 48 GPUs


def test_points_that_are_the_same_problem_are_solved_once():
    # under 'local' the cost models do not depend on the GPU count: 16/32/48 GPUs are one problem
    from fsmoe_compiler.sim.presets import fit_local, LocalSamples, LOCAL_COLLECTIVES

    samples = LocalSamples(coll={k: [(1e4, 0.2), (1e6, 2.0)] for k in LOCAL_COLLECTIVES}, gemm=[(1e6, 0.01), (1e8, 1.0)])
    specs = [parse_config(f"B=2,L=256,M=1024,f=1.2,gpus={g}") for g in (16, 32, 48)]
    res = simulate_grid(specs, lambda g: fit_local(samples, g))
    assert [r.config["gpus"] for r in res] == [16, 32, 48]
    assert res[0].makespan_ms == res[1].makespan_ms == res[2].makespan_ms
    assert "same_problem_as" not in res[0].detail and res[2].detail["same_problem_as"]["gpus"] == 16
    # under the testbed they differ (A2A / all-reduce beta depend on the GPU count)
    res = simulate_grid(specs, "fsmoe-testbed")
    assert all("same_problem_as" not in r.detail for r in res)
    assert len({r.makespan_ms["sequential"] for r in res}) == 3

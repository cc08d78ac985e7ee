"""The fsmoe command line: explain and demo, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fsmoe_compiler.cli import main


def test_explain_prints_forward_and_backward_region_tables(capsys):
    assert main(["explain", "--model", "mixtral"]) == 0
    out = capsys.readouterr().out
    assert "== forward graph:" in out and "== backward graph:" in out
    assert "2 MoE region(s)" in out  # the tiny Mixtral-style decoder has two MoE layers
    for header in ("router", "experts", "top-k", "capacity", "tokens", "hidden", "ffn", "a2a bytes"):
        assert header in out
    assert "softmax-topk" in out


def test_explain_rejects_an_unknown_model_with_the_valid_names(capsys):
    assert main(["explain", "--model", "llama"]) == 2
    assert "fsmoe explain: error: unknown example model 'llama'; valid models: gpt2, mixtral" in capsys.readouterr().err


def test_explain_rejects_an_unknown_router_with_the_valid_names(capsys):
    assert main(["explain", "--router", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown router 'bogus'" in err and "gshard" in err and "expert_choice" in err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_trains_on_two_ranks_reaches_the_schedule_and_matches_eager():
    """The default run is long enough to profile, swap the scheduled graphs in, run them and print the schedule."""
    from fsmoe_compiler.demo import default_steps

    res = subprocess.run(
        [sys.executable, "-m", "fsmoe_compiler.cli", "demo"],
        capture_output=True, text=True, timeout=540,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "fsmoe matches eager step by step" in res.stdout
    assert "fallback" not in res.stdout, res.stdout[-3000:]
    assert "== forward graph:" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 4]
    assert len(rows) == default_steps() and all(abs(float(e) - float(f)) <= 1e-4 * abs(float(e)) for _, e, f, _ in rows)
    assert res.stdout.count("scheduler cpsat") == 2, res.stdout[-3000:]  # the forward's and the backward's schedule
    assert "measured" in res.stdout and "pred start" in res.stdout


def test_simulate_is_wired_into_the_fsmoe_command(tmp_path, capsys):
    trace = tmp_path / "t.json"
    code = main(["simulate", "--config", "B=2,L=256,M=1024,H=4096,f=1.2,gpus=16,ffn=gpt", "--layers", "2",
                 "--preset", "fsmoe-testbed", "--trace", str(trace)])
    assert code == 0
    out = capsys.readouterr().out
    for method in ("ours", "sequential", "tutel", "fsmoe_paper", "lower_bound"):
        assert method in out
    assert trace.stat().st_size > 0


def test_fsmoe_without_a_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("demo", "explain", "simulate"):
        assert command in out

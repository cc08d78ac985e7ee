"""The fsmoe backend: entry point, options, pass-through, fallback and strict mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn

import fsmoe_compiler
from fsmoe_compiler import backend as backend_mod
from fsmoe_compiler.backend import FSMoECompileError, fsmoe_backend
from fsmoe_compiler.config import FSMoEConfig


class DenseBlock(nn.Module):
    """A transformer-ish block with no MoE: attention-free MLP with a residual and a top-k elsewhere."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles anew: Dynamo would otherwise reuse an earlier test's code for the same forward."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "fsmoe"]
    assert len(eps) == 1
    assert eps[0].value == "fsmoe_compiler.backend:fsmoe_backend"
    assert eps[0].load() is fsmoe_backend


def test_backend_string_works_without_importing_the_package():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Linear(4, 4)
        out = torch.compile(m, backend="fsmoe")(torch.randn(3, 4))
        out.sum().backward()
        assert m.weight.grad is not None
        assert "fsmoe_compiler.backend" in sys.modules  # loaded through the entry point
        print("ok")
        """
    )
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_unknown_option_names_the_key_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown fsmoe option 'pipeline_degre'.*valid options are: strict, check_ranks, dump_dir, scheduler, pipeline_degree, max_degree, profile_steps, measure_steps, cache_dir, time_limit_s"):
        FSMoEConfig.from_options({"pipeline_degre": 2})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"strict": "yes"}, r"'strict' must be True or False, got 'yes'"),
        ({"check_ranks": 1}, r"'check_ranks' must be True or False, got 1"),
        ({"dump_dir": 3}, r"'dump_dir' must be a directory path"),
        (["strict"], r"options must be a dict or FSMoEConfig, got list"),
        ({"scheduler": "greedy"}, r"'scheduler' must be one of 'cpsat', 'heuristic', 'tutel', 'sequential', 'none', got 'greedy'"),
        ({"pipeline_degree": 0}, r"'pipeline_degree' must be an int >= 1 or 'auto', got 0"),
        ({"pipeline_degree": "max"}, r"'pipeline_degree' must be an int >= 1 or 'auto', got 'max'"),
        ({"max_degree": 2.0}, r"'max_degree' must be an int >= 1, got 2.0"),
        ({"profile_steps": 0}, r"'profile_steps' must be an int >= 1, got 0"),
        ({"cache_dir": 5}, r"'cache_dir' must be a directory path"),
        ({"time_limit_s": -1}, r"'time_limit_s' must be a number of seconds > 0, got -1"),
    ],
)
def test_bad_option_values_are_rejected_clearly(options, match):
    with pytest.raises(ValueError, match=match):
        FSMoEConfig.from_options(options)


@pytest.mark.parametrize("name", ["cache_dir", "dump_dir"])
def test_a_directory_option_naming_a_file_is_rejected_when_the_options_are_validated(tmp_path, name):
    """Not a crash at the first cache write or dump, several steps in: at ``from_options``, naming the file."""
    file = tmp_path / "not-a-dir"
    file.write_text("x")
    with pytest.raises(ValueError, match=rf"'{name}' must name a directory \(made if missing\), but '{file}' is a file"):
        FSMoEConfig.from_options({name: str(file)})
    assert getattr(FSMoEConfig.from_options({name: str(tmp_path / "new")}), name) == str(tmp_path / "new")


def test_degrees_to_try_follow_the_options():
    assert FSMoEConfig().degrees() == [1, 2, 4]
    assert FSMoEConfig(max_degree=8).degrees() == [1, 2, 4, 8]
    assert FSMoEConfig(pipeline_degree=3).degrees() == [3]
    assert FSMoEConfig(scheduler="sequential", pipeline_degree=4).degrees() == [1]


def test_bad_options_surface_through_torch_compile():
    model = DenseBlock()
    compiled = torch.compile(model, backend="fsmoe", options={"strickt": True})
    with pytest.raises(Exception, match="unknown fsmoe option 'strickt'"):
        compiled(torch.randn(2, 16))


def test_a_model_without_moe_passes_through_with_zero_regions():
    torch.manual_seed(0)
    model = DenseBlock()
    x = torch.randn(5, 16)
    ref = model(x)
    ref.sum().backward()
    ref_grads = _grads(model)
    model.zero_grad()

    compiled = torch.compile(model, backend="fsmoe")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7)

    rep = fsmoe_compiler.report(compiled)
    kinds = [g.kind for g in rep.graphs()]
    assert kinds == ["forward", "backward"]
    assert rep.regions("forward") == [] and rep.regions("backward") == []
    assert rep.fallbacks() == []
    assert "0 MoE region(s)" in rep.render()


def test_report_of_a_model_never_compiled_says_so():
    assert "no graph of this model was compiled" in fsmoe_compiler.report(DenseBlock()).render()


def _boom(gm, ctx):
    raise RuntimeError("recognizer exploded on purpose")


def test_a_failing_pass_falls_back_to_the_unmodified_graph_and_says_why(monkeypatch):
    monkeypatch.setattr(backend_mod, "COMPILE", (_boom, backend_mod.verify))
    torch.manual_seed(0)
    model = DenseBlock()
    x = torch.randn(4, 16)
    ref = model(x)
    compiled = torch.compile(model, backend="fsmoe")
    with pytest.warns(UserWarning, match="falls back to the unmodified graph"):
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref)
    rep = fsmoe_compiler.report(compiled)
    assert len(rep.fallbacks()) == 2
    assert all("recognizer exploded on purpose" in f for f in rep.fallbacks())
    assert "fallback to the unmodified graph: RuntimeError: recognizer exploded on purpose" in rep.render()


def test_strict_turns_the_fallback_into_an_error(monkeypatch):
    monkeypatch.setattr(backend_mod, "COMPILE", (_boom, backend_mod.verify))
    compiled = torch.compile(DenseBlock(), backend="fsmoe", options={"strict": True})
    with pytest.raises(Exception, match="fsmoe could not compile the forward graph: recognizer exploded"):
        compiled(torch.randn(4, 16))


def test_verify_rejects_a_pass_that_changes_the_graph_outputs(monkeypatch):
    def drop_output(gm, ctx):
        out = gm.graph.output_node()
        vals = out.args[0]
        out.args = (tuple(vals[:-1]) if len(vals) > 1 else vals,)
        if len(vals) == 1:
            extra = gm.graph.placeholder("extra_input")
            extra.meta = {}
        gm.recompile()
        return gm

    monkeypatch.setattr(backend_mod, "COMPILE", (drop_output, backend_mod.verify))
    compiled = torch.compile(DenseBlock(), backend="fsmoe", options={"strict": True})
    with pytest.raises(Exception, match=r"graph (output count|inputs) changed"):
        compiled(torch.randn(4, 16)).sum().backward()


def test_dump_dir_writes_graphs_before_and_after(tmp_path):
    compiled = torch.compile(DenseBlock(), backend="fsmoe", options={"dump_dir": str(tmp_path)})
    compiled(torch.randn(4, 16)).sum().backward()
    names = sorted(os.listdir(tmp_path))
    assert any(n.endswith("_forward_before_rank0.py") for n in names)
    assert any(n.endswith("_backward_after_rank0.py") for n in names)


def test_mode_argument_is_rejected_with_a_pointer_to_options():
    compiled = torch.compile(DenseBlock(), backend="fsmoe", mode="max-autotune")
    with pytest.raises(Exception, match=r"takes only options=\.\.\., got \['mode'\]"):
        compiled(torch.randn(4, 16))


def test_the_agreement_key_tells_graphs_compiled_with_other_plan_options_apart():
    """The bench runs one model under several fsmoe methods in one process; equal keys made them share one call
    series and planning slot, and no method ever ran its plan. Options that do not shape the plan do not count."""
    gm = torch.fx.symbolic_trace(nn.Linear(4, 4))
    key = backend_mod.agreement_key
    base = FSMoEConfig()
    assert key("forward", gm, [], base) == key("forward", gm, [], FSMoEConfig(dump_dir="/tmp/x"))
    assert key("forward", gm, [], base) != key("backward", gm, [], base)
    assert key("forward", gm, [], base) == key("forward", gm, [], FSMoEConfig(strict=True, cache_dir="/tmp/c"))
    for other in (FSMoEConfig(scheduler="tutel"), FSMoEConfig(pipeline_degree=2), FSMoEConfig(profile_steps=3),
                  FSMoEConfig(grad_partition="auto"), FSMoEConfig(narrow_comm=False), FSMoEConfig(codegen="inductor")):
        assert key("forward", gm, [], base) != key("forward", gm, [], other), other

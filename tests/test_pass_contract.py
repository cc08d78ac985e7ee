"""The pass contract: typed context fields, declared reads and writes, pipelines checked before they run."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from fsmoe_compiler import backend
from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.passes.annotate import annotate
from fsmoe_compiler.passes.chunk import chunk
from fsmoe_compiler.passes.context import MissingContext, PassContext, check_pipeline, graph_pass, spec_of
from fsmoe_compiler.passes.recognize import recognize
from fsmoe_compiler.passes.solve import solve
from fsmoe_compiler.passes.taskgraph import taskgraph
from fsmoe_compiler.passes.verify import verify


def _tiny() -> fx.GraphModule:
    return fx.symbolic_trace(torch.nn.Linear(4, 4))


def test_a_pass_that_reads_an_unset_field_names_it_and_the_pass_that_writes_it():
    with pytest.raises(MissingContext, match=r"passes.solve reads ctx.taskgraph, .*run passes.taskgraph first"):
        solve(_tiny(), PassContext())
    with pytest.raises(MissingContext, match=r"passes.chunk reads ctx.regions, .*run passes.recognize"):
        chunk(_tiny(), PassContext())


def test_the_backends_pipelines_satisfy_every_declared_read():
    check_pipeline(backend.COMPILE)
    check_pipeline(backend.SCHEDULE, given=("regions", "costs"))
    with pytest.raises(MissingContext, match="passes.solve reads ctx.taskgraph, ctx.taskmap"):
        check_pipeline((solve, taskgraph), given=("regions",))
    with pytest.raises(MissingContext, match="passes.chunk reads ctx.regions"):
        check_pipeline((chunk, verify))


def test_every_pass_declares_its_contract_and_unknown_fields_are_refused():
    specs = {spec_of(p).name: spec_of(p) for p in (recognize, chunk, taskgraph, solve, annotate, verify)}
    assert specs["passes.recognize"].writes == ("regions",)
    assert specs["passes.taskgraph"].writes == ("taskgraph", "taskmap") and "costs" in specs["passes.taskgraph"].uses
    assert specs["passes.solve"].reads == ("taskgraph", "taskmap")
    with pytest.raises(ValueError, match="unknown PassContext field 'schedules'"):
        graph_pass(writes=("schedules",))
    with pytest.raises(TypeError, match="not a declared graph pass"):
        spec_of(lambda gm, ctx: gm)


def test_the_context_is_typed_and_its_options_come_from_one_config():
    ctx = PassContext()
    assert isinstance(ctx.config, FSMoEConfig) and ctx.config.time_limit_s == FSMoEConfig().time_limit_s
    assert ctx.regions_here == [] and not ctx.has("regions") and not ctx.has("schedule")
    with pytest.raises(ValueError, match="graph_kind must be one of 'forward', 'backward', 'dynamo', got 'fwd'"):
        PassContext(graph_kind="fwd")

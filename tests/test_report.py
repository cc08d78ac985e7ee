"""Reports: every compiled graph listed, Dynamo graph breaks that split an MoE layer named with cause and fix,
the roles a partial layer lacks, and ``strict=True`` raising whenever a recognised layer is not handled whole.

The MoE blocks are written here, tiny (hidden 64, 4 experts, top-2), in the two ways that break Dynamo's graph
most often: a sort-based dispatch whose split sizes come from ``counts.tolist()`` (an ``.item()``-like call), and
a per-expert loop over ``torch.where`` of the expert mask (a ``nonzero``). A ``print`` between routing and
experts breaks either.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fsmoe_compiler
from fsmoe_compiler import records
from fsmoe_compiler.passes.chunk import ChunkInfo
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.region import LeftAlone, MoERegion
from fsmoe_compiler.passes.whole import NotWhole, not_whole, unchunkable_layers, whole
from fsmoe_compiler.reporting.breaks import graph_break

HIDDEN, FFN, EXPERTS, TOP_K = 64, 32, 4, 2
ALL_CAPTURED = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}


class TinyMoE(nn.Module):
    """Softmax top-2 routing; ``style="sort"``: argsort dispatch, per-expert matmuls over ``counts.tolist()`` split
    sizes, scatter-add combine; ``style="nonzero"``: the same with the sort order from ``nonzero``;
    ``style="loop"``: a loop over experts of ``torch.where(mask)``, ``index_add_``.
    ``pause=True`` prints between the routing and the experts, ``pause="scores"`` between the scores and the topk."""

    def __init__(self, style: str = "sort", pause: bool | str = False) -> None:
        super().__init__()
        self.style, self.pause = style, pause
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.randn(EXPERTS, HIDDEN, FFN) / HIDDEN ** 0.5)
        self.w2 = nn.Parameter(torch.randn(EXPERTS, FFN, HIDDEN) / FFN ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        tokens = x.reshape(-1, m)
        scores = torch.softmax(self.gate(tokens), dim=-1)
        if self.pause == "scores":
            print("scored")
        probs, idx = torch.topk(scores, TOP_K, dim=-1)
        if self.pause is True:
            print("routed")
        if self.style == "loop":
            out = torch.zeros_like(tokens)
            mask = F.one_hot(idx, EXPERTS).permute(2, 1, 0)
            for e in range(EXPERTS):
                slot, tok = torch.where(mask[e])
                h = F.silu(tokens[tok] @ self.w1[e]) @ self.w2[e]
                out.index_add_(0, tok, h * probs[tok, slot, None])
            return out.reshape(b, s, m)
        flat = idx.reshape(-1)
        if self.style == "nonzero":  # the stable sort by expert, as positions of the expert-major one-hot's ones
            order = torch.nonzero(F.one_hot(flat, EXPERTS).t().reshape(-1)).squeeze(-1) % flat.numel()
        else:
            order = torch.argsort(flat, stable=True)
        token_of = order // TOP_K
        permuted = tokens.index_select(0, token_of)
        sizes = F.one_hot(flat, EXPERTS).sum(dim=0).tolist()
        for n in sizes:
            torch._check(n >= 0)
        torch._check(sum(sizes) == permuted.shape[0])
        outs = [F.silu(c @ self.w1[e]) @ self.w2[e] for e, c in enumerate(torch.split(permuted, sizes))]
        weighted = torch.cat(outs) * probs.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(tokens).scatter_add(0, token_of.unsqueeze(-1).expand(-1, m), weighted)
        return out.reshape(b, s, m)


class Block(nn.Module):
    """A residual block around the MoE layer (its last add takes no parameter when the MoE ends a graph)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 4, HIDDEN, requires_grad=True)


def _step(model: nn.Module, fn, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x.grad = None
    loss = fn(x).square().mean()
    loss.backward()
    return {"loss": loss.detach(), "x": x.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


def _compiled(model: nn.Module, settings: dict, options: dict | None = None):
    """fsmoe-compiled ``model`` run one step under the Dynamo ``settings``; equal to eager; its report."""
    x = _inputs()
    with torch._dynamo.config.patch(**settings):
        ref = _step(model, model, x)
        compiled = torch.compile(model, backend="fsmoe", options=options)
        got = _step(model, compiled, x)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=lambda m, name=name: f"{name}: {m}")
    return compiled, fsmoe_compiler.report(compiled)


# ---------------------------------------------------------------------------------------------------
# every graph, parameters or not


class _Tail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        print("between the graphs")
        return y * 2 + x


def test_report_lists_every_graph_including_those_that_take_no_parameter(capsys):
    model = _Tail()
    compiled, rep = _compiled(model, {})
    assert [len(r.param_refs) for r in rep.records] == [2, 0], "the tail after the print takes no parameter"
    assert len(rep.graphs("forward")) == len(rep.graphs("backward")) == 2
    text = rep.render()
    assert "takes no parameter" in text and "2 parameter(s)" in text
    (b,) = rep.graph_breaks()
    assert (b.graph, b.info.cause, b.splits_layer) == (0, "print", False)
    assert "reorderable_logging_functions" in b.info.fix and "_Tail" not in str(b)
    assert f"Dynamo graph break after Dynamo graph 0: {b.info}" in text
    # another model's graphs are not this model's
    other = torch.compile(_Tail(), backend="fsmoe")
    other(torch.randn(2, HIDDEN))
    assert fsmoe_compiler.report(compiled).records == rep.records
    assert len(fsmoe_compiler.report(other).records) == 2


def test_records_survive_a_dead_model_only_while_it_lives():
    model = _Tail()
    compiled, rep = _compiled(model, {})
    ids = {r.id for r in rep.records}
    del model, compiled, rep
    import gc

    gc.collect()
    records.records_for(nn.Linear(2, 2))  # prunes
    assert not ids & {r.id for r in records._RECORDS}


# ---------------------------------------------------------------------------------------------------
# graph breaks that split an MoE layer: cause, fix, and the fix works


BREAKS = [
    # (style, pause, Dynamo settings that break, cause, words of the fix, settings that fix it)
    ("sort", True, ALL_CAPTURED, "print", "reorderable_logging_functions",
     dict(ALL_CAPTURED, reorderable_logging_functions={print})),
    ("sort", False, {"capture_scalar_outputs": False, "capture_dynamic_output_shape_ops": True}, "item",
     "capture_scalar_outputs = True", ALL_CAPTURED),
    ("nonzero", False, {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": False}, "nonzero",
     "capture_dynamic_output_shape_ops = True", ALL_CAPTURED),
]


@pytest.mark.slow  # three compiles of a 4-graph model each
@pytest.mark.parametrize("style,pause,settings,cause,fix,fixed", BREAKS, ids=[b[3] for b in BREAKS])
def test_a_graph_break_that_splits_an_moe_layer_is_named_with_its_cause_and_fix(style, pause, settings, cause, fix,
                                                                              fixed, capsys):
    model = Block(TinyMoE(style, pause))
    compiled, rep = _compiled(model, settings)
    assert rep.regions("forward") == [] and rep.regions("backward") == []
    split = [b for b in rep.graph_breaks() if b.splits_layer]
    assert len(split) == 1, [str(b) for b in rep.graph_breaks()]
    (b,) = split
    assert b.info.cause == cause and fix in b.info.fix, b.info
    assert b.layer.present[0] == "router" and "expert" in b.layer.missing and "combine" in b.layer.missing
    assert b.info.where.startswith(__file__) and b.info.library is None
    text = rep.render()
    assert text.startswith("!! 1 MoE layer(s) split by Dynamo graph breaks")
    assert str(b) in text and "TinyMoE" in str(b) and f"fix: {b.info.fix}" in str(b)
    if cause == "print":  # explain shows the same
        _explain_shows_the_break(model, settings, cause)
    # the fix makes the layer one region per graph (a fresh copy: a model's report keeps its earlier compiles)
    torch._dynamo.reset()
    compiled, rep = _compiled(copy.deepcopy(model), fixed)
    assert rep.graph_breaks() == []
    assert len(rep.regions("forward")) == len(rep.regions("backward")) == 1


def _explain_shows_the_break(model: nn.Module, settings: dict, cause: str) -> None:
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**settings):
        ex = fsmoe_compiler.explain(model, _inputs(), quiet=True)
    assert [x.info.cause for x in ex.graph_breaks() if x.splits_layer] == [cause]


def test_the_partial_layer_says_which_roles_it_has_and_lacks():
    model = Block(TinyMoE("sort"))
    _, rep = _compiled(model, {"capture_scalar_outputs": False, "capture_dynamic_output_shape_ops": True})
    (note,) = [n for g in rep.graphs("forward") for n in g.notes if isinstance(n, LeftAlone)]
    assert (note.present, note.missing, note.leaves_graph) == (("router", "dispatch"), ("expert", "combine"), True)
    assert note.endswith("[partial: router, dispatch found; missing: expert, combine]")
    assert rep.partial() == [str(note)]
    pause = Block(TinyMoE("loop", pause=True))
    torch._dynamo.reset()
    _, rep = _compiled(pause, ALL_CAPTURED)
    (note,) = [n for g in rep.graphs("forward") for n in g.notes if isinstance(n, LeftAlone)]
    assert note.present == ("router",) and "[router only; missing: dispatch, expert, combine]" in note


def test_a_break_between_the_scores_and_the_topk_is_tied_to_the_graph_that_starts_with_them():
    """The gate ran in one graph, the topk and experts in the next: that graph takes the scores as an input, so
    recognition finds no router there; the note and the break say the layer lacks its router there."""
    _, rep = _compiled(Block(TinyMoE("loop", pause="scores")), ALL_CAPTURED)
    assert rep.regions("forward") == []
    (b,) = [b for b in rep.graph_breaks() if b.splits_layer]
    assert b.info.cause == "print" and b.layer_graph == b.graph + 1
    assert (b.layer.present, b.layer.missing) == (("dispatch", "expert", "combine"), ("router",))
    assert f"Dynamo graph {b.layer_graph} has its dispatch, expert, combine, not its router" in str(b)
    assert "scores that are an input of this graph" in b.layer


def test_left_alone_notes_keep_their_roles_through_copies_and_pickles():
    note = LeftAlone("forward: x", anchor="topk", gate="mm", module="moe (TinyMoE)", present=("router", "dispatch"),
                     leaves_graph=True)
    for back in (copy.deepcopy(note), pickle.loads(pickle.dumps(note))):
        assert back == "forward: x" and isinstance(back, LeftAlone)
        assert (back.anchor, back.module, back.present, back.missing, back.leaves_graph) == (
            "topk", "moe (TinyMoE)", ("router", "dispatch"), ("expert", "combine"), True)


def test_a_library_expert_loop_is_named_with_the_library_switch():
    pytest.importorskip("transformers")
    import upstream_hf as hf

    case = next(c for c in hf.CASES if not c.one_graph and not c.model)
    module, inputs, loss_of = hf.build(case)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**ALL_CAPTURED):
        hf.call(module, inputs)  # eager first, as the upstream tests do
        compiled = torch.compile(module, backend="fsmoe")
        loss_of(hf.call(compiled, inputs)).backward()
    rep = fsmoe_compiler.report(compiled)
    (b,) = [b for b in rep.graph_breaks() if b.splits_layer]
    assert (b.info.cause, b.info.library) == ("library expert loop", "transformers")
    assert "compile_friendly" in b.info.fix and "for expert_idx in" in b.info.where
    assert b.layer.missing == ("dispatch", "expert", "combine")
    assert "transformers" in b.info.frames[-1][0]


def test_graph_break_causes_from_dynamo_reasons():
    class Frame:
        def __init__(self, filename, line):
            self.filename, self.lineno, self.name, self.line = filename, 3, "forward", line

    class Reason:
        def __init__(self, text, frames, graph_break=True):
            self.reason, self.user_stack, self.graph_break = text, frames, graph_break

    lib = [Frame("/x/site-packages/megatron/core/moe/experts.py", "for expert in hits:")]
    b = graph_break(Reason("Could not extract specialized integer from data-dependent expression u0", lib))
    assert (b.cause, b.library) == ("library expert loop", "megatron") and "moe_grouped_gemm=True" in b.fix
    b = graph_break(Reason("step_unsupported", [Frame("/home/me/model.py", "for e in hit:")]))
    assert (b.cause, b.library) == ("data-dependent loop", None)
    b = graph_break(Reason("Something new\n  Hint: set foo = 1\n  Hint: Please report an issue to PyTorch.", []))
    assert (b.cause, b.fix, b.where) == ("other", "set foo = 1", "<unknown>")
    assert graph_break(Reason("return_value", [], graph_break=False)) is None and graph_break(None) is None


# ---------------------------------------------------------------------------------------------------
# strict: a recognised layer that cannot be handled whole raises


def _region(layer: int, graph: str, a2a: bool = True, **missing) -> MoERegion:
    r = MoERegion(layer=layer, graph=graph, router="softmax-topk", num_experts=4, top_k=2,
                  all_to_all=["a2a"] if a2a else [])
    r.nodes = {"router": ["topk"], "dispatch": ["index"], "expert": ["mm"], "combine": ["add"], "shared_expert": []}
    for role in missing:
        r.nodes[role] = []
    return r


def test_not_whole_names_partial_regions_and_missing_backward_layers():
    fw = [_region(0, "forward"), _region(1, "forward", combine=True)]
    assert not_whole("forward", fw) == [
        "forward: MoE layer 1 (softmax-topk, 4 experts, top_k=2) is a partial region: no combine role "
        "(found: router, dispatch, expert)"]
    # backward: no dispatch gradient is whole; a missing expert role is not; an expert-parallel layer not found is not
    bw = [_region(0, "backward", dispatch=True)]
    assert not_whole("backward", bw, fw[:1]) == []
    assert not_whole("backward", [_region(0, "backward", expert=True)], fw[:1])[0].startswith(
        "backward: MoE layer 0 (softmax-topk, 4 experts, top_k=2) is a partial region: no expert role")
    (msg,) = not_whole("backward", [], fw[:1])
    assert "MoE layer 0" in msg and "has no backward region" in msg
    assert not_whole("backward", [], [_region(0, "forward", a2a=False)]) == []  # nothing to schedule: whole


def test_the_whole_pass_notes_or_raises_when_strict():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    ctx = PassContext(graph_kind="forward", regions={"forward": [_region(0, "forward", dispatch=True)]})
    whole(gm, ctx)
    assert any("partial region: no dispatch role" in n for n in ctx.notes)
    ctx.strict = True
    with pytest.raises(NotWhole, match=r"MoE layer 0 .* no dispatch role .*valid choices: strict=False"):
        whole(gm, ctx)


def test_unchunkable_layers_under_auto_name_the_rule_missing_not_a_degree_that_does_not_fit():
    regions = [_region(0, "forward"), _region(1, "forward"), _region(2, "forward"), _region(3, "forward", a2a=False)]
    refused = lambda layer, d, why: ChunkInfo(layer, 1, d, why)  # noqa: E731
    chunked = {
        2: {0: ChunkInfo(0, 2, 2), 1: refused(1, 2, "no chunking rule for aten.foo (node foo)"),
            2: refused(2, 2, "degree 2 does not divide the capacity 3"), 3: refused(3, 2, "no all-to-all")},
        4: {0: refused(0, 4, "degree 4 is larger than the capacity 3"),
            1: refused(1, 4, "degree 4 is larger than the capacity 3"),
            2: refused(2, 4, "degree 4 is larger than the capacity 3"), 3: refused(3, 4, "no all-to-all")},
    }
    (msg,) = unchunkable_layers(chunked, regions)
    assert msg.startswith("forward: MoE layer 1 (softmax-topk, 4 experts, top_k=2) cannot be chunked at any degree "
                          "under pipeline_degree='auto' (degree 2: no chunking rule for aten.foo (node foo))")
    assert "valid choices: pipeline_degree=1" in msg and "strict=False" in msg


def test_strict_compiles_whole_layers_and_keeps_left_alone_routing_a_report():
    """strict=True: a layer found whole compiles; routing left alone by a graph break is reported, not raised
    (no layer was recognised in any graph; the report names the break and its fix)."""
    _, rep = _compiled(Block(TinyMoE("sort")), ALL_CAPTURED, {"strict": True})
    assert len(rep.regions("forward")) == len(rep.regions("backward")) == 1 and rep.partial() == []
    torch._dynamo.reset()
    _, rep = _compiled(Block(TinyMoE("sort", pause=True)), ALL_CAPTURED, {"strict": True})
    assert [b.info.cause for b in rep.graph_breaks() if b.splits_layer] == ["print"]


@pytest.mark.parametrize("strict", [False, True])
def test_strict_under_auto_raises_for_an_expert_parallel_layer_without_a_chunking_rule(strict, monkeypatch):
    """The planner's variants under pipeline_degree="auto": a layer no degree can split for want of a rule stays at
    r = 1 with a note, or with strict=True raises naming the layer, the op and the valid choices."""
    from graph_capture import fake_world

    import fsmoe_compiler.planner as planner

    monkeypatch.setattr(planner, "meet", lambda key, value, **kw: [value])  # rank 0 of a fake world
    with fake_world(rank=0, world_size=2):
        _variants_under_auto(strict)


def _variants_under_auto(strict: bool) -> None:
    from dataclasses import replace

    from test_chunk import _with_unknown_op

    from fsmoe_compiler.backend import PIPELINES
    from fsmoe_compiler.config import FSMoEConfig
    from fsmoe_compiler.passes.verify import graph_signature
    from fsmoe_compiler.planner import PlanError, Variants

    fw, ctx = _with_unknown_op()  # an expert-parallel layer with a cumsum between its expert matmuls
    config = FSMoEConfig(strict=strict, pipeline_degree="auto", max_degree=2)
    ctx = replace(ctx, config=config, strict=strict, degrees={}, original=graph_signature(fw))
    variants = Variants(fw, ctx, config, PIPELINES.chunk, "graph/forward")
    if not strict:
        variants.build()
        assert variants.degrees == [1]
        assert variants.notes == ["degree 2 not profiled: no MoE layer of the forward graph can be split into 2 chunks"]
        return
    with pytest.raises(PlanError, match=r"forward: MoE layer 0 \(.*\) cannot be chunked at any degree under "
                                        r"pipeline_degree='auto' \(degree 2: no chunking rule for aten.cumsum.default "
                                        r"\(node odd_cumsum\)\); valid choices: pipeline_degree=1"):
        variants.build()


def test_a_partial_region_is_a_note_or_with_strict_an_error_naming_the_layer(monkeypatch):
    """Recognition that found a layer without its dispatch (stood in by dropping the role): the report notes the
    partial region; strict=True raises at compile, naming the layer, the role and the valid choices."""
    import fsmoe_compiler.passes.recognize as recognize_mod

    found = recognize_mod.find_moe_regions

    def without_dispatch(gm, graph="forward", *args, **kwargs):
        regions = found(gm, graph, *args, **kwargs)
        for r in regions:
            if graph == "forward":
                r.nodes["dispatch"] = []
        return regions

    monkeypatch.setattr(recognize_mod, "find_moe_regions", without_dispatch)
    _, rep = _compiled(TinyMoE("sort"), ALL_CAPTURED)
    assert rep.partial() == ["forward: MoE layer 0: partial region, no dispatch role"]
    assert "forward: MoE layer 0 (softmax-topk, 4 experts, top_k=2) is a partial region: no dispatch role" in rep.render()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**ALL_CAPTURED):
        compiled = torch.compile(TinyMoE("sort"), backend="fsmoe", options={"strict": True})
        with pytest.raises(Exception, match=r"FSMoECompileError: fsmoe could not compile the forward graph: forward: MoE layer 0 \(softmax-topk, 4 experts, "
                                                    r"top_k=2\) is a partial region: no dispatch role .*valid choices"):
            compiled(_inputs())


def test_a_backward_region_without_dispatch_is_whole_when_the_input_needs_no_gradient():
    model = TinyMoE("sort")
    x = torch.randn(2, 4, HIDDEN)  # no gradient: the backward has no dispatch gradient to un-permute
    with torch._dynamo.config.patch(**ALL_CAPTURED):
        ex = fsmoe_compiler.explain(model, x, quiet=True)
    (bw,) = ex.regions("backward")
    assert bw.nodes["dispatch"] == [] and bw.nodes["expert"] and bw.nodes["combine"]
    assert ex.partial() == [] and "partial region" not in ex.render()


def test_a_break_inside_a_loop_names_the_function_dynamo_ran_outside_any_graph():
    """torch.where inside the per-expert loop without capture_dynamic_output_shape_ops: Dynamo skips the MoE's
    whole frame (a break in a loop), so no graph holds any of the layer; the report names the function, the cause
    and the fix instead of only "no MoE region found"."""
    _, rep = _compiled(Block(TinyMoE("loop")), {"capture_scalar_outputs": True,
                                                "capture_dynamic_output_shape_ops": False})
    assert rep.regions("forward") == []
    (b,) = [b for b in rep.graph_breaks() if b.skipped]
    assert b.info.cause == "nonzero" and b.skipped.startswith("forward (test_report.py:") and not b.splits_layer
    assert str(b).startswith("Dynamo ran forward (test_report.py:") and "capture_dynamic_output_shape_ops" in str(b)
    assert "!! 1 function(s) Dynamo ran outside any graph after a graph break:" in rep.render()
    # a break whose function has a graph of its own is not a skipped frame
    torch._dynamo.reset()
    _, rep = _compiled(Block(TinyMoE("sort")), {"capture_scalar_outputs": False,
                                                "capture_dynamic_output_shape_ops": True})
    assert [b.skipped for b in rep.graph_breaks()] == ["", ""]

"""Token split (``passes.split_tokens``, ``split_tokens`` option): an EP dropless layer run on token ranges.

Graph structure, in this process over PyTorch's fake process group (rank 0 of
2; shapes and collectives only), on the bench model ``examples.titan_moe``
(torchtitan's own MoE layer, expert-parallel): :func:`splits_for` names the MoE
module from the forward graph's region, :func:`split_layer` rewrites Dynamo's
graph into one copy of the layer per range (a ``tensor_split`` before, a
``cat`` after, baked token counts rescaled), and after aot_autograd
recognition finds one region per range in both graphs (with a shared
expert, and two layers). Sizes that only look like token counts (the batch
equal to the EP size) are kept; an odd batch splits along the sequence. Also
the option's validation, ``auto_ranges``, and the refusals (two activations in,
two results out, a symbolic token dim) with their messages (``SplitOrWhole``'s
choice on made-up timings: ``test_split_choice.py``).

Numerics on 2 gloo ranks (``rank_pool``): the model compiled with
``backend="fsmoe"`` and ``split_tokens`` = 2, 4 or ``"auto"`` gives eager's loss
and gradients at every step of an SGD run long enough to reach the scheduled
graphs (and, for ``"auto"``, to settle the whole-or-split choice, either way);
routed expert weight gradients are sums over the ranges of bf16 grouped-GEMM
partials, so they are compared within bf16 rounding. So does DeepSeek-V3-style
routing (upstream_titan's block, two layers), and so do the ways a split is
given up: a split graph that fails to trace, a rank slower to split than the
other, a batch-size recompile.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import operator
from unittest import mock

import pytest
import torch
import torch.fx as fx

pytest.importorskip("torchtitan")

from fsmoe_compiler.config import FSMoEConfig  # noqa: E402
from fsmoe_compiler.passes.context import PassContext  # noqa: E402
from fsmoe_compiler.passes.recognize import recognize  # noqa: E402
from fsmoe_compiler.passes.split_tokens import (  # noqa: E402
    MAX_RANGES, MIN_RANGE_TOKENS, TokenSplit, TokenSplitError, auto_ranges, split_layer, split_tokens, splits_for)
from graph_capture import capture_backend, fake_world  # noqa: E402
from upstream_checks import ATOL, CORE_ROLES, RTOL  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:In CPU autocast"),  # torchtitan's router asks for fp32 autocast
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),  # at torchtitan's import
]

ONE_GRAPH = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}
MODEL = {"n_layers": 1, "d_model": 64, "d_ff": 128, "num_experts": 4}
A2A = torch.ops._c10d_functional.all_to_all_single.default


@contextlib.contextmanager
def titan_settings_restored():
    """``examples.titan_moe`` sets two torchtitan process-wide settings for EP on CPU and leaves them: put them back."""
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.distributed import utils as titan_dist

    saved = parallel_dims.device_type, titan_dist.get_spmd_backend()
    try:
        yield
    finally:
        parallel_dims.device_type = saved[0]
        titan_dist.set_spmd_backend(saved[1])


def build(seed: int = 0, **overrides) -> torch.nn.Module:
    from examples.titan_moe import build_model

    torch.manual_seed(seed)
    return build_model(**{**MODEL, **overrides})


def batch(batch_size: int, seq_len: int = 16, seed: int = 0):
    from examples.titan_moe import make_batch

    return make_batch(batch_size, seq_len, seed=seed)


# ------------------------------------------------------------------------------------------------ graph structure


def _count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _regions(gm: fx.GraphModule, kind: str, forward_regions=None):
    ctx = PassContext(graph_kind=kind)
    if forward_regions is not None:
        ctx.regions["forward"] = forward_regions
    recognize(gm, ctx)
    return ctx.regions[kind], ctx.notes


_CAPTURES: dict[tuple, dict] = {}


def capture(chunks: int | None, batch_size: int = 4, seq_len: int = 16, **overrides) -> dict:
    """Rank 0 of 2 (fake process group): the tiny titan model's Dynamo graph, its ATen graphs and forward regions;
    with ``chunks``, also the Dynamo graph split by ``splits_for(..., chunks)`` + ``split_layer`` and that graph's
    ATen graphs (a second compile whose backend splits before aot_autograd). Cached per arguments: change
    nothing but what recognition tags."""
    key = (chunks, batch_size, seq_len, tuple(sorted(overrides.items())))
    if key in _CAPTURES:
        return _CAPTURES[key]
    out: dict = {}
    with fake_world(0, 2), titan_settings_restored(), torch._dynamo.config.patch(**ONE_GRAPH):
        model = build(**overrides)
        idx, tgt = batch(batch_size, seq_len)

        def run(backend) -> None:
            torch._dynamo.reset()
            torch.compile(model, backend=backend, fullgraph=True)(idx, tgt).backward()

        aot, whole = capture_backend()
        dynamo: list[fx.GraphModule] = []

        def keep(gm, example_inputs):
            dynamo.append(copy.deepcopy(gm))
            return aot(gm, example_inputs)

        run(keep)
        out["dynamo"], out["whole"] = dynamo[0], whole
        out["fw_regions"], _ = _regions(whole.forward[0], "forward")
        if chunks is not None:
            splits, notes = splits_for(whole.forward[0], out["fw_regions"], chunks)
            out["splits"], out["notes"] = splits, notes
            aot2, split = capture_backend()
            done: list = []

            def split_then_capture(gm, example_inputs):
                for s in splits:
                    done.append(split_layer(gm, s))
                out["split_dynamo"] = copy.deepcopy(gm)
                return aot2(gm, example_inputs)

            run(split_then_capture)
            out["split"], out["done"] = split, done
    _CAPTURES[key] = out
    return out


def _call_args(gm: fx.GraphModule, method: str) -> list[tuple]:
    return [n.args[1:] for n in gm.graph.nodes if n.op == "call_method" and n.target == method]


def test_splits_for_names_the_titan_moe_module_and_honours_the_setting():
    g = capture(None)
    fw, (region,) = g["whole"].forward[0], g["fw_regions"]
    assert region.dropless and len(region.all_to_all) == 3 and region.tokens == 64, region
    for chunks in (2, 4):
        splits, notes = splits_for(fw, [region], chunks)
        (s,) = splits
        assert (s.path, s.chunks, s.layer) == ("L['self'].blocks.0.moe", chunks, 0), s
        assert notes == [f"forward: MoE layer 0 (L['self'].blocks.0.moe): tokens split into {chunks} ranges before "
                         f"routing (split_tokens={chunks})"], notes
    assert splits_for(fw, [region], 1) == ([], [])
    # "auto": 64 tokens are too few for two ranges of MIN_RANGE_TOKENS
    assert splits_for(fw, [region], "auto") == ([], [])


def test_auto_ranges_is_a_power_of_two_up_to_eight_with_enough_tokens_per_range():
    assert (MAX_RANGES, MIN_RANGE_TOKENS) == (8, 256)
    cases = {None: 1, 0: 1, 64: 1, 511: 1, 512: 2, 1023: 2, 1024: 4, 2047: 4, 2048: 8, 4096: 8, 10**6: 8}
    assert {t: auto_ranges(t) for t in cases} == cases


@pytest.mark.parametrize("value", [0, -2, "x", 2.0, True, None])
def test_split_tokens_option_rejects_a_bad_value_naming_it(value):
    with pytest.raises(ValueError, match=r"'split_tokens' must be an int >= 1 or 'auto', got " + repr(value)):
        FSMoEConfig.from_options({"split_tokens": value})
    for ok in (1, 2, 8, "auto"):
        assert FSMoEConfig.from_options({"split_tokens": ok}).split_tokens == ok


@pytest.mark.parametrize("chunks", [2, 4])
def test_split_layer_makes_one_copy_of_the_layer_per_range(chunks):
    g = capture(chunks)
    before, after = g["dynamo"], g["split_dynamo"]
    assert g["done"] == [f"L['self'].blocks.0.moe: {chunks} token ranges along dim 0 of value [4, 16, 64]"]
    assert _count(before, A2A) == 0  # Dynamo's graph calls the functional collective by its Python op
    a2a = lambda gm: sum(1 for n in gm.graph.nodes if "all_to_all_single" in str(n.target))  # noqa: E731
    assert a2a(before) == 3 and a2a(after) == 3 * chunks
    assert _count(after, torch.tensor_split) == 1 and _count(after, torch.cat) == 1
    assert sum(1 for n in after.graph.nodes if n.target is torch.topk) == chunks
    (ts,) = [n for n in after.graph.nodes if n.target is torch.tensor_split]
    assert ts.args[1] == chunks and ts.kwargs == {"dim": 0}
    (cat,) = [n for n in after.graph.nodes if n.target is torch.cat]
    assert len(cat.args[0]) == chunks and cat.kwargs == {"dim": 0}
    # the residual add reads the cat, the ranges' outputs only feed the cat
    assert [u.target for u in cat.users] == [operator.add]
    # baked token counts: 64 tokens -> 64/chunks per range; the batch of 4 -> 4/chunks; hidden 64 and the
    # EP size (2) untouched
    t, b = 64 // chunks, 4 // chunks
    assert _call_args(before, "view").count((64, 64)) == 1 and _call_args(after, "view").count((t, 64)) == chunks
    assert _call_args(after, "view").count((64, 64)) == 0
    assert _call_args(before, "view").count((4, -1, 64)) == 1 and _call_args(after, "view").count((b, -1, 64)) == chunks
    assert _call_args(after, "view").count((t, 2)) == 2 * chunks  # topk scores and ids [T, K]
    assert _call_args(after, "view").count((2, -1)) == 3 * chunks  # the count exchange's [ep, E/ep]
    # Dynamo's runtime checks on the data-dependent split sizes: at most and exactly tokens x top-k
    cmp = lambda gm, op: sorted(n.args[1] for n in gm.graph.nodes if n.target is op)  # noqa: E731
    assert cmp(before, operator.le) == [128, 128] and cmp(after, operator.le) == [128 // chunks] * 2 * chunks
    assert cmp(before, operator.eq) == [128] and cmp(after, operator.eq) == [128 // chunks] * chunks


def test_a_size_equal_to_the_batch_size_that_is_no_token_count_is_kept():
    """Batch 2 on 2 EP ranks: the count exchange's ``view(ep, -1)`` and ``view(ep, e)`` read 2 like the batch dim,
    but their tensors hold per-expert counts, not token rows: kept, so the split graph traces (it did not: an
    index out of bounds in aot_autograd, and the backend ran the layer whole)."""
    g = capture(2, batch_size=2)
    before, after = g["dynamo"], g["split_dynamo"]
    assert g["done"] == ["L['self'].blocks.0.moe: 2 token ranges along dim 0 of value [2, 16, 64]"]
    views = _call_args(after, "view")
    assert _call_args(before, "view").count((2, -1)) == 3 and views.count((2, -1)) == 6, views
    assert _call_args(before, "view").count((2, 2)) == 2 and views.count((2, 2)) == 4, views
    assert views.count((1, -1)) == 0 and views.count((1, 2)) == 0, views
    assert views.count((16, 64)) == 2 and views.count((1, -1, 64)) == 2, views  # the token views are rescaled
    fwd, _ = _regions(g["split"].forward[0], "forward")
    assert [(r.layer, r.tokens) for r in fwd] == [(0, 16), (1, 16)]


def test_an_odd_batch_is_split_along_the_sequence_into_contiguous_ranges():
    """Batch 3 does not split in two: positions do, and each range is made contiguous (torchtitan views the layer's
    input as ``[T, D]``; a strided range failed to trace and the layer ran whole). The batch size in
    ``view(B, -1, D)`` is kept, token counts halve, and the ranges are joined along the sequence."""
    g = capture(2, batch_size=3)
    after = g["split_dynamo"]
    assert g["done"] == ["L['self'].blocks.0.moe: 2 token ranges along dim 1 of value [3, 16, 64]"]
    (ts,) = [n for n in after.graph.nodes if n.target is torch.tensor_split]
    assert ts.kwargs == {"dim": 1}
    assert [u.target for u in ts.users] == [operator.getitem] * 2
    assert all([v.target for v in u.users] == ["contiguous"] for u in ts.users)
    (cat,) = [n for n in after.graph.nodes if n.target is torch.cat]
    assert cat.kwargs == {"dim": 1}
    views = _call_args(after, "view")
    assert views.count((24, 64)) == 2 and views.count((3, -1, 64)) == 2 and views.count((48, 64)) == 0, views
    fwd, _ = _regions(g["split"].forward[0], "forward")
    bwd, _ = _regions(g["split"].backward[0], "backward", fwd)
    assert [(r.layer, r.tokens) for r in fwd] == [(0, 24), (1, 24)] and [r.layer for r in bwd] == [0, 1]


@pytest.mark.parametrize("chunks", [2, 4])
def test_split_graph_is_one_region_per_range_in_both_graphs(chunks):
    g = capture(chunks)
    fw, bw = g["split"].forward[0], g["split"].backward[0]
    assert _count(fw, A2A) == 3 * chunks, fw.code
    fwd, fwd_notes = _regions(fw, "forward")
    bwd, bwd_notes = _regions(bw, "backward", fwd)
    for kind, regions in (("forward", fwd), ("backward", bwd)):
        assert sorted(r.layer for r in regions) == list(range(chunks)), (kind, [r.layer for r in regions])
        for r in regions:
            where = f"{kind} region {r.layer}: {r.notes}"
            assert all(r.nodes.get(role) for role in CORE_ROLES), (where, {k: len(v) for k, v in r.nodes.items()})
            assert not r.nodes.get("shared_expert"), (where, r.nodes.get("shared_expert"))
            assert r.dropless and r.num_experts == 4 and r.top_k == 2, where
            assert len(r.all_to_all) == (3 if kind == "forward" else 2), (where, r.all_to_all)
            _check_only_glue_is_shared(fw if kind == "forward" else bw, r)
    for r in fwd:
        assert r.tokens == 64 // chunks, r
    assert not any("no MoE region" in n for n in fwd_notes + bwd_notes)


def _check_only_glue_is_shared(gm: fx.GraphModule, region) -> None:
    """Nodes two ranges both reached are left out of both with a note; they may only be the glue: the cat that
    joins the ranges and the running tokens-per-expert count (torchtitan's buffer ``add_``, functionalized into a
    chain of ``[E]`` adds, one per range)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for note in region.notes:
        if "also reached from another layer" not in note:
            continue
        for name in note.split(": ", 1)[1].split(", "):
            n = by_name[name]
            glue = n.target is torch.ops.aten.cat.default or (
                n.target is torch.ops.aten.add.Tensor and tuple(n.meta["val"].shape) == (MODEL["num_experts"],))
            assert glue, (region.layer, note, n.format_node())


def test_titan_with_a_shared_expert_splits_to_one_region_per_range_with_its_shared_expert():
    g = capture(2, shared_expert=True)
    fw, bw = g["split"].forward[0], g["split"].backward[0]
    fwd, _ = _regions(fw, "forward")
    bwd, _ = _regions(bw, "backward", fwd)
    for kind, regions in (("forward", fwd), ("backward", bwd)):
        assert len(regions) == 2, kind
        assert all(r.nodes.get("shared_expert") for r in regions), (kind, [r.notes for r in regions])


def test_two_titan_layers_split_into_ranges_are_four_regions_with_their_shared_experts():
    g = capture(2, n_layers=2, shared_expert=True)
    assert g["done"] == ["L['self'].blocks.0.moe: 2 token ranges along dim 0 of value [4, 16, 64]",
                         "L['self'].blocks.1.moe: 2 token ranges along dim 0 of value_2 [4, 16, 64]"]
    fw, bw = g["split"].forward[0], g["split"].backward[0]
    assert _count(fw, A2A) == 3 * 4
    fwd, _ = _regions(fw, "forward")
    bwd, _ = _regions(bw, "backward", fwd)
    for kind, gm, regions in (("forward", fw, fwd), ("backward", bw, bwd)):
        assert [r.layer for r in regions] == [0, 1, 2, 3], kind
        for r in regions:
            assert all(r.nodes.get(role) for role in CORE_ROLES) and r.nodes.get("shared_expert"), (kind, r.layer)
            _check_only_glue_is_shared(gm, r)


# ------------------------------------------------------------------------------------------------ refusals


def _hand_graph(two_inputs: bool = False, two_outputs: bool = False,
                batch_size: int = 4) -> tuple[fx.GraphModule, TokenSplit]:
    """A Dynamo-like graph by hand: ``layer`` nodes (tagged with one nn_module_stack key) between glue; example
    values as Dynamo stores them."""
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.placeholder("y")
    w = g.placeholder("w")
    w.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}  # a parameter
    vals = {x: torch.randn(batch_size, 8, 16), y: torch.randn(batch_size, 8, 16), w: torch.randn(16, 16)}
    stack = {"L__self___moe": ("L['self'].moe", object)}

    def node(target, *args, inside=True):
        n = g.call_function(target, args)
        vals[n] = target(*(vals[a] if isinstance(a, fx.Node) else a for a in args))
        if inside:
            n.meta["nn_module_stack"] = dict(stack)
        return n

    h = node(torch.matmul, x, w)
    if two_inputs:
        h = node(torch.add, h, y)
    o = node(torch.relu, h)
    if two_outputs:
        out = node(torch.add, node(torch.add, x, o, inside=False), node(torch.neg, h, inside=False), inside=False)
    else:
        out = node(torch.add, x, o, inside=False)
    g.output(out)
    for n, v in vals.items():
        n.meta["example_value"] = v
    return fx.GraphModule(torch.nn.Module(), g), TokenSplit("L__self___moe", "L['self'].moe", 2, 0)


@pytest.mark.parametrize("batch_size, dim", [(4, 0), (3, 1)])
def test_hand_built_layer_splits_and_computes_the_same(batch_size, dim):
    gm, split = _hand_graph(batch_size=batch_size)
    args = [torch.randn(batch_size, 8, 16), torch.randn(batch_size, 8, 16), torch.randn(16, 16)]
    want = gm(*args)
    assert split_layer(gm, split) == f"L['self'].moe: 2 token ranges along dim {dim} of x [{batch_size}, 8, 16]"
    assert _count(gm, torch.matmul) == 2 and _count(gm, torch.cat) == 1
    torch.testing.assert_close(gm(*args), want)


@pytest.mark.parametrize("case, message", [
    ("two_inputs", r"it reads 2 activations \(x, y\), not one"),
    ("two_outputs", r"2 of its results that depend on its input are used after it \(matmul, relu\), not one"),
])
def test_layer_with_two_activations_in_or_two_results_out_is_refused_and_left_whole(case, message):
    gm, split = _hand_graph(**{case: True})
    code = gm.code
    with pytest.raises(TokenSplitError, match=message):
        split_layer(gm, split)
    assert gm.code == code  # unchanged
    # the pass: a note, and the graph left whole; strict raises with the layer named
    ctx = PassContext(graph_kind="dynamo", token_splits=[split])
    split_tokens(gm, ctx)
    assert gm.code == code
    assert len(ctx.notes) == 1 and ctx.notes[0].startswith("dynamo: MoE layer 0 (L['self'].moe): tokens not split (")
    assert message.replace("\\", "") in ctx.notes[0], ctx.notes
    strict = PassContext(graph_kind="dynamo", token_splits=[split], strict=True)
    with pytest.raises(TokenSplitError, match=r"dynamo: MoE layer 0 \(L\['self'\]\.moe\): tokens not split \("):
        split_tokens(gm, strict)


def test_module_missing_from_the_graph_is_refused():
    gm, _ = _hand_graph()
    with pytest.raises(TokenSplitError, match="no node of the module in the Dynamo graph"):
        split_layer(gm, TokenSplit("L__self___other", "L['self'].other", 2, 0))


# ------------------------------------------------------------------------------------------------ 2 ranks, numerics

#: bf16 has 8 significant bits: a routed expert weight's gradient, summed over the ranges' bf16 partials (where the
#: whole layer rounds one bf16 product), may differ by a few units of bf16 rounding of its largest entry
BF16_REL = 2.0 ** -6


def _step(model: torch.nn.Module, fn, idx: torch.Tensor, tgt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and every parameter's gradient (an EP-sharded weight's local shard) of one step; grads stay on model."""
    model.zero_grad(set_to_none=True)
    loss = fn(idx, tgt)
    loss.backward()
    out = {"loss": loss.detach().clone()}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[n] = (g.to_local() if hasattr(g, "to_local") else g).clone()
    return out


def _differences(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """What differs beyond the upstream tests' tolerance; routed expert weights beyond bf16 rounding."""
    assert ref.keys() == got.keys(), sorted(ref.keys() ^ got.keys())
    bad = {}
    for k in ref:
        r, g = ref[k], got[k]
        if "routed_experts" in k:
            ok = bool((g - r).abs().max() <= BF16_REL * r.abs().max())
        else:
            ok = torch.allclose(g, r, rtol=RTOL, atol=ATOL)
        if not ok:
            bad[k] = float((g - r).abs().max())
    return bad


def _ep_job(rank: int, world_size: int, options: dict, steps: int, batch_size: int | list[int],
            overrides: dict) -> dict:
    """``steps`` SGD steps of the tiny titan model on this rank's batches (``batch_size`` tokens rows, or one size per
    step), eager then compiled on the same weights; what differed, and what the backend reported."""
    import fsmoe_compiler
    from fsmoe_compiler import records, split_choice

    gc.collect()  # whole-or-split graphs of earlier jobs on this rank: only this job's are counted
    earlier = list(split_choice._LIVE)
    base = split_choice.unsettled()
    with titan_settings_restored(), torch._dynamo.config.patch(**ONE_GRAPH):
        model = build(**overrides)
        sharded = sorted({type(p).__name__ for n, p in model.named_parameters() if "inner_experts" in n})
        compiled = torch.compile(model, backend="fsmoe", options=options, fullgraph=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=False)
        bad, losses, unsettled, worst_expert = [], [], [], 0.0
        sizes = batch_size if isinstance(batch_size, list) else [batch_size] * steps
        for step in range(steps):
            idx, tgt = batch(sizes[step], seed=1000 * step + rank)
            ref = _step(model, model, idx, tgt)
            got = _step(model, compiled, idx, tgt)  # the compiled step's gradients stay for the optimizer
            bad.append(_differences(ref, got))
            losses.append((float(ref["loss"]), float(got["loss"])))
            worst_expert = max([worst_expert] + [float((got[k] - ref[k]).abs().max() / ref[k].abs().max())
                                                 for k in ref if "routed_experts" in k])
            unsettled.append(split_choice.unsettled() - base)
            opt.step()
        choices = [(c.chosen, dict(c.runs)) for c in list(split_choice._LIVE) if not any(c is e for e in earlier)]
        rep = fsmoe_compiler.report(compiled)
        recs = records.records_for(compiled)
        return {
            "rank": rank,
            "sharded": sharded,
            "bad": bad,
            "losses": losses,
            "worst_expert": worst_expert,
            "unsettled": unsettled,
            "choices": choices,
            "fallbacks": rep.fallbacks(),
            "records": len(recs),
            "token_split": [list(r.token_split or []) for r in recs],
            "regions": {kind: [(r.layer, r.tokens, bool(r.nodes.get("shared_expert")),
                                all(r.nodes.get(role) for role in CORE_ROLES), len(r.all_to_all))
                               for r in rep.regions(kind)] for kind in ("forward", "backward")},
            "schedules": {kind: len(rep.schedules(kind)) for kind in ("forward", "backward")},
            "measured": {kind: [len(s.measured_calls_ms) for s in rep.schedules(kind)] for kind in ("forward", "backward")},
        }


OPTIONS_EP = {"pipeline_degree": "auto", "max_degree": 2, "profile_steps": 2, "time_limit_s": 0.05}
STEPS_EP = 5  # warm-up, 2 profiling calls, a timed and a plain scheduled call
BATCH_EP = 4  # x 16 positions: 64 tokens per rank


def _check_equal_to_eager(results: list[dict], what: str) -> None:
    for res in results:
        where = f"{what} rank {res['rank']}"
        assert res["sharded"] == ["DTensor"], f"{where}: experts not sharded by EP: {res['sharded']}"
        for step, bad in enumerate(res["bad"]):
            assert not bad, f"{where} step {step}: fsmoe differs from eager: {bad} (losses {res['losses']})"
        as_traced = [c for c, _ in res.get("choices", []) if c == "as traced"]  # then the compiled graphs never run
        assert all(f.split(": ", 1)[1].startswith("runs as traced: Dynamo's graph") for f in res["fallbacks"]) \
            if as_traced else res["fallbacks"] == [], f"{where}: {res['fallbacks']}"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("chunks, overrides, batch_size", [
    (2, {}, BATCH_EP),
    (4, {}, BATCH_EP),
    (2, {"score_func": "sigmoid"}, BATCH_EP),
    (2, {"shared_expert": True}, BATCH_EP),
    (2, {}, 2),  # the batch size equals the EP size: the count exchange's view(ep, -1) is no token count
    (2, {}, 3),  # an odd batch: split along the sequence
], ids=["softmax-2", "softmax-4", "sigmoid-2", "shared-2", "batch-equals-ep", "sequence"])
def test_split_tokens_on_two_ranks_equals_eager_and_is_scheduled_per_range(rank_pool, chunks, overrides, batch_size):
    options = dict(OPTIONS_EP, split_tokens=chunks)
    results = rank_pool.run(_ep_job, (options, STEPS_EP, batch_size, overrides), timeout_s=300)
    what = f"split_tokens={chunks} {overrides}"
    _check_equal_to_eager(results, what)
    shared = bool(overrides.get("shared_expert"))
    for res in results:
        where = f"{what} rank {res['rank']}"
        assert res["records"] == 1, where
        (notes,) = res["token_split"]
        assert f"forward: MoE layer 0 (L['self'].blocks.0.moe): tokens split into {chunks} ranges before routing " \
               f"(split_tokens={chunks})" in notes, (where, notes)
        dim = 0 if batch_size % chunks == 0 else 1
        assert f"dynamo: MoE layer 0: L['self'].blocks.0.moe: {chunks} token ranges along dim {dim} of value " \
               f"[{batch_size}, 16, {MODEL['d_model']}]" in notes, (where, notes)
        assert not any("not split" in n for n in notes), (where, notes)
        fw, bw = res["regions"]["forward"], res["regions"]["backward"]
        tokens = batch_size * 16 // chunks
        assert fw == [(k, tokens, shared, True, 3) for k in range(chunks)], (where, fw)
        assert [(r[0], r[2], r[3], r[4]) for r in bw] == [(k, shared, True, 2) for k in range(chunks)], (where, bw)
        assert res["schedules"] == {"forward": 1, "backward": 1}, (where, res["schedules"])
        assert all(m and m[0] >= 1 for m in res["measured"].values()), (where, res["measured"])


BATCH_AUTO = 32  # x 16 positions: 512 tokens per rank, auto_ranges -> 2
STEPS_AUTO = 32  # on loopback both ranks settled after 24 steps (three variants, 4 timed calls each)


@pytest.mark.timeout(400)
def test_split_tokens_auto_measures_both_graphs_settles_and_equals_eager_at_every_step(rank_pool):
    """``"auto"`` compiles the whole and the split graph, runs them and the graph as traced in turn until each is
    timed, then keeps the fastest: every step equals eager whichever ran, and the choice settles on both ranks at the
    same step."""
    assert auto_ranges(BATCH_AUTO * 16) == 2
    options = dict(OPTIONS_EP, split_tokens="auto")
    results = rank_pool.run(_ep_job, (options, STEPS_AUTO, BATCH_AUTO, {}), timeout_s=300)
    _check_equal_to_eager(results, "split_tokens=auto")
    settled_at = []
    for res in results:
        where = f"auto rank {res['rank']}"
        assert res["unsettled"][0] == 1 and res["unsettled"][-1] == 0, (where, res["unsettled"])
        settled_at.append(res["unsettled"].index(0))
        ((chosen, runs),) = res["choices"]
        assert chosen in ("as traced", "whole", "2 ranges"), (where, chosen)
        assert runs["as traced"] > 0 and runs["whole"] > 0 and runs["2 ranges"] > 0, (where, chosen, runs)
        assert res["records"] == 1, where  # the loser's record is dropped from the report
        (notes,) = res["token_split"]
        assert any(n.startswith(f"token split: {chosen} chosen") for n in notes), (where, notes)
        fw, bw = res["regions"]["forward"], res["regions"]["backward"]
        n = 2 if chosen == "2 ranges" else 1
        tokens = BATCH_AUTO * 16 // n
        assert fw == [(k, tokens, False, True, 3) for k in range(n)], (where, chosen, fw)
        assert [r[0] for r in bw] == list(range(n)), (where, chosen, bw)
        assert res["schedules"] == {"forward": 1, "backward": 1}, (where, res["schedules"])
    assert settled_at[0] == settled_at[1], settled_at
    assert results[0]["choices"] == results[1]["choices"], [r["choices"] for r in results]


def _fail_in_trace(x):
    raise RuntimeError("a size the split did not follow")


def _split_that_fails_in_no_grad(original):
    """``split_layer``, then a call that raises when traced, right after the graph's first ``no_grad`` entry (where
    torchtitan's count exchange runs, and where a wrongly rescaled ``view(ep, -1)`` failed)."""

    def split_layer_failing(gm: fx.GraphModule, split: TokenSplit) -> str:
        done = original(gm, split)
        off = next(n for n in gm.graph.nodes if n.target is torch._C._set_grad_enabled and n.args == (False,))
        with gm.graph.inserting_after(off):
            gm.graph.call_function(_fail_in_trace, (off,))
        gm.recompile()
        return done

    return split_layer_failing


def _failing_split_job(rank: int, world_size: int, options: dict, steps: int) -> dict:
    import fsmoe_compiler.passes.split_tokens as st

    with mock.patch.object(st, "split_layer", _split_that_fails_in_no_grad(st.split_layer)):
        return _ep_job(rank, world_size, options, steps, BATCH_EP, {})


@pytest.mark.timeout(400)
def test_a_split_graph_that_fails_to_trace_leaves_the_whole_graph_with_every_gradient(rank_pool):
    """The split graph's trace fails inside the graph's ``no_grad`` block: the backend compiles the whole graph, says
    why, and the whole graph gives eager's loss and every gradient (it gave none to the parameters before the
    MoE layer's count exchange: the failed trace had left grad mode off)."""
    options = dict(OPTIONS_EP, split_tokens=2)
    results = rank_pool.run(_failing_split_job, (options, 2), timeout_s=300)
    _check_equal_to_eager(results, "failed split")
    for res in results:
        (notes,) = res["token_split"]
        assert notes[-1].startswith(  # after the request and the split it tried
            "dynamo: tokens not split (the split graph failed to compile: RuntimeError: a size the split did not "
            "follow"), notes
        assert [r[0] for r in res["regions"]["forward"]] == [0], res["regions"]


# ------------------------------------------------------------------------------------------------ DeepSeek-V3 routing


def _dsv3_job(rank: int, world_size: int, options: dict, steps: int, layers: int) -> dict:
    """upstream_titan's block (a projection, then torchtitan MoE layers with group-limited sigmoid routing, an
    expert bias and a shared expert), EP over the 2 ranks; eager and compiled steps on the same weights."""
    import fsmoe_compiler
    import upstream_titan as ut
    from fsmoe_compiler import records

    with ut.titan_ep(world_size) as dims, torch._dynamo.config.patch(**ONE_GRAPH):
        model = ut.make_block("dsv3-sigmoid-grouped-shared", layers=layers, ep=dims)
        compiled = torch.compile(model, backend="fsmoe", options=options, fullgraph=True)
        bad = []
        for step in range(steps):
            x = ut.inputs(step, rank)
            got = {}
            for fn, out in ((model, {}), (compiled, got)):
                model.zero_grad(set_to_none=True)
                x.grad = None
                loss = fn(x)
                loss.backward()
                out.update({"loss": loss.detach().clone(), "input": x.grad.clone()})
                out.update({n: ut.local(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None})
                if fn is model:
                    ref = out
            bad.append(_differences(ref, got))
            ut.update_expert_bias(model)
        rep = fsmoe_compiler.report(compiled)
        return {
            "rank": rank, "bad": bad, "fallbacks": rep.fallbacks(),
            "token_split": [list(r.token_split or []) for r in records.records_for(compiled)],
            "regions": {kind: [(r.layer, r.router, r.top_k, bool(r.nodes.get("shared_expert")),
                                all(r.nodes.get(role) for role in CORE_ROLES)) for r in rep.regions(kind)]
                        for kind in ("forward", "backward")},
            "schedules": {kind: len(rep.schedules(kind)) for kind in ("forward", "backward")},
        }


@pytest.mark.timeout(400)
def test_two_dsv3_layers_split_on_two_ranks_equal_eager(rank_pool):
    """Group-limited sigmoid routing (three top-k calls per layer; the group view is an ``unflatten``), an expert
    bias updated between steps and a shared expert, two layers, batch 2 = the EP size: each layer on 2 token
    ranges, 4 regions in each graph with their shared experts, equal to eager at every step once scheduled."""
    options = dict(OPTIONS_EP, split_tokens=2)
    results = rank_pool.run(_dsv3_job, (options, STEPS_EP, 2), timeout_s=300)
    for res in results:
        where = f"dsv3 rank {res['rank']}"
        for step, bad in enumerate(res["bad"]):
            assert not bad, f"{where} step {step}: fsmoe differs from eager: {bad}"
        assert res["fallbacks"] == [], (where, res["fallbacks"])
        (notes,) = res["token_split"]
        assert sum("2 token ranges along dim 0" in n for n in notes) == 2, (where, notes)
        for kind in ("forward", "backward"):
            assert res["regions"][kind] == [(k, "sigmoid-topk", 3, True, True) for k in range(4)], (where, kind,
                                                                                                    res["regions"])
        assert res["schedules"] == {"forward": 1, "backward": 1}, (where, res["schedules"])


def test_auto_splits_the_titan_layer_with_enough_tokens_because_it_cannot_chunk_after_dispatch():
    g = capture(None, batch_size=32)
    fw, (region,) = g["whole"].forward[0], g["fw_regions"]
    assert region.tokens == 512
    (s,), (note,) = splits_for(fw, [region], "auto")
    assert (s.path, s.chunks) == ("L['self'].blocks.0.moe", auto_ranges(512)) == ("L['self'].blocks.0.moe", 2)
    assert note.startswith("forward: MoE layer 0 (L['self'].blocks.0.moe): tokens split into 2 ranges before "
                           "routing (") and "bfloat16 GEMM split along its contraction dim" in note, note


@pytest.mark.timeout(400)
@pytest.mark.parametrize("extra", [{"split_tokens": 1}, {"split_tokens": 2, "scheduler": "sequential"}],
                         ids=["split_tokens=1", "sequential-baseline"])
def test_split_tokens_1_and_the_sequential_baseline_run_the_layer_whole(rank_pool, extra):
    options = dict(OPTIONS_EP, **extra)
    results = rank_pool.run(_ep_job, (options, 2, BATCH_EP, {}), timeout_s=300)
    _check_equal_to_eager(results, str(extra))
    for res in results:
        assert res["token_split"] == [[]], res["token_split"]
        assert [r[0] for r in res["regions"]["forward"]] == [0] and [r[0] for r in res["regions"]["backward"]] == [0]
        assert res["choices"] == [], res["choices"]


def _slow_split_job(rank: int, world_size: int, options: dict, steps: int, delay_s: float) -> dict:
    import time

    import fsmoe_compiler.backend as backend

    original = backend._split_dynamo_graph

    def slow(*args, **kwargs):
        time.sleep(delay_s)
        return original(*args, **kwargs)

    with mock.patch.object(backend, "_split_dynamo_graph", slow if rank == 0 else original):
        return _ep_job(rank, world_size, options, steps, BATCH_EP, {})


@pytest.mark.timeout(400)
def test_a_rank_still_splitting_its_graph_is_not_taken_for_a_failed_one(rank_pool):
    """The forward graph compiler asks for the split by raising ``SplitTokensFirst``: a request, not a failure.
    Rank 0 takes 3 s longer to split: rank 1, done first, waits for it at their first exchange (it had stopped
    with ``RankGone: ... rank 0 failed the forward graph ...: SplitTokensFirst``, now and then, when rank 0
    was slower)."""
    options = dict(OPTIONS_EP, split_tokens=2)
    results = rank_pool.run(_slow_split_job, (options, 2, 3.0), timeout_s=300)
    _check_equal_to_eager(results, "slow split")
    for res in results:
        assert [r[0] for r in res["regions"]["forward"]] == [0, 1], res["regions"]


@pytest.mark.timeout(400)
def test_a_dynamic_batch_recompile_is_left_whole_with_a_note_and_equals_eager(rank_pool):
    """A new batch size makes Dynamo recompile with a symbolic batch: the layer's token counts are symbolic then and
    are not rescaled, so the split is refused before tracing (it used to split along the sequence and fail in
    aot_autograd on ``view(s0*16, 64)``, compiling once more per batch size); the first graph stays split."""
    options = dict(OPTIONS_EP, split_tokens=2)
    results = rank_pool.run(_ep_job, (options, 4, [4, 2, 6, 2], {}), timeout_s=300)
    _check_equal_to_eager(results, "dynamic batch")
    for res in results:
        first, second = res["token_split"]
        assert any("2 token ranges along dim 0 of value [4, 16, 64]" in n for n in first), first
        assert any(n.startswith("dynamo: MoE layer 0 (L['self'].blocks.0.moe): tokens not split (its input value [")
                   and n.endswith(", 16, 64] has a dynamic token dim (static sizes only))") for n in second), second
        assert not any("failed to compile" in n for n in second), second


def _split_wins_job(rank: int, world_size: int, options: dict, steps: int, batch_size: int) -> dict:
    """``_ep_job`` with the graph as traced and the whole graph measured 10x slower than they ran (as on a slow link,
    where split wins)."""
    from fsmoe_compiler import split_choice

    original = split_choice.SplitOrWhole._measured

    def measured(self):  # the graph as traced and the whole compiled graph: 10x slower
        m = original(self)
        return (*(None if ms is None else 10 * ms for ms in m[:2]), *m[2:])

    with mock.patch.object(split_choice.SplitOrWhole, "_measured", measured):
        return _ep_job(rank, world_size, options, steps, batch_size, {})


@pytest.mark.timeout(400)
def test_split_tokens_auto_keeps_the_split_graph_when_it_measures_faster(rank_pool):
    options = dict(OPTIONS_EP, split_tokens="auto")
    results = rank_pool.run(_split_wins_job, (options, STEPS_AUTO, BATCH_AUTO), timeout_s=300)
    _check_equal_to_eager(results, "auto, split faster")
    for res in results:
        where = f"auto rank {res['rank']}"
        ((chosen, runs),) = res["choices"]
        assert chosen == "2 ranges" and res["unsettled"][-1] == 0, (where, chosen, res["unsettled"])
        (notes,) = res["token_split"]  # the whole graph's record is dropped: the report shows the split one
        assert any(n.startswith("token split: 2 ranges chosen") for n in notes), (where, notes)
        assert [r[0] for r in res["regions"]["forward"]] == [0, 1], (where, res["regions"])
        assert [r[0] for r in res["regions"]["backward"]] == [0, 1], (where, res["regions"])


def test_the_report_says_which_variant_was_chosen():
    from fsmoe_compiler import records
    from fsmoe_compiler.introspect import Explanation

    rec = records.new_record(None, [])
    rec.token_split = ["dynamo: MoE layer 0: x: 4 token ranges along dim 0 of x [8, 16, 64]",
                       "token split: 4 ranges chosen, forward + backward measured 10.0 ms (slowest rank, median calls) "
                       "against whole 20.0 ms"]
    try:
        text = Explanation([rec]).render()
    finally:
        records.drop(rec)
    assert "note: token split: 4 ranges chosen, forward + backward measured 10.0 ms" in text
    assert "note: dynamo: MoE layer 0" not in text  # the graph's own notes say what was split

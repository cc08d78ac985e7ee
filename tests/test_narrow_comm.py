"""``passes.narrow_comm``: an all-to-all sends bf16 only where that gives the same bits.

Small graphs (rank 0 of a fake 2-rank group; an all-to-all replaced by a copy
when run) check which exchanges are narrowed, on which side, and that the
outputs are bit for bit those of the graph as traced. On 2 gloo ranks,
torchtitan's MoE layer compiled with and without the pass gives identical
losses and gradients, with three of its four token exchanges in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

pytest.importorskip("torch.distributed")

from fsmoe_compiler.config import FSMoEConfig  # noqa: E402
from fsmoe_compiler.passes.context import PassContext  # noqa: E402
from fsmoe_compiler.passes.narrow_comm import narrow_comm, narrowed_dtype  # noqa: E402
from fsmoe_compiler.passes.verify import graph_signature, verify  # noqa: E402
from graph_capture import fake_world, run_with_identity_all_to_all  # noqa: E402

aten = torch.ops.aten
A2A = torch.ops._c10d_functional.all_to_all_single.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
ROWS, DIM = 8, 4


@pytest.fixture(scope="module", autouse=True)
def two_ranks():
    with fake_world(rank=0, world_size=2):
        yield


def _exchange(g: fx.Graph, x: fx.Node) -> fx.Node:
    return g.call_function(WAIT, (g.call_function(A2A, (x, [4, 4], [4, 4], "0")),))


def _graph(build) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A graph of placeholders ``x`` (f32 rows), ``h`` (bf16 rows), ``w`` (bf16 weight), ``s`` (f32 scores),
    ``perm`` (a row permutation), with ``build(g, x, h, w, s, perm)`` giving the outputs; fake values propagated."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    g = fx.Graph()
    x, h, w, s, perm = (g.placeholder(n) for n in ("x", "h", "w", "s", "perm"))
    g.output(build(g, x, h, w, s, perm))
    gm = fx.GraphModule(torch.nn.Module(), g)
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(ROWS, DIM, generator=gen), torch.randn(ROWS, DIM, generator=gen).bfloat16(),
            torch.randn(DIM, DIM, generator=gen).bfloat16(), torch.rand(ROWS, 1, generator=gen),
            torch.randperm(ROWS, generator=gen)]
    mode = FakeTensorMode()
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(a) for a in args])
    return gm, args


def _dispatch(g, x, h, w, s, perm):
    """Received rows gathered into expert order, cast to bf16 for the GEMM (torchtitan's dispatch)."""
    rows = g.call_function(aten.index.Tensor, (_exchange(g, x), [perm]))
    return (g.call_function(aten.mm.default, (g.call_function(aten._to_copy.default, (rows,), {"dtype": torch.bfloat16}),
                                              w)),)


def _combine(g, x, h, w, s, perm):
    """bf16 expert output cast to fp32, written back in token order into a blank buffer, sent, scaled."""
    wide = g.call_function(aten._to_copy.default, (h,), {"dtype": torch.float32})
    blank = g.call_function(aten.new_empty.default, (wide, [ROWS, DIM]))
    back = g.call_function(aten.index_put.default, (blank, [perm], wide))
    out = _exchange(g, back)
    return (g.call_function(aten.mul.Tensor, (out, s)), out)  # the received tensor is saved, as for backward


def _sum_then_scale(g, x, h, w, s, perm):
    """The fp32 sum of two bf16 values is sent and used in fp32: no side holds."""
    a = g.call_function(aten._to_copy.default, (h,), {"dtype": torch.float32})
    b = g.call_function(aten._to_copy.default, (g.call_function(aten.neg.default, (h,)),), {"dtype": torch.float32})
    summed = g.call_function(aten.add.Tensor, (a, g.call_function(aten.mul.Tensor, (b, s))))
    return (g.call_function(aten.mul.Tensor, (_exchange(g, summed), s)),)


def _used_wide(g, x, h, w, s, perm):
    """One use of the received rows is fp32 arithmetic: they stay fp32."""
    got = _exchange(g, x)
    cast = g.call_function(aten._to_copy.default, (got,), {"dtype": torch.bfloat16})
    return (g.call_function(aten.mm.default, (cast, w)), g.call_function(aten.relu.default, (got,)))


def _accumulated(g, x, h, w, s, perm):
    """Rows of bf16 values added into a buffer (``index_put`` with accumulate) may not be bf16 values."""
    wide = g.call_function(aten._to_copy.default, (h,), {"dtype": torch.float32})
    zeros = g.call_function(aten.new_zeros.default, (wide, [ROWS, DIM]))
    acc = g.call_function(aten.index_put.default, (zeros, [perm], wide, True))
    return (g.call_function(aten.mul.Tensor, (_exchange(g, acc), s)),)


def _ctx(**options) -> PassContext:
    return PassContext(graph_kind="forward", config=FSMoEConfig.from_options(options))


@pytest.mark.parametrize("build, side", [(_dispatch, "received"), (_combine, "sent")])
def test_an_exchange_whose_payload_is_exact_in_bf16_sends_bf16_and_the_outputs_keep_their_bits(build, side):
    gm, args = _graph(build)
    want = run_with_identity_all_to_all(gm, *args)
    (coll,) = [n for n in gm.graph.nodes if n.target is A2A]
    assert narrowed_dtype(coll) == (torch.bfloat16, side)
    ctx = _ctx()
    before = ctx.original = graph_signature(gm)
    narrow_comm(gm, ctx)
    (coll,) = [n for n in gm.graph.nodes if n.target is A2A]
    assert coll.args[0].target is aten._to_copy.default and coll.args[0].kwargs == {"dtype": torch.bfloat16}
    assert coll.meta["val"].dtype == torch.bfloat16
    (wait,) = coll.users
    assert wait.meta["val"].dtype == torch.bfloat16
    (up,) = wait.users
    assert up.target is aten._to_copy.default and up.kwargs == {"dtype": torch.float32}
    assert up.meta["val"].dtype == torch.float32 and up.meta["val"].shape == wait.meta["val"].shape
    assert ctx.notes == [f"forward: {coll.name} sends bfloat16 instead of float32 ("
                         f"{'every use of it is cast to' if side == 'received' else 'its values were all cast from'} "
                         f"bfloat16; exact, half the bytes)"]
    assert ctx.original != before and ctx.original == graph_signature(gm)
    verify(gm, ctx)  # the later passes compare against the narrowed graph
    got = run_with_identity_all_to_all(gm, *args)
    assert len(got) == len(want)
    for g_, w_ in zip(got, want):
        assert g_.dtype == w_.dtype and torch.equal(g_, w_)


@pytest.mark.parametrize("build", [_sum_then_scale, _used_wide, _accumulated])
def test_an_exchange_whose_payload_would_round_is_left_as_it_is(build):
    gm, _ = _graph(build)
    code = gm.code
    ctx = _ctx()
    ctx.original = before = graph_signature(gm)
    narrow_comm(gm, ctx)
    assert gm.code == code and ctx.notes == [] and ctx.original is before


def test_narrow_comm_false_leaves_the_graph_as_traced():
    gm, _ = _graph(_dispatch)
    code = gm.code
    narrow_comm(gm, _ctx(narrow_comm=False))
    assert gm.code == code


def test_narrow_comm_option_must_be_a_bool():
    with pytest.raises(ValueError, match="'narrow_comm' must be True or False, got 'yes'"):
        FSMoEConfig.from_options({"narrow_comm": "yes"})


# ------------------------------------------------------------------------------------------------ torchtitan, 2 ranks

OPTIONS = {"pipeline_degree": "auto", "max_degree": 2, "profile_steps": 2, "time_limit_s": 0.05}
STEPS = 5  # warm-up, 2 profiling calls, a timed and a plain scheduled call


def _titan_job(rank: int, world_size: int, split_tokens: int) -> dict:
    """torchtitan's Qwen3-style MoE block, EP over the 2 ranks, compiled with and without ``narrow_comm`` on the
    same weights: the two runs' losses and gradients, compared bit for bit, and the notes of the narrowed one."""
    import fsmoe_compiler
    import upstream_titan as ut

    with ut.titan_ep(world_size) as dims, torch._dynamo.config.patch(capture_scalar_outputs=True,
                                                                      capture_dynamic_output_shape_ops=True):
        runs = {}
        for narrow in (True, False):
            model = ut.make_block("qwen3-softmax", ep=dims)
            compiled = torch.compile(model, backend="fsmoe", fullgraph=True,
                                     options=dict(OPTIONS, split_tokens=split_tokens, narrow_comm=narrow))
            steps = []
            for step in range(STEPS):
                x = ut.inputs(step, rank)
                model.zero_grad(set_to_none=True)
                loss = compiled(x)
                loss.backward()
                steps.append({"loss": loss.detach(), "input": x.grad,
                              **{n: ut.local(p.grad).clone() for n, p in model.named_parameters()
                                 if p.grad is not None}})
            rep = fsmoe_compiler.report(compiled)
            runs[narrow] = steps, rep.fallbacks(), {kind: [n for g in rep.graphs(kind) for n in g.notes
                                                           if " sends " in n] for kind in ("forward", "backward")}
        (on, on_fallbacks, notes), (off, off_fallbacks, _) = runs[True], runs[False]
        differ = [(step, k) for step, (a, b) in enumerate(zip(on, off)) for k in a if not torch.equal(a[k], b[k])]
        return {"rank": rank, "differ": differ, "fallbacks": on_fallbacks + off_fallbacks, "notes": notes}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("split_tokens", [1, 2])
def test_torchtitan_layer_sends_three_of_its_four_token_exchanges_in_bf16_with_the_same_bits(rank_pool, split_tokens):
    """Dispatch (received rows cast to bf16) and combine (bf16 expert output) in the forward, the output gradient's
    exchange in the backward; the expert-input gradient, an fp32 sum of two GEMMs' gradients, stays fp32."""
    results = rank_pool.run(_titan_job, (split_tokens,), timeout_s=300)
    for res in results:
        where = f"rank {res['rank']} split_tokens={split_tokens}"
        assert res["differ"] == [], (where, res["differ"])
        assert res["fallbacks"] == [], (where, res["fallbacks"])
        fw, bw = res["notes"]["forward"], res["notes"]["backward"]
        assert len(fw) == 2 * split_tokens and len(bw) == split_tokens, (where, fw, bw)
        assert all("sends bfloat16 instead of float32" in n for n in fw + bw), (where, fw, bw)
        assert sum("every use of it is cast to" in n for n in fw) == split_tokens, (where, fw)
        assert all("every use of it is cast to" in n for n in bw), (where, bw)

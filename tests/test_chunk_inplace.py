"""Hand-written expert parallelism with in-place all-to-alls is chunked, on 2 real gloo ranks.

The styles (``moe_styles.InplaceA2AMoE``, dropless, and
``moe_styles.InplaceCapacityA2AMoE``, capacity with ``recv[e]``) write
``dist.all_to_all_single(out, inp)``, which Dynamo traces as the functional
all-to-all, a ``wait_tensor`` and an ``aten.copy`` into the preallocated
buffer; the capacity style then indexes the received buffer per expert
(``recv[e]``, an ``aten.select``). Both have chunking rules: at degree 2 the
chunked graphs equal eager (output and every gradient), and under
``pipeline_degree="auto"`` degree 2 is built and profiled (never dropped for
lack of a rule), so the planner can choose it.
"""

from __future__ import annotations

import pytest
import torch

import moe_styles as ms
from test_chunk_numerics import chunking_backend

STYLES = {"dropless": ms.InplaceA2AMoE, "capacity-select": ms.InplaceCapacityA2AMoE}
ONE_GRAPH = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}
RTOL, ATOL = 1e-4, 1e-5


def _inputs(rank: int, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 12, 16, generator=g).requires_grad_()


def _grads(model: torch.nn.Module, fn, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x.grad = None
    y = fn(x)
    loss = y.pow(2).mean()
    loss.backward()
    return {"loss": loss.detach(), "input": x.grad.clone(),
            **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def _bad(ref: dict, got: dict) -> dict[str, float]:
    assert ref.keys() == got.keys(), sorted(ref.keys() ^ got.keys())
    return {k: float((got[k] - ref[k]).abs().max()) for k in ref
            if not torch.allclose(got[k], ref[k], rtol=RTOL, atol=ATOL)}


def _chunked_job(rank: int, world_size: int, style: str) -> dict:
    torch.manual_seed(0)
    model = ms.Block(STYLES[style]())
    infos: list = []
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**ONE_GRAPH):
        compiled = torch.compile(model, backend=chunking_backend(2, infos), fullgraph=True)
        x = _inputs(rank)
        bad = _bad(_grads(model, model, x), _grads(model, compiled, x))
    return {"bad": bad, "chunking": [(kind, {k: (i.degree, i.along, i.reason) for k, i in c.items()})
                                     for kind, c, _, _ in infos]}


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("style", list(STYLES))
def test_inplace_all_to_all_styles_chunked_to_two_equal_eager(rank_pool, style):
    along = "hidden" if style == "dropless" else "capacity"
    for res in rank_pool.run(_chunked_job, (style,), timeout_s=150):
        assert not res["bad"], f"{style}: chunked differs from eager: {res['bad']}"
        assert res["chunking"] == [("forward", {0: (2, along, None)}), ("backward", {0: (2, along, None)})], res


def _auto_job(rank: int, world_size: int, style: str) -> dict:
    import fsmoe_compiler

    torch.manual_seed(0)
    model = ms.Block(STYLES[style]())
    options = {"pipeline_degree": "auto", "max_degree": 2, "profile_steps": 2, "time_limit_s": 0.05}
    torch._dynamo.reset()
    bad = []
    with torch._dynamo.config.patch(**ONE_GRAPH):
        compiled = torch.compile(model, backend="fsmoe", options=options, fullgraph=True)
        for step in range(5):  # warm-up, a profiling call per degree, then the swapped-in graph
            x = _inputs(rank, step)
            bad.append(_bad(_grads(model, model, x), _grads(model, compiled, x)))
    rep = fsmoe_compiler.report(compiled)
    scheds = {g.kind: g.schedule for g in rep.graphs()}
    return {"bad": bad, "fallbacks": rep.fallbacks(),
            "candidates": {k: sorted(s.candidates) if s else None for k, s in scheds.items()},
            "notes": {k: list(s.notes) if s else None for k, s in scheds.items()}}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("style", list(STYLES))
def test_auto_profiles_degree_two_for_inplace_all_to_all_styles(rank_pool, style):
    """"auto" is not pinned to one chunk: degree 2 is a profiled candidate in both graphs, and every step
    (before and after the swap) equals eager."""
    for res in rank_pool.run(_auto_job, (style,), timeout_s=240):
        for step, bad in enumerate(res["bad"]):
            assert not bad, f"{style} step {step}: fsmoe differs from eager: {bad}"
        assert res["fallbacks"] == [], res["fallbacks"]
        assert res["candidates"] == {"forward": [1, 2], "backward": [1, 2]}, res
        for kind, notes in res["notes"].items():
            assert not [n for n in notes if "not applied" in n or "not profiled" in n or "dropped" in n], notes

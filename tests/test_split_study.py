"""``fsmoe_compiler.bench.split_study``: every hand-written chunking of a dropless layer computes the same layer.

The study times four ways to pipeline a dropless expert-parallel layer (r = 1,
hidden-dim chunks, token ranges, token groups with their own counts); a timing
means something only if the variants compute the same thing. On 2 gloo ranks
at tiny sizes, each variant's forward (expert outputs summed per token) equals
the unchunked one, and each backward runs.
"""

from __future__ import annotations

import pytest
import torch


def _job(rank: int, world_size: int) -> dict:
    from fsmoe_compiler.bench import split_study as st

    L = st.Layer(rank, world_size, tokens=16, top_k=2, experts=4, d_model=8, d_ff=16)
    want = st.forward_by_token(L, "sequential", 1)
    errors = {}
    for name, r in (("hidden", 2), ("hidden", 4), ("token", 2), ("token", 3), ("groups", 2), ("groups", 4)):
        got = st.forward_by_token(L, name, r)
        errors[f"{name} r={r}"] = float((got - want).abs().max())
        st.VARIANTS[name](L, r)[1]()  # the backward runs
    return {"errors": errors, "scale": float(want.abs().max())}


@pytest.mark.timeout(120)
def test_every_variant_computes_the_unchunked_layer(rank_pool):
    for res in rank_pool.run(_job, timeout_s=90):
        assert res["scale"] > 0
        bad = {k: v for k, v in res["errors"].items() if v > 1e-5 * max(res["scale"], 1.0)}
        assert not bad, bad


def test_the_study_says_what_it_runs(capsys):
    from fsmoe_compiler.bench import split_study as st

    with pytest.raises(SystemExit):
        st.main(["--help"])
    out = capsys.readouterr().out
    assert "hidden" in out and "groups" in out and "--emulate-link" in out

"""Ranks that disagree about the model fail with a clear error on every rank, never a hang."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from fsmoe_compiler.launch import RankError

# The per-expert loop (torch.where -> index_add_) has data-dependent shapes: one graph needs these.
ONE_GRAPH = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}


def _different_expert_counts(rank: int, world_size: int) -> None:
    import moe_styles  # the third-party-style blocks in tests/; no collectives of their own

    torch.manual_seed(0)
    model = moe_styles.LoopMoE(num_experts=4 if rank == 0 else 8)
    compiled = torch.compile(model, backend="fsmoe")
    with torch._dynamo.config.patch(**ONE_GRAPH):
        compiled(torch.randn(2, 4, 16)).sum().backward()


def _same_model(rank: int, world_size: int) -> int:
    import fsmoe_compiler
    import moe_styles

    torch.manual_seed(0)
    model = moe_styles.LoopMoE(num_experts=4)
    compiled = torch.compile(model, backend="fsmoe")
    with torch._dynamo.config.patch(**ONE_GRAPH):
        compiled(torch.randn(2, 4, 16)).sum().backward()
    return len(fsmoe_compiler.report(compiled).regions("forward"))


@pytest.mark.timeout(240)
def test_ranks_that_found_different_regions_raise_naming_both(rank_pool):
    with pytest.raises(RankError, match=r"rank \d found MoE regions .* but rank \d found .*all ranks must run the same model"):
        rank_pool.run(_different_expert_counts, timeout_s=180, pg_timeout_s=60)


@pytest.mark.timeout(240)
def test_ranks_that_agree_compile_normally(rank_pool):
    assert rank_pool.run(_same_model, timeout_s=180) == [1, 1]


# ------------------------------------------------------------------------------------------------------------
# a data-dependent recompile on one rank only

D, FF, E = 16, 32, 4
RECOMPILE_STEPS = 10  # rank 1 recompiles at step 2; warm-up and the default 6 profiling calls after that


class _Block(torch.nn.Module):
    """A projection, the project's dropless expert-parallel MoE layer and a residual."""

    def __init__(self) -> None:
        super().__init__()
        from fsmoe_compiler.moe import MoELayer

        self.proj = torch.nn.Linear(D, D)
        self.moe = MoELayer(D, FF, E, router="gshard", dispatch="dropless")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, aux = self.moe(self.proj(x))
        return (x + y).pow(2).mean() + 0.01 * aux


def _tokens(rank: int, step: int) -> int:
    """Rank-local data: rank 1's batches shrink from step 2 on (Dynamo recompiles there with a dynamic size)."""
    return 16 if rank == 1 and step >= 2 else 24


def _recompile_on_one_rank(rank: int, world_size: int, steps: int) -> dict:
    import fsmoe_compiler
    from moe_cases import ONE_GRAPH

    torch.manual_seed(0)
    model = _Block()
    bad = []
    with torch._dynamo.config.patch(**ONE_GRAPH):
        compiled = torch.compile(model, backend="fsmoe")  # default options: check_ranks on
        for step in range(steps):
            torch.manual_seed(1000 * step + rank)
            x = torch.randn(_tokens(rank, step), D)
            grads = []
            for fn in (model, compiled):
                model.zero_grad(set_to_none=True)
                loss = fn(x)
                loss.backward()
                grads.append({"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}})
            ref, got = grads
            bad.append({k: float((got[k] - ref[k]).abs().max()) for k in ref
                        if not torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-5)})
    rep = fsmoe_compiler.report(compiled)
    return {"bad": bad, "graphs": {k: len(rep.graphs(k)) for k in ("forward", "backward")},
            "fallbacks": rep.fallbacks(), "notes": [n for g in rep.graphs() for n in g.notes],
            "scheduled": {k: len(rep.schedules(k)) for k in ("forward", "backward")}}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_data_dependent_recompile_on_one_rank_trains_equal_to_eager_with_default_options(rank_pool):
    results = rank_pool.run(_recompile_on_one_rank, (RECOMPILE_STEPS,), timeout_s=240, pg_timeout_s=120)
    for rank, res in enumerate(results):
        for step, bad in enumerate(res["bad"]):
            assert not bad, f"rank {rank} step {step}: fsmoe differs from eager: {bad}"
    # Dynamo compiled another graph per direction on rank 1 only: the calls still paired up (no hang)
    assert results[0]["graphs"] == {"forward": 1, "backward": 1}, results[0]
    assert results[1]["graphs"] == {"forward": 2, "backward": 2}, results[1]
    for rank, res in enumerate(results):  # both ranks restarted planning there, then swapped a plan in
        assert res["fallbacks"] == [], f"rank {rank}: {res['fallbacks']}"
        assert any("rank(s) [1] compiled this graph again" in n for n in res["notes"]), res["notes"]
        assert res["scheduled"] == {"forward": 1, "backward": 1}, f"rank {rank}: {res}"
    print([(r["graphs"], r["scheduled"], r["fallbacks"], r["notes"]) for r in results])


# ------------------------------------------------------------------------------------------------------------
# a schedule-relevant disagreement, and a rank that dies while compiling


def _different_top_k(rank: int, world_size: int) -> tuple[str, str, float]:
    """Rank 1 routes top-1 where rank 0 routes top-2 (the layer's own config check skipped, as a user's own
    layer would have none): the same collectives, other MoE regions. Returns how this rank failed, and when."""
    from fsmoe_compiler.moe import MoELayer
    from moe_cases import ONE_GRAPH

    torch.manual_seed(0)
    model = MoELayer(D, FF, E, router="gshard", dispatch="dropless", top_k=2 if rank == 0 else 1,
                     check_config=False)
    compiled = torch.compile(model, backend="fsmoe")
    try:
        with torch._dynamo.config.patch(**ONE_GRAPH):
            y, aux = compiled(torch.randn(24, D))
            (y.sum() + aux).backward()
    except Exception as exc:  # noqa: BLE001 - what and when, for the test to compare across ranks
        return type(exc).__name__, str(exc), time.time()
    return "", "", time.time()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ranks_that_route_differently_fail_within_seconds_of_each_other_naming_the_disagreement(rank_pool):
    (kind0, text0, t0), (kind1, text1, t1) = rank_pool.run(_different_top_k, timeout_s=180, pg_timeout_s=600)
    assert kind0 and kind1, f"a rank did not fail: {(kind0, text0)} {(kind1, text1)}"
    both = text0 + text1
    # the rank that saw both sets of regions names them; the other stops because that rank failed, with its words
    assert re.search(r"rank \d found MoE regions .*top_k|rank \d found MoE regions .* but rank \d found", both), both
    assert "all ranks must run the same model" in text0 and "all ranks must run the same model" in text1
    assert abs(t0 - t1) < 10, f"the ranks failed {abs(t0 - t1):.0f} s apart (the process-group timeout is 600 s)"
    print(f"failed {abs(t0 - t1):.1f} s apart:\nrank 0: {kind0}: {text0}\nrank 1: {kind1}: {text1}")


def _die_while_compiling(rank: int, world_size: int, out_dir: str) -> None:
    """Rank 1 is killed (SIGKILL: no exit handler runs) while fsmoe compiles its forward graph; rank 0 compiles,
    then waits for rank 1 at its first call. Each rank writes what happened to it, and when."""
    import json
    import signal

    from fsmoe_compiler import backend

    if rank == 1:
        def killed(*args, **kwargs):
            with open(os.path.join(out_dir, "killed.json"), "w") as f:
                json.dump({"t": time.time()}, f)
            os.kill(os.getpid(), signal.SIGKILL)

        backend.run_pipeline = killed
    model = _Block()
    compiled = torch.compile(model, backend="fsmoe")
    try:
        compiled(torch.randn(24, D)).backward()
    except Exception as exc:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"t": time.time(), "type": type(exc).__name__, "error": str(exc)}, f)
        raise


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_rank_that_dies_while_compiling_fails_the_others_within_a_minute_naming_it(tmp_path):
    import json

    from fsmoe_compiler.launch import run_ranks

    with pytest.raises(RankError) as info:
        run_ranks(_die_while_compiling, 2, (str(tmp_path),), timeout_s=170, pg_timeout_s=1800, grace_s=5)
    assert "exited with code -9" in str(info.value.failed.get(1, "")), info.value.failed
    killed = json.loads((tmp_path / "killed.json").read_text())
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["type"] == "RankGone", seen
    assert seen["t"] - killed["t"] < 60, f"rank 0 failed {seen['t'] - killed['t']:.0f} s after rank 1 died"
    # the error names the dead rank and what it was compiling
    assert re.search(r"rank 1 stopped responding .* last seen: rank 1 compiling the forward graph of Dynamo graph",
                     seen["error"]), seen["error"]
    print(f"rank 0 failed {seen['t'] - killed['t']:.1f} s after rank 1 was killed: {seen['error']}")

"""Ranks that disagree about the model fail with a clear error on every rank, never a hang."""

from __future__ import annotations

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

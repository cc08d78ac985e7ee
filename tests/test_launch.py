"""The local rank launcher: results come back, failures and hangs become errors."""

import pytest
import torch
import torch.distributed as dist

from fsmoe_compiler.launch import RankError, run_ranks


def _allreduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t


def _raise_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    return rank


def _hang_on_one(rank, world_size):
    if rank == 1:
        import time

        time.sleep(60)
    return rank


def test_results_come_back_from_every_rank():
    out = run_ranks(_allreduce, 2, timeout_s=120)
    assert [float(t) for t in out] == [3.0, 3.0]


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RankError, match="boom from rank one"):
        run_ranks(_raise_on_one, 2, timeout_s=120)


def test_a_hanging_rank_becomes_a_timeout_error():
    with pytest.raises(RankError, match="did not finish"):
        run_ranks(_hang_on_one, 2, timeout_s=15)

"""EP/DP group layout (pure), group construction and rank-agreement checks on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fsmoe_compiler.runtime.topology import check_ranks_agree, world_layout


def test_layout_of_8_ranks_in_ep_groups_of_4():
    lay = world_layout(8, 4, 6)
    assert lay.ep_ranks == (4, 5, 6, 7) and lay.dp_ranks == (2, 6)
    assert (lay.ep_rank, lay.dp_rank, lay.dp_size) == (2, 1, 2)
    assert "ep 4 x dp 2" in lay.describe()


@pytest.mark.parametrize(
    "args, match",
    [((6, 4, 0), "ep_size=4 must divide world_size=6"), ((4, 2, 4), "rank 4 not in 0..3"), ((0, 1, 0), "world_size")],
)
def test_bad_layouts_raise(args, match):
    with pytest.raises(ValueError, match=match):
        world_layout(*args)


def test_agreement_check_is_a_no_op_without_a_process_group():
    check_ranks_agree("anything", {"a": 1})


def _groups(rank: int, world_size: int) -> dict:
    from fsmoe_compiler.runtime.topology import build_topology, ep_group

    out = {}
    for ep_size in (1, 2):
        topo = build_topology(ep_size)
        t_ep = torch.tensor([float(rank + 1)])
        dist.all_reduce(t_ep, group=topo.ep_group)
        t_dp = torch.tensor([float(rank + 1)])
        dist.all_reduce(t_dp, group=topo.dp_group)
        out[ep_size] = (t_ep.item(), t_dp.item(), topo.layout.describe())
    try:
        ep_group(4, 2)
    except ValueError as e:
        out["wrong_world"] = str(e)
    try:
        ep_group(2, 1 if rank == 0 else 2)
    except ValueError as e:
        out["ep_disagree"] = str(e)
    try:
        check_ranks_agree("seq_len", 16 if rank == 0 else 32)
    except ValueError as e:
        out["scalar"] = str(e)
    try:
        check_ranks_agree("config", {"num_experts": 4 + 4 * rank, "top_k": 2})
    except ValueError as e:
        out["dict"] = str(e)
    check_ranks_agree("config", {"num_experts": 4, "top_k": 2})  # equal: no error
    return out


def test_groups_have_the_right_members_and_disagreement_is_named(rank_pool):
    r0, r1 = rank_pool.run(_groups, timeout_s=90)
    for rank, res in enumerate((r0, r1)):
        # ep_size=1: EP groups are singletons, DP is the world; ep_size=2: the reverse
        assert res[1][:2] == (rank + 1, 3.0)
        assert res[2][:2] == (3.0, rank + 1)
        assert "world_size=4 was asked for but the process group has 2 ranks" in res["wrong_world"]
        assert res["ep_disagree"] == "ranks disagree: rank 1 has (world_size, ep_size)=(2, 2), rank 0 has (2, 1)"
        assert res["scalar"] == "ranks disagree: rank 1 has seq_len=32, rank 0 has 16"
        assert res["dict"] == "ranks disagree on config: rank 1 has num_experts=8, rank 0 has 4"

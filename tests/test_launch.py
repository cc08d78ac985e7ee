"""The local rank launcher and the rank pool: results come back, failures and hangs become errors, jobs start clean."""

import os
import sys

import pytest
import torch
import torch.distributed as dist

from fsmoe_compiler.launch import RankError, RankPool, rank_device, run_ranks


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


def test_each_rank_computes_on_its_local_rank_device():
    """Under NCCL a rank takes its local rank's GPU (not GPU 0 for all); gloo ranks compute on the CPU."""
    assert rank_device("gloo", 3) == torch.device("cpu")
    assert rank_device("nccl", 3) == torch.device("cuda", 3)
    assert rank_device("cpu:gloo,cuda:nccl", 1) == torch.device("cuda", 1)


def _device_of_rank(rank: int, world_size: int) -> str:
    return str(rank_device(dist.get_backend(), int(os.environ["LOCAL_RANK"])))


def test_launched_ranks_see_their_local_rank():
    assert run_ranks(_device_of_rank, 2, timeout_s=60) == ["cpu", "cpu"]


def test_results_come_back_from_every_rank():
    out = run_ranks(_allreduce, 2, timeout_s=120)
    assert [float(t) for t in out] == [3.0, 3.0]


def _crash_on_one(rank, world_size):
    if rank == 1:
        import faulthandler

        faulthandler._sigsegv()  # a crash in native code (as a library bug would cause)
    return rank


def test_a_crashing_rank_raises_with_where_it_crashed():
    def in_a_pool():
        with RankPool(2) as pool:
            pool.run(_crash_on_one)

    for run in (lambda: run_ranks(_crash_on_one, 2, timeout_s=120), in_a_pool):
        with pytest.raises(RankError, match="rank 1 failed") as err:
            run()
        text = str(err.value)
        assert "exited with code -11" in text and "where it crashed" in text, text
        assert "Segmentation fault" in text and "_crash_on_one" in text, text  # its Python stack, from faulthandler


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RankError, match="boom from rank one"):
        run_ranks(_raise_on_one, 2, timeout_s=120)


def test_a_hanging_rank_becomes_a_timeout_error():
    with pytest.raises(RankError, match="did not finish"):
        run_ranks(_hang_on_one, 2, timeout_s=8)


# ---------------------------------------------------------------------------------------------------- the pool

def _leave_state_behind(rank, world_size):
    """Change everything a job could change and the next job must not see."""
    from fsmoe_compiler.runtime import control

    seed = torch.initial_seed()  # what the pool gave this job
    control.meet("test/pool", rank)
    control.local("test.pool", list).extend([rank, rank])
    os.environ["FSMOE_TEST_LEFT_BEHIND"] = "1"
    os.environ["MASTER_ADDR"] = "localhost"
    sys.path.append("/nonexistent/fsmoe-test")
    torch._dynamo.config.cache_size_limit = 3
    torch._dynamo.config.capture_scalar_outputs = False  # fsmoe_compiler.moe turned it on at import
    torch.set_num_threads(2)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(123)
    torch.compile(lambda x: x * 2, backend="eager")(torch.ones(2))
    dist.new_group([0, 1])  # a subgroup: destroyed with the job's process group
    torch.set_grad_enabled(False)
    return {"pid": os.getpid(), "port": os.environ["MASTER_PORT"], "counter": len(control.local("test.pool", list)), "seed": seed,
            "frames": sum(torch._dynamo.utils.counters["frames"].values())}


def _report_state(rank, world_size):
    from fsmoe_compiler.runtime import control
    from fsmoe_compiler.runtime.control import waited_s

    state = {
        "pid": os.getpid(), "port": os.environ["MASTER_PORT"], "env": os.environ.get("FSMOE_TEST_LEFT_BEHIND"),
        "master_addr": os.environ["MASTER_ADDR"], "path": "/nonexistent/fsmoe-test" in sys.path,
        "cache_size_limit": torch._dynamo.config.cache_size_limit, "threads": torch.get_num_threads(),
        "capture_scalar_outputs": torch._dynamo.config.capture_scalar_outputs,
        "dtype": torch.get_default_dtype(), "seed": torch.initial_seed(), "grad": torch.is_grad_enabled(),
        "frames": sum(torch._dynamo.utils.counters["frames"].values()), "counters": list(control.local("test.pool", list)),
        "waited": waited_s(), "groups": len(dist.distributed_c10d._world.pg_map),
    }
    state["exchange"] = control.meet("test/pool", rank)  # a new store: the same key meets again
    return state


def test_pool_jobs_run_in_the_same_processes_and_start_clean(rank_pool):
    default_limit = torch._dynamo.config.cache_size_limit
    before = rank_pool.run(_leave_state_behind, timeout_s=120)
    after = rank_pool.run(_report_state, timeout_s=60)
    for rank, (b, a) in enumerate(zip(before, after)):
        assert a["pid"] == b["pid"]  # reused, not respawned
        assert a["port"] != b["port"]  # a new process group on a new port
        assert b["counter"] == 2 and b["frames"] > 0
        assert a["env"] is None and a["master_addr"] == "127.0.0.1" and not a["path"]
        assert a["cache_size_limit"] == default_limit and a["capture_scalar_outputs"] is True
        assert a["threads"] == 1 and a["dtype"] == torch.float32 and a["grad"]
        assert a["seed"] == b["seed"] != 123  # every job starts from the seed the process started with
        assert a["frames"] == 0  # torch._dynamo.reset()
        assert a["counters"] == [] and a["waited"] == 0.0
        assert a["groups"] == 1  # the world only: the last job's subgroup went with its process group
        assert a["exchange"] == [0, 1]
    assert rank_pool.run(_allreduce, timeout_s=60) == [torch.tensor([3.0])] * 2


def test_a_failing_pool_job_raises_with_its_traceback_and_the_ranks_stay(rank_pool):
    rank_pool.run(_allreduce, timeout_s=120)
    pids, started = rank_pool.pids, rank_pool.started
    with pytest.raises(RankError, match="boom from rank one") as err:
        rank_pool.run(_raise_on_one, timeout_s=60)
    assert set(err.value.failed) == {1} and err.value.silent == []
    assert [float(t) for t in rank_pool.run(_allreduce, timeout_s=60)] == [3.0, 3.0]
    assert rank_pool.pids == pids and rank_pool.started == started


def test_a_hanging_pool_job_is_killed_with_its_stack_and_the_ranks_replaced():
    with RankPool(2) as pool:
        pool.run(_allreduce, timeout_s=120)
        pids = pool.pids
        with pytest.raises(RankError, match="did not finish within 3 s") as err:
            pool.run(_hang_on_one, timeout_s=3)
        assert err.value.silent == [1]
        assert "where it was" in str(err.value) and "_hang_on_one" in str(err.value)
        assert pool.pids == []  # killed at once
        assert [float(t) for t in pool.run(_allreduce, timeout_s=120)] == [3.0, 3.0]
        assert pool.started == 4 and not set(pool.pids) & set(pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(_allreduce)


def test_run_ranks_hands_a_matching_job_to_a_pool_and_refuses_another_world_size(rank_pool):
    assert [float(t) for t in run_ranks(_allreduce, 2, pool=rank_pool, timeout_s=60)] == [3.0, 3.0]
    with pytest.raises(ValueError, match="the pool runs 2 gloo ranks; 3 gloo ranks were asked for"):
        run_ranks(_allreduce, 3, pool=rank_pool)

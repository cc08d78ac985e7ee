"""Profiler on 2 real gloo ranks: measured and fitted all-to-all, a profiled step, agreement, and faults.

One job of the session's rank pool runs every success scenario; fresh ranks
(``run_ranks``) check that a rank which never joins ``agree`` turns into an
error on the other rank within the process-group timeout instead of a hang.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from fsmoe_compiler.launch import run_ranks
from fsmoe_compiler.planner import LINK_STREAM, SLOPE_ANCHOR_BYTES

SIZES = (1 << 16, 1 << 20, 1 << 23)  # bytes sent per rank: 64 KiB .. 8 MiB, far apart so load noise cannot hide beta


_ISSUES = (torch.ops._c10d_functional.all_to_all_single.default,
           torch.ops._c10d_functional.all_gather_into_tensor.default)


class _CountWaits(TorchDispatchMode):
    """Counts ``wait_tensor`` (``count``) and all-to-all / all-gather calls (``issued``) that reach the
    dispatcher, and the most issued and not yet waited for at once (``most_in_flight``)."""

    def __enter__(self):
        self.count = self.issued = self.most_in_flight = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops._c10d_functional.wait_tensor.default
        self.issued += func in _ISSUES
        self.most_in_flight = max(self.most_in_flight, self.issued - self.count)
        return func(*args, **(kwargs or {}))


def _step(x, w):
    import torch.distributed._functional_collectives as funcol

    h = torch.relu(x @ w)
    y = funcol.wait_tensor(funcol.all_to_all_single(h, None, None, dist.group.WORLD))
    return y * 2 + 1


def _profile_and_agree(rank: int, world_size: int) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from fsmoe_compiler.profiler import (CostModel, agree, cpu_shares, fit_collectives, microbenchmark_collectives,
                                         microbenchmark_contention, profile_call)
    from fsmoe_compiler.runtime.executor import GraphExecutor

    samples = microbenchmark_collectives(None, ["all_to_all"], SIZES, repeats=3)
    fits = fit_collectives(samples)
    loaded = microbenchmark_contention(None, "all_to_all", SIZES[:1], repeats=2)
    with _CountWaits() as streamed_calls:  # each repetition: 3 all-to-alls back to back, timed as their mean
        streamed = microbenchmark_collectives(None, ["all_to_all"], SIZES[:1], repeats=2, stream=3)
    with _CountWaits() as gathers:  # gloo's all-gather never shares the link: one at a time, still 3 per repetition
        microbenchmark_collectives(None, ["all_gather"], SIZES[:1], repeats=2, stream=3)
    from fsmoe_compiler.ops import flies_alone, is_gloo_group

    def both(x):
        import torch.distributed._functional_collectives as funcol

        gather = getattr(funcol, "all_gather_single", funcol.all_gather_tensor)
        g = funcol.wait_tensor(gather(x, 0, dist.group.WORLD))
        return funcol.wait_tensor(funcol.all_to_all_single(g, None, None, dist.group.WORLD))

    traced = make_fx(both)(torch.randn(4, 2))
    alone = {n.target.name().split("::")[1]: flies_alone(n) for n in traced.graph.nodes
             if n.op == "call_function" and "wait" not in str(n.target)}
    gloo = (is_gloo_group(dist.group.WORLD), is_gloo_group(dist.group.WORLD.group_name),
            is_gloo_group(dist.group.WORLD, "cuda"), is_gloo_group("no-such-group"))
    try:
        microbenchmark_collectives(None, ["all_to_all"], SIZES[:1], stream=0)
        bad_stream = None
    except ValueError as e:
        bad_stream = str(e)

    torch.manual_seed(rank)
    x, w = torch.randn(64, 32), torch.randn(32, 16)
    gm = make_fx(_step)(x, w)
    expected = gm(x, w)
    out, node_ms, step_samples = profile_call(gm, [x, w])
    exposed, _, exposed_samples = profile_call(gm, [x, w], sync_collectives=False)  # timed to the graph's wait
    ex = GraphExecutor(gm)
    with _CountWaits() as waits:
        timed = ex.run([x, w], timed=True)
    graph_waits = sum(n.target == torch.ops._c10d_functional.wait_tensor.default for n in gm.graph.nodes)

    from fsmoe_compiler.planner import link_samples

    links = link_samples(step_samples, "test/links")  # what planning times at the graph's sizes
    costs = CostModel.from_profiles([node_ms], samples + step_samples)
    with FakeTensorMode():  # as inside a compiled graph's call
        agreed = agree(costs, "test/costs")

    mismatch = None
    try:
        agree(CostModel(node_ms={f"only_on_rank_{rank}": 1.0}), "test/mismatch")
    except ValueError as e:
        mismatch = str(e)
    return {
        "fits": {k: (c.alpha, c.beta) for k, c in fits.items()},
        "sizes": sorted({s["bytes"] for s in samples}),
        "ms_by_size": {n: sorted(s["ms"] for s in samples if s["bytes"] == n) for n in SIZES},
        "repeats": sorted({(s["bytes"], s["repeat"]) for s in samples}),
        "loaded": [(s["bytes"], s["repeat"], s["beside"], s["ms"] > 0, s["load_ms"] > 0) for s in loaded],
        "shares": cpu_shares(samples + loaded),
        "streamed": [(s["bytes"], s["repeat"], s["stream"], s["ms"] > 0) for s in streamed],
        "streamed_calls": (streamed_calls.issued, streamed_calls.count, streamed_calls.most_in_flight),
        "gathers": (gathers.issued, gathers.count, gathers.most_in_flight),
        "alone": alone,
        "gloo": gloo,
        "bad_stream": bad_stream,
        "links": sorted({(s["bytes"], s.get("stream"), bool(s.get("beside"))) for s in links}, key=str),
        "same_outputs": all(torch.equal(o, expected) for o in (out, exposed, timed)),
        "exposed_samples": [(s["node"], s["bytes"]) for s in exposed_samples],
        "step_samples": step_samples,
        "executor_waits": (waits.count, graph_waits),
        "timing_ok": all(0 <= s <= e <= ex.last_total_ms for s, e in ex.last_timing.values()),
        "local_mm": node_ms["mm"],
        "agreed": agreed.to_json(),
        "mismatch": mismatch,
    }


@pytest.mark.timeout(90)
def test_two_ranks_measure_fit_profile_and_agree_on_identical_costs(rank_pool):
    r0, r1 = rank_pool.run(_profile_and_agree, timeout_s=80, pg_timeout_s=30)
    for r in (r0, r1):
        assert r["sizes"] == list(SIZES)
        assert r["repeats"] == [(n, i) for n in SIZES for i in range(3)]  # what last_arrivals pairs ranks by
        assert r["loaded"] == [(SIZES[0], i, True, True, True) for i in range(2)]
        assert r["streamed"] == [(SIZES[0], i, 3, True) for i in range(2)]
        # the warm-up, then 2 repetitions of 3 all-to-alls issued back to back, each waited
        assert r["streamed_calls"] == (1 + 2 * 3, 1 + 2 * 3, 3)
        assert r["gathers"] == (1 + 2 * 3, 1 + 2 * 3, 1)  # all-gathers on gloo: one in flight at a time
        assert r["alone"] == {"all_gather_into_tensor": True, "all_to_all_single": False}
        assert r["gloo"] == (True, True, False, False)
        assert "stream must be >= 1" in r["bad_stream"] and "got 0" in r["bad_stream"]
        # planning times the graph's own message back to back (and beside a load), and the slope's anchor
        a2a = 64 * 16 * 4
        assert r["links"] == sorted({(a2a, LINK_STREAM, False), (a2a, None, True),
                                     (SLOPE_ANCHOR_BYTES, LINK_STREAM, False)}, key=str)
        assert set(r["shares"]) == {"all_to_all/2"} and 0.0 <= r["shares"]["all_to_all/2"] <= 1.0
        assert set(r["fits"]) == {"all_to_all/2"}
        assert r["fits"]["all_to_all/2"][1] > 0, r["ms_by_size"]  # beta: bigger messages take longer
        assert r["same_outputs"] and r["timing_ok"]
        waits, graph_waits = r["executor_waits"]
        assert waits == graph_waits > 0  # the timed run adds no synchronisation of its own
        (s,) = r["step_samples"]
        assert (s["node"], s["kind"], s["group_size"], s["bytes"]) == ("all_to_all_single", "all_to_all", 2, 64 * 16 * 4)
        assert s["ms"] > 0
        assert r["exposed_samples"] == [("all_to_all_single", 64 * 16 * 4)]
        assert "rank 1" in r["mismatch"] and "rank 0" in r["mismatch"]
    assert r0["agreed"] == r1["agreed"]
    from fsmoe_compiler.profiler import CostModel

    agreed = CostModel.from_json(r0["agreed"])
    assert agreed.node_ms["mm"] == max(r0["local_mm"], r1["local_mm"])
    assert len(agreed.samples) == 2 * (3 * len(SIZES) + 1)


def _one_rank_skips_agree(rank: int, world_size: int) -> dict:
    from datetime import timedelta

    from fsmoe_compiler.profiler import CostModel, agree
    from fsmoe_compiler.runtime import control

    store = dist.distributed_c10d._get_default_store()
    control.start()  # both ranks beat their heartbeat
    if rank == 1:  # alive, but never joins (outside fsmoe) until rank 0 has its verdict
        store.wait(["test/rank0-done"], timedelta(seconds=40))
        return {}
    start = time.monotonic()
    try:
        agree(CostModel(node_ms={"a": 1.0}), "test/skipped")
    except Exception as e:  # noqa: BLE001 - the point is that it raises at all
        return {"error": f"{type(e).__name__}: {e}", "after_s": time.monotonic() - start}
    finally:
        store.set("test/rank0-done", b"1")
    return {"error": None}


@pytest.mark.timeout(90)
def test_a_rank_that_skips_agree_becomes_an_error_naming_it_within_seconds():
    r0, _ = run_ranks(_one_rank_skips_agree, 2, timeout_s=80, pg_timeout_s=60)
    assert r0["error"], "agree returned although rank 1 never joined"
    assert "agreement 'test/skipped' (the cost model): rank(s) [1] did not arrive" in r0["error"], r0["error"]
    assert r0["after_s"] < 20  # the control plane's absence bound (10 s), far inside the process-group timeout

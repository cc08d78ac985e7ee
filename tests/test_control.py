"""Control-plane agreements over the store: values in rank order under a key every rank names alike, a missing
rank is an error."""

from __future__ import annotations

import time

import pytest

from fsmoe_compiler.runtime.control import ExchangeTimeout, OwnClock, meet, waited_s

LATE_S = 1.0  # how long rank 1 keeps rank 0 waiting at an exchange


def _exchanges(rank: int, world_size: int) -> dict:
    first = meet("test/a/0", {"rank": rank})
    other = meet("test/b", rank * 10)
    second = meet("test/a/1", [rank] * (rank + 1))  # sizes may differ per rank
    missing = missing_after_s = None
    if rank == 0:  # rank 1 never posts this one
        t0 = time.monotonic()
        try:
            meet("test/only-rank-0", 1, timeout_s=2.0, strict=False)
        except ExchangeTimeout as exc:
            missing, missing_after_s = str(exc), time.monotonic() - t0
    meet("test/realign", 0, strict=False)  # rank 1 went ahead while rank 0 timed out above
    if rank == 1:  # rank 0 reaches the next exchange first and waits there for rank 1
        time.sleep(LATE_S)
    w0, clock = waited_s(), OwnClock()
    meet("test/late", rank)
    return {"first": first, "other": other, "second": second, "missing": missing, "missing_after_s": missing_after_s,
            "waited": waited_s() - w0, "clock": (clock.own(), clock.waited())}


@pytest.mark.timeout(120)
def test_meet_returns_every_rank_value_in_rank_order_and_names_a_missing_rank(rank_pool):
    res = rank_pool.run(_exchanges, timeout_s=90)
    for r in res:
        assert r["first"] == [{"rank": 0}, {"rank": 1}]
        assert r["other"] == [0, 10]
        assert r["second"] == [[0], [1, 1]]
    assert "rank(s) [1] did not arrive" in res[0]["missing"]
    assert res[0]["missing_after_s"] < 30  # its 2 s timeout: an error within seconds, not the store's minutes
    assert res[1]["missing"] is None
    # the time a rank spends waiting for the others is counted, so compile overheads can leave it out: rank 0
    # waited for most of rank 1's sleep (they left the previous exchange together), rank 1 hardly at all
    assert res[0]["waited"] >= 0.5 * LATE_S and res[1]["waited"] < res[0]["waited"]
    own, waited = res[0]["clock"]  # OwnClock splits the same interval into own work and waiting
    assert waited == pytest.approx(res[0]["waited"], abs=1e-3) and own < waited


def test_without_distributed_it_returns_the_value_alone():
    w0 = waited_s()
    assert meet("test/single", 5) == [5]
    assert waited_s() == w0


# ---------------------------------------------------------------------------------------------------------------
# keyed agreements with liveness: votes that can be abandoned, meets that fail at once on a real disagreement


def _keyed(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from fsmoe_compiler.runtime import control

    out: dict = {}
    t0 = time.perf_counter()
    for n in range(20):  # votes of one series, paired by instance number
        verdict = control.vote("test/votes", n, (n, rank))
        assert verdict.agreed and verdict.ballots == [(n, 0), (n, 1)], verdict
    out["vote_ms"] = (time.perf_counter() - t0) / 20 * 1e3
    dist.barrier()
    # rank 1 stays away (eager code, data loading...): rank 0 abandons the instance, and rank 1, arriving late,
    # reads the same verdict from its ballot key
    if rank == 1:
        control.announce("outside")
        time.sleep(1.5)
    t0 = time.monotonic()
    verdict = control.vote("test/away", 0, rank, absent_s=0.5)
    out["away"] = (verdict.agreed, verdict.absent, verdict.reason, time.monotonic() - t0)
    dist.barrier()
    # rank 1 says it will not vote on a series any more, then stays away: rank 0 abandons at once, not after
    # the 10 s a rank may be seen away
    if rank == 1:
        control.leave("test/left", 0, "it gave up on these calls")
        control.announce("outside")
        dist.barrier()
        time.sleep(3.0)
    else:
        dist.barrier()
        t0 = time.monotonic()
        verdict = control.vote("test/left", 0, rank)
        out["left"] = (verdict.agreed, verdict.reason, time.monotonic() - t0)
    dist.barrier()
    # each rank waits at a different agreement, where it needs the other: a real disagreement, an error at once
    t0 = time.monotonic()
    try:
        control.meet(f"test/elsewhere/{rank}", rank, what=f"rank {rank}'s own agreement")
        out["elsewhere"] = None
    except control.ExchangeTimeout as exc:
        out["elsewhere"] = (type(exc).__name__, str(exc), time.monotonic() - t0)
    dist.barrier()
    # rank 1 fails inside fsmoe: rank 0, waiting for it, stops with its error
    t0 = time.monotonic()
    if rank == 1:
        try:
            with control.doing("compiling", "", "the forward graph of test graph 7"):
                raise ValueError("boom while compiling")
        except ValueError:
            pass
        out["failed"] = None
    else:
        try:
            control.meet("test/after-failure", 0)
            out["failed"] = None
        except control.ExchangeTimeout as exc:
            out["failed"] = (type(exc).__name__, str(exc), time.monotonic() - t0)
    dist.barrier()
    return out


@pytest.mark.timeout(120)
def test_keyed_votes_abandon_an_absent_rank_and_meets_fail_at_once_on_disagreement_or_failure(rank_pool):
    res = rank_pool.run(_keyed, timeout_s=90, pg_timeout_s=600)
    for r in res:
        agreed, absent, reason, _ = r["away"]
        assert not agreed and absent, r["away"]  # the same verdict on both ranks
    assert res[0]["away"][1] == [1] and "outside fsmoe" in res[0]["away"][2], res[0]["away"]
    assert res[1]["away"][1] == [1] and "rank 0 went on without this rank" in res[1]["away"][2], res[1]["away"]
    assert res[0]["away"][3] < 10  # abandoned after its 0.5 s, not the store's timeout
    # never the 600 s store timeout: the first to see the other waiting elsewhere raises and announces it, and
    # the other (RankGone: that rank failed) stops with its reason
    for rank, r in enumerate(res):
        kind, text, seconds = r["elsewhere"]
        assert kind in ("ExchangeTimeout", "RankGone") and seconds < 15, r["elsewhere"]
        assert "waiting at rank" in text and "the ranks disagree about what they compiled or run" in text, text
    agreed, reason, seconds = res[0]["left"]
    assert not agreed and "rank 1 runs these calls without the other ranks since call 0" in reason, reason
    assert seconds < 3, res[0]["left"]
    kind, text, seconds = res[0]["failed"]
    assert kind == "RankGone" and seconds < 15, res[0]["failed"]
    assert "rank 1 failed the forward graph of test graph 7: ValueError: boom while compiling" in text, text
    print(f"an agreed vote: {res[0]['vote_ms']:.2f} ms (rank 0), {res[1]['vote_ms']:.2f} ms (rank 1)")

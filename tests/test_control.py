"""Control-plane exchanges over the store: values in rank order, numbered per tag, a missing rank is an error."""

from __future__ import annotations

import time

import pytest

from fsmoe_compiler.runtime.control import ExchangeTimeout, OwnClock, exchange, waited_s

LATE_S = 1.0  # how long rank 1 keeps rank 0 waiting at an exchange


def _exchanges(rank: int, world_size: int) -> dict:
    first = exchange("test/a", {"rank": rank})
    other = exchange("test/b", rank * 10)
    second = exchange("test/a", [rank] * (rank + 1))  # sizes may differ per rank
    missing = missing_after_s = None
    if rank == 0:  # rank 1 never posts this one
        t0 = time.monotonic()
        try:
            exchange("test/only-rank-0", 1, timeout_s=2.0)
        except ExchangeTimeout as exc:
            missing, missing_after_s = str(exc), time.monotonic() - t0
    exchange("test/realign", 0)  # rank 1 went ahead while rank 0 timed out above
    if rank == 1:  # rank 0 reaches the next exchange first and waits there for rank 1
        time.sleep(LATE_S)
    w0, clock = waited_s(), OwnClock()
    exchange("test/late", rank)
    return {"first": first, "other": other, "second": second, "missing": missing, "missing_after_s": missing_after_s,
            "waited": waited_s() - w0, "clock": (clock.own(), clock.waited())}


@pytest.mark.timeout(120)
def test_exchange_returns_every_rank_value_in_rank_order_and_names_a_missing_rank(rank_pool):
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
    assert exchange("test/single", 5) == [5]
    assert waited_s() == w0

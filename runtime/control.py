"""Small control-plane exchanges between ranks over the process group's key-value store, not its collectives.

The backend has to agree with the other ranks at moments the model does not
choose: while Dynamo compiles a graph (which regions did every rank find?) and
between calls (which degrees chunked, which plan, which message sizes). A
gloo collective issued from inside a graph compiler could hang the job
(observed here: both ranks in the same ``all_gather_object`` under
compilation, neither completing, about once in forty compiles), and every
extra collective shifts the sequence numbers the model's own collectives are
matched by. The store (TCPStore for ``env://``) is a separate channel: each
rank writes its value under a key numbered per tag, then waits for everyone's.
Ranks must call ``exchange`` with the same tags in the same order (they do:
they compile and run the same graphs).
"""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

_PREFIX = "fsmoe/control"
_counters: dict[str, int] = {}
_waited = [0.0]  # seconds this process has spent blocked in exchanges, waiting for the other ranks


def waited_s() -> float:
    """Seconds this process has spent so far waiting in :func:`exchange` for the other ranks' values.

    Compile-overhead figures subtract it: a rank that reaches an exchange first
    waits there for the others' Dynamo tracing, which is not this backend's work
    (without the exchange it would wait at the model's first collective instead).
    """
    return _waited[0]


class OwnClock:
    """Wall time since it was made, split into this rank's own work and its waits in :func:`exchange`."""

    def __init__(self) -> None:
        self._t0, self._w0 = time.perf_counter(), _waited[0]

    def waited(self) -> float:
        """Seconds spent waiting for the other ranks since the clock was made."""
        return _waited[0] - self._w0

    def own(self) -> float:
        """Seconds since the clock was made, less the waits."""
        return time.perf_counter() - self._t0 - self.waited()


def reset() -> None:
    """Start the exchange numbering per tag and the waited total again from zero.

    For a process that leaves its process group and joins a new one, whose
    store starts empty: every rank must number its exchanges from 0 again (the
    ranks of ``fsmoe_compiler.launch.RankPool`` do this between jobs).
    """
    _counters.clear()
    _waited[0] = 0.0


class ExchangeTimeout(RuntimeError):
    """Some rank did not post its value for an exchange within the timeout."""


def exchange(tag: str, value: Any, timeout_s: float | None = None) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without torch.distributed.

    ``tag`` names the exchange (e.g. ``"regions/forward"``); the n-th call with
    a tag on one rank meets the n-th call with that tag on every other rank.
    ``timeout_s`` defaults to the store's timeout (the process group's).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [value]
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    n = _counters.get(tag, 0)  # every rank has made the same exchanges before, so the numbers match
    _counters[tag] = n + 1
    base = f"{_PREFIX}/{tag}/{n}"
    store.set(f"{base}/{rank}", pickle.dumps(value))
    keys = [f"{base}/{r}" for r in range(world)]
    t0 = time.perf_counter()
    try:
        if timeout_s is None:
            store.wait(keys)
        else:
            store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - the store raises RuntimeError/DistStoreError on timeout
        missing = [r for r in range(world) if not store.check([keys[r]])]
        raise ExchangeTimeout(
            f"exchange {tag!r} #{n}: rank(s) {missing} did not arrive ({type(exc).__name__}: {exc}); "
            "a rank died, is stuck, or compiled a different graph"
        ) from exc
    finally:
        _waited[0] += time.perf_counter() - t0
    return [pickle.loads(store.get(k)) for k in keys]

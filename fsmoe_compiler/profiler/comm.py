"""Link models for collectives: fit ``t = alpha + beta * bytes`` per kind and group size, and measure them.

Units: a fitted ``LinearCost`` gives milliseconds; its ``n`` is **bytes this
rank sends** (the collective's input ``numel * element_size``, see
``fsmoe_compiler.ops.value_bytes``), so ``beta`` is ms per byte. Bytes rather than
elements keep bf16 and fp32 traffic on one line.

``microbenchmark_collectives`` times real functional collectives
(``torch.distributed._functional_collectives``, the ops compiled graphs use)
at a few message sizes; ``fit_collectives`` turns those samples, or the ones
``profile_call`` collected from a real step, into one ``LinearCost`` per
``f"{kind}/{group_size}"``. The least-squares fit itself is the scheduler's
``LinearCost.fit``, which the simulator's ``local`` preset uses too.
``microbenchmark_collectives`` is the project's one collective microbenchmark:
the bench's all-to-all timer and the ``local`` preset's measurement
(``fsmoe_compiler.bench.worker``, ``fsmoe_compiler.bench.links``) call it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Iterable, Sequence

from fsmoe_compiler.names import ALL_GATHER, ALL_TO_ALL, REDUCE_SCATTER, check_kind, comm_key
from fsmoe_compiler.ops import is_gloo_group
from fsmoe_compiler.scheduler.costs import LinearCost

DEFAULT_SIZES_BYTES = (1 << 16, 1 << 18, 1 << 20)


def typical_ms(times: Sequence[float]) -> float:
    """What one more repetition adds to a step, in the mean: the mean of ``times`` without the slowest twentieth
    (at least the slowest one of three or more).

    A step is a sum of many such times, and a sum tracks the mean of its
    parts, not their median: a loopback all-to-all's repetitions have a long
    tail (median 0.35 ms, mean 0.55-0.82 ms on 2 ranks sharing 2 cores), and
    six of them chained with compute took the sum of the means, where the sum
    of the medians was 20-30 % short. The slowest few are dropped so that one
    stall of the host does not price every later call.
    """
    xs = sorted(float(t) for t in times)
    if not xs:
        raise ValueError("typical_ms needs at least one time")
    drop = max(1, len(xs) // 20) if len(xs) >= 3 else 0
    return statistics.fmean(xs[: len(xs) - drop])


def fit_collectives(samples: Iterable[dict]) -> dict[str, LinearCost]:
    """One ``LinearCost`` (ms, n = bytes) per ``f"{kind}/{group_size}"`` from collective samples.

    Samples of one size are reduced to their ``typical_ms`` first (the mean
    without the slowest: a step sums them; and repeated sizes do not dominate), then fitted by least
    squares with alpha, beta clamped to >= 0, plus a floor where small messages take longer than that
    line (:func:`with_floor`). A key observed at one size only
    gets ``alpha = 0, beta = ms / bytes`` (or ``alpha = ms`` for 0-byte
    messages). Samples without a group size, and :func:`microbenchmark_contention`'s, are skipped.
    """
    by_key: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        if s.get("group_size") is None or s.get("beside"):  # a collective with a load beside it is not the link
            continue
        by_key[comm_key(s["kind"], s["group_size"])][int(s["bytes"])].append(float(s["ms"]))
    fits: dict[str, LinearCost] = {}
    for key in sorted(by_key):
        points = sorted((n, typical_ms(ts)) for n, ts in by_key[key].items())
        if len(points) == 1:
            n, t = points[0]
            t = max(t, 0.0)
            fits[key] = LinearCost(0.0, t / n) if n > 0 else LinearCost(t, 0.0)
        else:
            fits[key] = with_floor(LinearCost.fit([float(n) for n, _ in points], [t for _, t in points]), points)
    return fits


#: How far above the fitted line the smallest size's time must be for the link to get a floor (noise is not one).
FLOOR_MARGIN = 1.1


def with_floor(line: LinearCost, points: Sequence[tuple[float, float]]) -> LinearCost:
    """``line`` with a floor where the smallest size took more than ``FLOOR_MARGIN`` times the line there.

    Small messages cost what a round trip costs, not ``alpha + beta * n``: on
    the emulated 300 Mbit/s link an all-reduce took 0.98 / 0.77 / 1.79 / 29.1 ms
    at 384 B / 4 KiB / 64 KiB / 1 MiB back to back, and the least-squares line
    (set by the large sizes) priced 384 B at 0.30-0.57 ms: a backward of 69
    small per-parameter all-reduces about 40 ms short. The floor is the
    smallest size's time, but no more than the next size's time (or the line
    there): one slow repetition of a tiny message does not price every message.
    ``points``: ``(bytes, ms)`` sorted by bytes.
    """
    if len(points) < 2:
        return line
    (n0, t0), (n1, t1) = points[0], points[1]
    floor = min(t0, max(t1, line(n1)))
    if t0 <= FLOOR_MARGIN * line(n0) or floor <= line(n0):
        return line
    return LinearCost(line.alpha, line.beta, floor)


def _run_collective(kind: str, x, group) -> object:
    return _wait(_issue(check_kind(kind), x, group))


def microbenchmark_collectives(
    group=None,
    kinds: Sequence[str] = (ALL_TO_ALL,),
    sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES,
    repeats: int = 5,
    *,
    device=None,
    stream: int = 1,
) -> list[dict]:
    """Time real functional collectives on ``group`` (default: the world) at a few message sizes.

    Collective: every rank of ``group`` must call it with the same arguments.
    Each size is rounded down to whole float32 elements divisible by the group
    size; each (kind, size) runs once as warm-up, then ``repeats`` times, each
    repetition after a barrier so that a rank arriving late does not bill its
    lateness to the link. A repetition is ``stream`` collectives issued back
    to back and then waited for, timed as their mean: with ``stream`` > 1 that
    is what a message costs on a link kept busy, as a pipelined graph keeps it
    (on the emulated 300 Mbit/s link a 300 KiB all-to-all took 3.7 ms alone
    after a barrier and 4.5 ms back to back in the graph). A kind that must fly
    alone on ``group`` (an all-gather on gloo: ``ops.GLOO_ALONE_OPS``) is waited
    for before the next is issued, as the scheduled graph runs it. Returns samples
    ``{"node": None, "kind", "group", "group_size", "bytes", "repeat", "ms", "stream"}`` (``repeat``: the
    repetition's index, the same on every rank, which :func:`last_arrivals` pairs them by).
    """
    import torch
    import torch.distributed as dist

    for kind in kinds:
        check_kind(kind)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if stream < 1:
        raise ValueError(f"stream must be >= 1 collectives per repetition, got {stream}")
    if not dist.is_initialized():
        raise RuntimeError("microbenchmark_collectives needs torch.distributed to be initialised")
    group = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    name = getattr(group, "group_name", None)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend(group)) else "cpu"
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    samples: list[dict] = []
    one_at_a_time = {ALL_GATHER} if is_gloo_group(group, torch.device(device).type) else set()
    for kind in kinds:
        for nbytes in sizes_bytes:
            numel = max(size, (int(nbytes) // 4) // size * size)
            x = torch.randn(numel, device=device)
            _run_collective(kind, x, group)  # warm-up (connections, buffers)
            for rep in range(repeats):
                dist.barrier(group)
                sync()
                start = time.perf_counter()
                if kind in one_at_a_time:
                    for _ in range(stream):
                        _wait(_issue(kind, x, group))
                else:
                    for out in [_issue(kind, x, group) for _ in range(stream)]:
                        _wait(out)
                sync()
                ms = (time.perf_counter() - start) * 1e3 / stream
                samples.append(
                    {"node": None, "kind": kind, "group": name, "group_size": size, "bytes": numel * 4, "repeat": rep,
                     "ms": ms, "stream": stream}
                )
    return samples


def last_arrivals(by_rank: Sequence[Sequence[dict]]) -> list[dict]:
    """One sample per repetition of a microbenchmark, from every rank's samples of it: the least time.

    A barrier releases the ranks one after another; the first ones out then
    wait inside the collective for the last, so only the rank that arrived
    last times the link alone. Its time is the least of the ranks' (each rank's
    own median, the earlier fit, read 1 ms for a 5 KiB loopback all-to-all that
    took 0.25-0.56 ms in the graph, and agreeing on the MAX over ranks kept
    that). Samples without a ``repeat`` index are passed through.
    """
    best: dict[tuple, dict] = {}
    loose: list[dict] = []
    for samples in by_rank:
        for s in samples:
            if s.get("repeat") is None:
                loose.append(dict(s))
                continue
            key = (s["kind"], s.get("group"), s.get("group_size"), int(s["bytes"]), int(s["repeat"]),
                   bool(s.get("beside")))
            if key not in best or float(s["ms"]) < float(best[key]["ms"]):
                best[key] = dict(s)
    return [best[k] for k in sorted(best, key=str)] + loose


def microbenchmark_contention(group, kind: str, sizes_bytes: Sequence[int], repeats: int = 5) -> list[dict]:
    """Time a collective with a compute load beside it on every rank of ``group`` (CPU tensors only).

    On a host whose cores run both the compute and the communication library's
    threads (gloo on CPU), a collective in flight takes CPU time from the
    compute it is meant to hide behind: on 2 ranks sharing 2 cores a 40 KiB
    loopback all-to-all beside 0.44 ms of matmuls took 0.78 ms, the sum, not
    the larger. Per size, the load is a chain of matmuls about as long as the
    collective alone; each repetition, after a barrier, issues the collective,
    runs the load, waits. Returns samples ``{"kind", "group", "group_size",
    "bytes", "repeat", "beside": True, "ms"`` (issue to wait, load included),
    ``"load_ms"`` (the same load alone, timed before the repetitions)``}``; :func:`cpu_shares`
    reads them.
    """
    import torch
    import torch.distributed as dist

    check_kind(kind)
    group = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    name = getattr(group, "group_name", None)
    a = torch.randn(128, 128)
    mm_ms = _time_ms(lambda: torch.mm(a, a), 5) / 5
    samples: list[dict] = []
    for nbytes in sizes_bytes:
        numel = max(size, (int(nbytes) // 4) // size * size)
        x = torch.randn(numel)
        alone = []
        for _ in range(3):
            dist.barrier(group)
            alone.append(_time_ms(lambda: _run_collective(kind, x, group), 1))
        # the same number of matmuls on every rank (the rank whose collective read fastest decides)
        steps = torch.tensor([max(1, int(typical_ms(alone) / max(mm_ms, 1e-6)))])
        dist.all_reduce(steps, op=dist.ReduceOp.MIN, group=group)

        def load(n: int = int(steps)) -> None:
            for _ in range(n):
                torch.mm(a, a)
        # the load alone first, then the repetitions back to back as the collective's own: a link idle while a
        # repetition's load was timed would start the next one with a full token bucket (an emulated link's
        # burst: 320 KiB all-to-alls on 300 Mbit/s took 1.3 ms after idling, 3.7 ms back to back)
        loads = [_time_ms(load, 1) for _ in range(repeats)]
        for rep, load_ms in enumerate(loads):
            dist.barrier(group)
            start = time.perf_counter()
            out = _issue(kind, x, group)
            load()
            _wait(out)
            ms = (time.perf_counter() - start) * 1e3
            samples.append({"node": None, "kind": kind, "group": name, "group_size": size, "bytes": numel * 4,
                            "repeat": rep, "beside": True, "ms": ms, "load_ms": load_ms})
    return samples


def cpu_shares(samples: Iterable[dict]) -> dict[str, float]:
    """The share of a collective's time it takes from the compute beside it, per ``f"{kind}/{group_size}"``.

    From :func:`microbenchmark_contention`'s samples (``beside``) and the
    collective's own samples at the same sizes (after :func:`last_arrivals`):
    with the collective alone taking ``c``, the load alone ``d`` and both
    together ``T`` (each the ``typical_ms`` of its repetitions, the statistic the
    link model prices ``c`` with: the least of each read an emulated link's
    token-bucket bursts, shares of 0.4 for all-to-alls whose steady state
    needed no core), the share is ``(T - max(c, d)) / min(c, d)``
    clamped to [0, 1]: 0 where they overlap fully, 1 where they run one after
    the other. The median over sizes. The task graph bills ``share * c`` of
    each collective to the compute resource.
    """
    alone: dict[tuple[str, int], list[float]] = defaultdict(list)
    beside: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for s in samples:
        if s.get("group_size") is None or s.get("node") is not None:
            continue
        key = (comm_key(s["kind"], s["group_size"]), int(s["bytes"]))
        if s.get("beside"):
            beside[key].append((float(s["ms"]), float(s["load_ms"])))
        else:
            alone[key].append(float(s["ms"]))
    per_key: dict[str, list[float]] = defaultdict(list)
    for key, pairs in sorted(beside.items()):
        if not alone.get(key):
            continue
        c, both, d = typical_ms(alone[key]), typical_ms([t for t, _ in pairs]), typical_ms([d for _, d in pairs])
        low = min(c, d)
        if low <= 0:
            continue
        per_key[key[0]].append(min(1.0, max(0.0, (both - max(c, d)) / low)))
    return {k: statistics.median(v) for k, v in sorted(per_key.items())}


def _issue(kind: str, x, group) -> object:
    import torch.distributed._functional_collectives as funcol

    if kind == ALL_TO_ALL:
        return funcol.all_to_all_single(x, None, None, group)
    if kind == ALL_GATHER:
        return getattr(funcol, "all_gather_single", funcol.all_gather_tensor)(x, 0, group)
    if kind == REDUCE_SCATTER:
        return getattr(funcol, "reduce_scatter_single", funcol.reduce_scatter_tensor)(x, "sum", 0, group)
    return funcol.all_reduce(x, "sum", group)


def _wait(out) -> object:
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(out)


def _time_ms(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) * 1e3

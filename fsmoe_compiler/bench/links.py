"""This machine's links and GEMMs, measured for the simulator's ``local`` cost preset.

``measure_local`` starts 2 local gloo ranks and times every collective kind
with the profiler's microbenchmark
(:func:`fsmoe_compiler.profiler.comm.microbenchmark_collectives`: functional
collectives, a barrier before each repetition) and CPU GEMMs on rank 0; it
returns the simulator's :class:`~fsmoe_compiler.sim.presets.LocalSamples`.
``local_costs`` is the ``local`` preset with that measurement: the cached
samples, or a fresh measurement, fitted into a ``ClusterCosts`` by
``sim.presets`` (``LinearCost.fit`` per kind). ``fsmoe simulate --preset
local`` calls it; the simulator itself never starts ranks or imports torch.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from fsmoe_compiler.names import ALL_GATHER
from fsmoe_compiler.sim.costs import ClusterCosts
from fsmoe_compiler.sim.presets import LOCAL_COLLECTIVES, LocalSamples
from fsmoe_compiler.sim.presets import local_costs as _cached_local_costs

#: Collective sizes measured, in float32 elements per rank (the A2A's send buffer, the all-gather's output,
#: the reduce-scatter's input, the all-reduce's buffer: the simulator's ``n``).
LOCAL_COLL_SIZES = (1 << 14, 1 << 17, 1 << 19, 1 << 20)
#: GEMMs measured, as ``(m, k, n)`` of one ``mm``.
LOCAL_GEMM_SIZES = ((128, 256, 256), (256, 512, 512), (512, 512, 1024), (512, 1024, 1024))
#: Bytes of one element of the measured tensors (float32, as the profiler's microbenchmark sends).
_ELEM_BYTES = 4


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in ms over ``reps`` runs after one warm-up."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def _measure_rank(rank: int, world_size: int, coll_sizes: tuple, gemm_sizes: tuple, reps: int) -> dict:
    """Run on each spawned rank: every collective kind on the world (all ranks), then GEMMs (rank 0)."""
    import torch
    import torch.distributed as dist

    from fsmoe_compiler.profiler.comm import microbenchmark_collectives

    coll: dict[str, list[tuple[float, float]]] = {}
    for kind in LOCAL_COLLECTIVES:
        # the microbenchmark sizes a collective by its input; the simulator's n of an all-gather is its output
        scale = world_size if kind == ALL_GATHER else 1
        sizes = [(n - n % world_size) // scale * _ELEM_BYTES for n in coll_sizes]
        samples = microbenchmark_collectives(kinds=(kind,), sizes_bytes=sizes, repeats=reps)
        by_size: dict[int, list[float]] = {}
        for s in samples:
            by_size.setdefault(s["bytes"], []).append(s["ms"])
        coll[kind] = [(float(b // _ELEM_BYTES * scale), statistics.median(ms)) for b, ms in by_size.items()]
    gemm: list[tuple[float, float]] = []
    dist.barrier()
    if rank == 0:
        for m, k, n in gemm_sizes:
            a, b = torch.randn(m, k), torch.randn(k, n)
            gemm.append((float(m * k * n), _median_ms(lambda: torch.mm(a, b), reps)))
    dist.barrier()
    return {"coll": coll, "gemm": gemm}


def measure_local(
    coll_sizes: Sequence[int] = LOCAL_COLL_SIZES,
    gemm_sizes: Sequence[tuple[int, int, int]] = LOCAL_GEMM_SIZES,
    reps: int = 7,
    timeout_s: float = 120.0,
) -> LocalSamples:
    """Time every collective kind on 2 local gloo ranks and CPU GEMMs: the ``local`` preset's samples.

    Each point is the median of ``reps`` timed runs after a warm-up (rank 0's
    timings; every rank takes part in each collective).
    """
    from fsmoe_compiler.launch import run_ranks  # imports torch

    out = run_ranks(_measure_rank, 2, (tuple(coll_sizes), tuple(gemm_sizes), reps), timeout_s=timeout_s)
    r0 = out[0]
    return LocalSamples(coll={k: [tuple(p) for p in v] for k, v in r0["coll"].items()},
                        gemm=[tuple(p) for p in r0["gemm"]])


def local_costs(gpus: int = 16, *, refit: bool = False, cache_path: Path | str | None = None) -> ClusterCosts:
    """The ``local`` preset: ``sim.presets.local_costs`` measuring with :func:`measure_local` when it must."""
    return _cached_local_costs(gpus, refit=refit, cache_path=cache_path, measure=measure_local)

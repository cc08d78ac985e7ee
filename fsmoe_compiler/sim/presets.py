"""Cluster cost-model presets for the simulator: ``name, gpus -> ClusterCosts``.

Every operation costs ``alpha + beta * n`` ms (``scheduler.costs.LinearCost``):
``n`` is elements for a collective (per rank: the A2A's send buffer, the
all-gather's output, the reduce-scatter's input, the all-reduce's buffer) and
multiply-accumulates (MACs) for a GEMM. Three presets:

``fsmoe-testbed``
    The constants FSMoE measured on its own cluster (ASPLOS'25; see
    ``shared/FSMOE.md``, "Cost model"): 16 / 32 / 48 GPUs, 8 per node. The
    inter-node betas (A2A and gradient all-reduce) depend on the GPU count, so
    the preset is a function of ``gpus``.
``h100-ib400``
    A modern cluster derived from published numbers, not measured: 8x H100 SXM
    per node on NVLink 4, one 400 Gb/s InfiniBand NIC per GPU, bf16. The
    derivation is in :func:`h100_ib400`.
``local``
    Fitted on this machine: gloo collectives between 2 local ranks and CPU
    GEMMs, least squares to ``alpha + beta * n``, cached as JSON in the user's
    cache dir (``~/.cache/fsmoe/local_costs.json``; ``refit=True`` re-measures).

Only :func:`measure_local` touches torch, and imports it lazily, so the rest of
the simulator stays torch-free.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from fsmoe_compiler.scheduler.costs import FFN_GEMMS, ClusterCosts, LinearCost

GPUS_PER_NODE = 8

# ---------------------------------------------------------------------------
# fsmoe-testbed: FSMoE's measured constants (ms, per element / per MAC)
# ---------------------------------------------------------------------------

#: A2A and dense-gradient all-reduce slopes per GPU count (inter-node link).
TESTBED_A2A_BETA: dict[int, float] = {16: 1.306e-6, 32: 1.854e-6, 48: 2.320e-6}
TESTBED_ALLREDUCE_BETA: dict[int, float] = {16: 2.916e-6, 32: 3.495e-6, 48: 4.951e-6}
TESTBED_A2A_ALPHA = 0.287
TESTBED_ALLREDUCE_ALPHA = 0.511
TESTBED_AG = LinearCost(alpha=0.338, beta=6.7e-7)
TESTBED_RS = LinearCost(alpha=0.395, beta=6.7e-7)
TESTBED_GEMM = {"gpt": LinearCost(alpha=1.09, beta=1.53e-10), "swiglu": LinearCost(alpha=1.47, beta=3.17e-10)}
#: FSMoE did not publish an attention cost. We assume the attention block's
#: GEMMs run at the GPT FFN GEMM throughput (same beta) with a 0.2 ms intercept
#: for its handful of kernels. It is one unchunked task per layer and direction,
#: so it shifts every method alike except where it opens a window for the
#: gradient all-reduce.
TESTBED_DENSE = LinearCost(alpha=0.2, beta=1.53e-10)


def fsmoe_testbed(gpus: int = 16) -> ClusterCosts:
    """FSMoE's measured testbed constants for ``gpus`` in {16, 32, 48} (8 per node)."""
    if gpus not in TESTBED_A2A_BETA:
        raise ValueError(f"preset 'fsmoe-testbed' was measured at gpus in {sorted(TESTBED_A2A_BETA)}, got gpus={gpus}")
    return ClusterCosts(
        name="fsmoe-testbed",
        a2a=LinearCost(TESTBED_A2A_ALPHA, TESTBED_A2A_BETA[gpus]),
        allgather=TESTBED_AG,
        reducescatter=TESTBED_RS,
        allreduce=LinearCost(TESTBED_ALLREDUCE_ALPHA, TESTBED_ALLREDUCE_BETA[gpus]),
        gemm=dict(TESTBED_GEMM),
        dense=TESTBED_DENSE,
        gpus=gpus,
        gpus_per_node=GPUS_PER_NODE,
    )


# ---------------------------------------------------------------------------
# h100-ib400: derived from published link bandwidths and GEMM throughput
# ---------------------------------------------------------------------------

H100_BYTES_PER_ELEM = 2  # bf16 activations and gradients
H100_IB_GBPS = 400.0  # InfiniBand NDR per GPU (one NIC per GPU, rail-optimised)
H100_NVLINK_GBS = 450.0  # NVLink 4: 900 GB/s bidirectional per GPU -> 450 GB/s each way
H100_BF16_TFLOPS = 989.0  # dense bf16 peak, H100 SXM
H100_LINK_EFFICIENCY = 0.80  # bus bandwidth NCCL reaches on large messages
H100_GEMM_EFFICIENCY = 0.65  # fraction of peak that large bf16 GEMMs reach
H100_A2A_ALPHA = 0.030  # ms, inter-node all-to-all latency
H100_ALLREDUCE_ALPHA = 0.050  # ms, inter-node all-reduce latency (more steps)
H100_NVLINK_ALPHA = 0.015  # ms, intra-node all-gather / reduce-scatter latency
H100_GEMM_ALPHA = 0.012  # ms per GEMM kernel (launch + tail)


def h100_ib400(gpus: int = 16) -> ClusterCosts:
    """A modern cluster: 8x H100 SXM per node, NVLink 4 inside, 400 Gb/s IB per GPU.

    Derivation (bf16, 2 bytes per element; 1 ms = 1e-3 s):

    * Inter-node bandwidth per GPU: 400 Gb/s = 50 GB/s, at 80 % efficiency
      40 GB/s. With ESP = 8 the EP group holds one GPU per node, so P = gpus/8
      ranks; an A2A keeps 1/P of its send buffer local and puts (P-1)/P on the
      wire: ``beta_a2a = 2 B * (P-1)/P / 40e9 B/s = 5e-11 s * (P-1)/P``
      = 2.5e-8 / 3.75e-8 / 4.17e-8 ms per element at 16 / 32 / 48 GPUs.
    * Dense-gradient all-reduce over all GPUs, hierarchical as NCCL does it:
      reduce-scatter inside the node on NVLink, an all-reduce of each GPU's
      1/8 shard across nodes on its own NIC, all-gather inside the node. A ring
      all-reduce moves 2(P-1)/P of its buffer per rank, here on 1/8 of the
      gradient: ``beta_ar = 2 B * 2(P-1)/P / 8 / 40e9`` = 6.25e-9 ms per
      element at 16 GPUs (the NVLink phases are pipelined with it and cost
      less, so they are not added).
    * Intra-node all-gather / reduce-scatter over 8 GPUs on NVLink 4: each GPU
      receives (sends) 7/8 of the gathered buffer at 450 GB/s x 0.8 = 360 GB/s:
      ``beta_ag = beta_rs = 2 B * 7/8 / 360e9`` = 4.86e-9 ms per element.
    * GEMMs: 989 TFLOP/s dense bf16 peak, 65 % reached on large GEMMs, 2 FLOPs
      per MAC: ``beta_gemm = 1 / (0.65 * 989e12 / 2) s`` = 3.11e-12 ms per MAC.
      An expert FFN is g GEMMs (2 GPT, 3 SwiGLU), so its intercept is
      g x 0.012 ms, times 1.3 as FSMoE inflates GEMM intercepts for
      interference between concurrent kernels. The attention block uses the
      same slope and 6 kernels' intercept.
    * Latencies: 30 us inter-node A2A, 50 us all-reduce, 15 us NVLink
      collectives (typical small-message NCCL times on such clusters).
    """
    if gpus % GPUS_PER_NODE or gpus < 2 * GPUS_PER_NODE:
        raise ValueError(f"preset 'h100-ib400' needs gpus a multiple of {GPUS_PER_NODE} and >= 16 (>= 2 nodes), got gpus={gpus}")
    nodes = gpus // GPUS_PER_NODE
    ib = H100_IB_GBPS / 8 * 1e9 * H100_LINK_EFFICIENCY  # bytes/s per GPU
    nvl = H100_NVLINK_GBS * 1e9 * H100_LINK_EFFICIENCY
    s_to_ms = 1e3
    beta_a2a = H100_BYTES_PER_ELEM * (nodes - 1) / nodes / ib * s_to_ms
    beta_ar = H100_BYTES_PER_ELEM * 2 * (nodes - 1) / nodes / GPUS_PER_NODE / ib * s_to_ms
    beta_nvl = H100_BYTES_PER_ELEM * (GPUS_PER_NODE - 1) / GPUS_PER_NODE / nvl * s_to_ms
    macs_per_s = H100_GEMM_EFFICIENCY * H100_BF16_TFLOPS * 1e12 / 2
    beta_gemm = 1.0 / macs_per_s * s_to_ms
    gemm = {ffn: LinearCost(1.3 * g * H100_GEMM_ALPHA, beta_gemm) for ffn, g in FFN_GEMMS.items()}
    return ClusterCosts(
        name="h100-ib400",
        a2a=LinearCost(H100_A2A_ALPHA, beta_a2a),
        allgather=LinearCost(H100_NVLINK_ALPHA, beta_nvl),
        reducescatter=LinearCost(H100_NVLINK_ALPHA, beta_nvl),
        allreduce=LinearCost(H100_ALLREDUCE_ALPHA, beta_ar),
        gemm=gemm,
        dense=LinearCost(6 * H100_GEMM_ALPHA, beta_gemm),
        gpus=gpus,
        gpus_per_node=GPUS_PER_NODE,
    )


# ---------------------------------------------------------------------------
# local: fitted on this machine
# ---------------------------------------------------------------------------

#: Collective kinds measured by :func:`measure_local`, in ClusterCosts field order.
LOCAL_COLLECTIVES = ("a2a", "allgather", "reducescatter", "allreduce")
LOCAL_COLL_SIZES = (1 << 14, 1 << 17, 1 << 19, 1 << 20)  # float32 elements per rank
LOCAL_GEMM_SIZES = ((128, 256, 256), (256, 512, 512), (512, 512, 1024), (512, 1024, 1024))  # (m, k, n)
LOCAL_CACHE_VERSION = 1


def fit_linear(ns: Sequence[float], ts: Sequence[float]) -> LinearCost:
    """Least-squares fit of ``t = alpha + beta * n``, clamped to alpha, beta >= 0.

    If the unconstrained fit gives a negative intercept (noise on a nearly
    proportional cost) the slope is refitted through the origin; a negative
    slope (cost flat in n) becomes the mean time with beta = 0.
    """
    if len(ns) != len(ts) or len(ns) < 2:
        raise ValueError(f"fit_linear needs >= 2 (n, t) pairs of equal length, got {len(ns)} and {len(ts)}")
    k = len(ns)
    mn = sum(ns) / k
    mt = sum(ts) / k
    sxx = sum((n - mn) ** 2 for n in ns)
    if sxx == 0:
        raise ValueError("fit_linear needs at least two distinct sizes n")
    beta = sum((n - mn) * (t - mt) for n, t in zip(ns, ts)) / sxx
    alpha = mt - beta * mn
    if beta < 0:
        return LinearCost(max(mt, 0.0), 0.0)
    if alpha < 0:
        beta = sum(n * t for n, t in zip(ns, ts)) / sum(n * n for n in ns)
        return LinearCost(0.0, max(beta, 0.0))
    return LinearCost(alpha, beta)


@dataclass
class LocalSamples:
    """Raw timings from :func:`measure_local`: per kind, sizes n and median ms."""

    coll: dict[str, list[tuple[float, float]]]  # kind -> [(elements, ms)]
    gemm: list[tuple[float, float]]  # [(MACs, ms)]


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def _measure_rank(rank: int, world_size: int, coll_sizes: tuple, gemm_sizes: tuple, reps: int) -> dict:
    """Run on each spawned rank: time the gloo collectives (both ranks) and GEMMs (rank 0)."""
    import time

    import torch
    import torch.distributed as dist

    def timed(fn: Callable[[], object]) -> float:
        fn()  # warm-up
        dist.barrier()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return _median(out)

    # torch >= 2.10 names them *_single; older versions only have *_tensor.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    coll: dict[str, list[tuple[float, float]]] = {k: [] for k in LOCAL_COLLECTIVES}
    for n in coll_sizes:
        n = n - n % world_size
        x = torch.randn(n)
        y = torch.empty(n)
        shard = torch.randn(n // world_size)
        coll["a2a"].append((n, timed(lambda: dist.all_to_all_single(y, x))))
        coll["allgather"].append((n, timed(lambda: all_gather(y, shard))))
        coll["reducescatter"].append((n, timed(lambda: reduce_scatter(shard, x))))
        coll["allreduce"].append((n, timed(lambda: dist.all_reduce(x))))
    gemm: list[tuple[float, float]] = []
    dist.barrier()
    if rank == 0:
        for m, k, n in gemm_sizes:
            a, b = torch.randn(m, k), torch.randn(k, n)
            t = timed_local(lambda: torch.mm(a, b), reps)
            gemm.append((float(m * k * n), t))
    dist.barrier()
    return {"coll": coll, "gemm": gemm}


def timed_local(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in ms over ``reps`` runs after one warm-up."""
    import time

    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return _median(out)


def measure_local(
    coll_sizes: Sequence[int] = LOCAL_COLL_SIZES,
    gemm_sizes: Sequence[tuple[int, int, int]] = LOCAL_GEMM_SIZES,
    reps: int = 7,
    timeout_s: float = 120.0,
) -> LocalSamples:
    """Time gloo collectives on 2 local ranks and CPU GEMMs; the only torch user in ``sim``.

    Ranks start through ``fsmoe_compiler.launch.run_ranks`` (one thread
    each). Each point is the median of ``reps`` timed runs after a warm-up.
    """
    from fsmoe_compiler.launch import run_ranks  # imports torch

    out = run_ranks(_measure_rank, 2, (tuple(coll_sizes), tuple(gemm_sizes), reps), timeout_s=timeout_s)
    r0 = out[0]
    return LocalSamples(coll={k: [tuple(p) for p in v] for k, v in r0["coll"].items()}, gemm=[tuple(p) for p in r0["gemm"]])


def fit_local(samples: LocalSamples, gpus: int = 2) -> ClusterCosts:
    """Turn :class:`LocalSamples` into ClusterCosts by least squares per kind.

    A GEMM sample is one ``mm``; an expert FFN is g GEMMs, so its intercept is
    g times the single GEMM's (slope per MAC unchanged), the attention block's
    6 times.
    """
    fits = {k: fit_linear([n for n, _ in v], [t for _, t in v]) for k, v in samples.coll.items()}
    g1 = fit_linear([n for n, _ in samples.gemm], [t for _, t in samples.gemm])
    return ClusterCosts(
        name="local",
        a2a=fits["a2a"],
        allgather=fits["allgather"],
        reducescatter=fits["reducescatter"],
        allreduce=fits["allreduce"],
        gemm={ffn: LinearCost(g * g1.alpha, g1.beta) for ffn, g in FFN_GEMMS.items()},
        dense=LinearCost(6 * g1.alpha, g1.beta),
        gpus=gpus,
        gpus_per_node=GPUS_PER_NODE,
    )


def default_cache_path() -> Path:
    """``$FSMOE_CACHE_DIR`` or ``$XDG_CACHE_HOME/fsmoe`` or ``~/.cache/fsmoe``, file ``local_costs.json``."""
    base = os.environ.get("FSMOE_CACHE_DIR")
    if base:
        return Path(base) / "local_costs.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "fsmoe" / "local_costs.json"


def _machine_key() -> dict:
    return {"version": LOCAL_CACHE_VERSION, "host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count()}


def _costs_to_json(samples: LocalSamples) -> dict:
    return {"machine": _machine_key(), "samples": asdict(samples)}


def local_costs(gpus: int = 16, *, refit: bool = False, cache_path: Path | str | None = None) -> ClusterCosts:
    """The ``local`` preset: fit from this machine's own measurements (cached).

    The raw samples are cached (not only the fit) so the fit can be checked and
    redone. A cache from another machine or an unreadable one is ignored with a
    warning and re-measured. The fit does not depend on ``gpus`` (2 local ranks
    cannot show how a cluster scales); ``gpus`` is only recorded.
    """
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    samples: LocalSamples | None = None
    if not refit and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("machine") != _machine_key():
                warnings.warn(f"ignoring local cost cache {path}: measured on another machine or version", stacklevel=2)
            else:
                s = data["samples"]
                samples = LocalSamples(
                    coll={k: [tuple(p) for p in v] for k, v in s["coll"].items()}, gemm=[tuple(p) for p in s["gemm"]]
                )
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"ignoring unreadable local cost cache {path}: {e}", stacklevel=2)
            samples = None
    if samples is None:
        samples = measure_local()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(_costs_to_json(samples), indent=1))
            tmp.replace(path)
        except OSError as e:
            warnings.warn(f"could not write local cost cache {path}: {e}", stacklevel=2)
    costs = fit_local(samples, gpus)
    return costs


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

PRESETS: dict[str, Callable[..., ClusterCosts]] = {
    "fsmoe-testbed": fsmoe_testbed,
    "h100-ib400": h100_ib400,
    "local": local_costs,
}
#: Presets run by ``fsmoe simulate`` when none is named. ``local`` is included:
#: it measures once (a few seconds) and is cached afterwards.
DEFAULT_PRESETS = ("fsmoe-testbed", "h100-ib400", "local")


def preset_names() -> list[str]:
    """Valid preset names, sorted."""
    return sorted(PRESETS)


def get_preset(name: str, gpus: int = 16, *, refit: bool = False) -> ClusterCosts:
    """ClusterCosts of preset ``name`` at ``gpus`` GPUs; ValueError naming the valid presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown cost preset {name!r}; valid presets: {', '.join(preset_names())}")
    if name == "local":
        return local_costs(gpus, refit=refit)
    return PRESETS[name](gpus)


def costs_table(costs: ClusterCosts) -> list[tuple[str, float, float]]:
    """Rows (operation, alpha ms, beta ms/unit) for printing a ClusterCosts."""
    rows = [(k, getattr(costs, k).alpha, getattr(costs, k).beta) for k in LOCAL_COLLECTIVES]
    rows += [(f"gemm[{ffn}]", c.alpha, c.beta) for ffn, c in sorted(costs.gemm.items())]
    rows.append(("dense", costs.dense.alpha, costs.dense.beta))
    return rows


__all__ = [
    "DEFAULT_PRESETS",
    "PRESETS",
    "LocalSamples",
    "costs_table",
    "default_cache_path",
    "fit_linear",
    "fit_local",
    "fsmoe_testbed",
    "get_preset",
    "h100_ib400",
    "local_costs",
    "measure_local",
    "preset_names",
]

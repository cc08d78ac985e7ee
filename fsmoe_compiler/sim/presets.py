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
    Fitted on this machine: collectives between 2 local gloo ranks and CPU
    GEMMs, least squares to ``alpha + beta * n``, the samples cached as JSON in
    the user's cache dir (``~/.cache/fsmoe/local_costs.json``; ``refit=True``
    re-measures). The measurement starts torch ranks, so it lives outside the
    simulator (``fsmoe_compiler.bench.links.measure_local``) and is handed to
    :func:`local_costs` / :func:`get_preset` as ``measure``; reading the cache
    and fitting stay here. Caches written with the old kind words (``a2a``,
    ``allgather``, ``reducescatter``, ``allreduce``) are still read.

Pure Python: imports the scheduler's ``LinearCost``, ``fsmoe_compiler.names``
and the standard library only.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from fsmoe_compiler.names import ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, COLLECTIVE_KINDS, REDUCE_SCATTER
from fsmoe_compiler.scheduler.costs import LinearCost
from fsmoe_compiler.sim.costs import FFN_GEMMS, ClusterCosts

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
        all_to_all=LinearCost(TESTBED_A2A_ALPHA, TESTBED_A2A_BETA[gpus]),
        all_gather=TESTBED_AG,
        reduce_scatter=TESTBED_RS,
        all_reduce=LinearCost(TESTBED_ALLREDUCE_ALPHA, TESTBED_ALLREDUCE_BETA[gpus]),
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
        all_to_all=LinearCost(H100_A2A_ALPHA, beta_a2a),
        all_gather=LinearCost(H100_NVLINK_ALPHA, beta_nvl),
        reduce_scatter=LinearCost(H100_NVLINK_ALPHA, beta_nvl),
        all_reduce=LinearCost(H100_ALLREDUCE_ALPHA, beta_ar),
        gemm=gemm,
        dense=LinearCost(6 * H100_GEMM_ALPHA, beta_gemm),
        gpus=gpus,
        gpus_per_node=GPUS_PER_NODE,
    )


# ---------------------------------------------------------------------------
# local: fitted on this machine
# ---------------------------------------------------------------------------

#: Collective kinds the ``local`` preset measures: every kind, in ClusterCosts field order.
LOCAL_COLLECTIVES: tuple[str, ...] = COLLECTIVE_KINDS
#: Version of the cache file's format and of what it holds; a cache of another version is re-measured.
LOCAL_CACHE_VERSION = 1
#: Kind words caches written before the kinds got one word each used (``a2a``, ...); read as their kind.
_LEGACY_KINDS = {"a2a": ALL_TO_ALL, "allgather": ALL_GATHER, "reducescatter": REDUCE_SCATTER, "allreduce": ALL_REDUCE}


@dataclass
class LocalSamples:
    """Raw timings of the ``local`` preset: per collective kind and for one GEMM, sizes n and median ms.

    A collective's ``n`` is elements per rank, as in every preset (the A2A's
    send buffer, the all-gather's output, the reduce-scatter's input, the
    all-reduce's buffer); a GEMM's is its MACs.
    """

    coll: dict[str, list[tuple[float, float]]]  # kind -> [(elements, ms)]
    gemm: list[tuple[float, float]]  # [(MACs, ms)]


def fit_local(samples: LocalSamples, gpus: int = 2) -> ClusterCosts:
    """Turn :class:`LocalSamples` into ClusterCosts by least squares per kind (:meth:`LinearCost.fit`).

    A GEMM sample is one ``mm``; an expert FFN is g GEMMs, so its intercept is
    g times the single GEMM's (slope per MAC unchanged), the attention block's
    6 times.
    """
    fits = {k: LinearCost.fit([n for n, _ in v], [t for _, t in v]) for k, v in samples.coll.items()}
    g1 = LinearCost.fit([n for n, _ in samples.gemm], [t for _, t in samples.gemm])
    return ClusterCosts(
        name="local",
        all_to_all=fits[ALL_TO_ALL],
        all_gather=fits[ALL_GATHER],
        reduce_scatter=fits[REDUCE_SCATTER],
        all_reduce=fits[ALL_REDUCE],
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


def _samples_from_json(s: dict) -> LocalSamples:
    """The cached samples; the old kind words (``a2a``, ``allgather``, ...) are read as their kinds.

    ValueError when a kind is missing or unknown (the cache is then re-measured).
    """
    coll = {_LEGACY_KINDS.get(k, k): [tuple(p) for p in v] for k, v in s["coll"].items()}
    if set(coll) != set(LOCAL_COLLECTIVES):
        raise ValueError(f"cached collective kinds {sorted(s['coll'])}, expected {', '.join(LOCAL_COLLECTIVES)}")
    return LocalSamples(coll=coll, gemm=[tuple(p) for p in s["gemm"]])


def local_costs(gpus: int = 16, *, refit: bool = False, cache_path: Path | str | None = None,
                measure: Callable[[], LocalSamples] | None = None) -> ClusterCosts:
    """The ``local`` preset: fitted from this machine's own measurements, cached.

    The raw samples are cached (not only the fit) so the fit can be checked and
    redone. A cache from another machine or an unreadable one is ignored with a
    warning. Measuring runs torch ranks, which the simulator does not import:
    ``measure`` (``fsmoe_compiler.bench.links.measure_local``, which is what
    ``fsmoe simulate`` passes) takes the samples when the cache is missing,
    unusable or ``refit`` asks; without it that is a ValueError. The fit does
    not depend on ``gpus`` (2 local ranks cannot show how a cluster scales);
    ``gpus`` is only recorded.
    """
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    samples: LocalSamples | None = None
    if not refit and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("machine") != _machine_key():
                warnings.warn(f"ignoring local cost cache {path}: measured on another machine or version", stacklevel=2)
            else:
                samples = _samples_from_json(data["samples"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"ignoring unreadable local cost cache {path}: {e}", stacklevel=2)
            samples = None
    if samples is None:
        if measure is None:
            why = "re-measuring was asked (refit)" if refit else f"no usable measurement is cached at {path}"
            raise ValueError(f"preset 'local': {why}, and measuring needs torch ranks, which the simulator does not "
                             "start: run `fsmoe simulate --preset local` (it measures and caches), or pass "
                             "measure=fsmoe_compiler.bench.links.measure_local")
        samples = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(_costs_to_json(samples), indent=1))
            tmp.replace(path)
        except OSError as e:
            warnings.warn(f"could not write local cost cache {path}: {e}", stacklevel=2)
    return fit_local(samples, gpus)


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


def get_preset(name: str, gpus: int = 16, *, refit: bool = False,
               measure: Callable[[], LocalSamples] | None = None) -> ClusterCosts:
    """ClusterCosts of preset ``name`` at ``gpus`` GPUs; ValueError naming the valid presets.

    ``refit`` and ``measure`` concern ``local`` only (see :func:`local_costs`).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown cost preset {name!r}; valid presets: {', '.join(preset_names())}")
    if name == "local":
        return local_costs(gpus, refit=refit, measure=measure)
    return PRESETS[name](gpus)


def costs_table(costs: ClusterCosts) -> list[tuple[str, float, float]]:
    """Rows (operation, alpha ms, beta ms/unit) for printing a ClusterCosts; collectives by kind."""
    rows = [(k, costs.collective(k).alpha, costs.collective(k).beta) for k in COLLECTIVE_KINDS]
    rows += [(f"gemm[{ffn}]", c.alpha, c.beta) for ffn, c in sorted(costs.gemm.items())]
    rows.append(("dense", costs.dense.alpha, costs.dense.beta))
    return rows


__all__ = [
    "DEFAULT_PRESETS",
    "PRESETS",
    "LocalSamples",
    "costs_table",
    "default_cache_path",
    "fit_local",
    "fsmoe_testbed",
    "get_preset",
    "h100_ib400",
    "local_costs",
    "preset_names",
]

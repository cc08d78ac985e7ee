"""The methods ``fsmoe bench`` compares, each a way to turn a model into a training-step runner.

* ``eager``: the model as is.
* ``dynamo``: ``torch.compile(backend="eager")``: Dynamo's graph run by
  PyTorch, as fsmoe's "as traced" variant runs it (the floor for fsmoe where
  nothing can overlap: Dynamo's guards and graph calls, nothing else).
* ``aot_eager``: ``torch.compile(backend="aot_eager")`` (AOTAutograd's forward
  and backward ATen graphs, run eagerly): the compiled baseline without any
  reordering.
* ``inductor``: plain ``torch.compile(model)``: Inductor's fused kernels
  (C++ on CPU), PyTorch's own default, with no overlap scheduling. Its first
  step compiles (tens of seconds on this machine; Inductor's caches make
  later runs faster).
* ``pytorch_overlap``: PyTorch's own overlap scheduler
  (``torch._inductor.fx_passes.overlap_scheduling.schedule_overlap_bucketing``)
  applied to the same forward and backward ATen graphs as ``aot_eager``, then
  run eagerly. Its default cost estimation benchmarks on a GPU; here it gets
  :class:`CpuRuntimeEstimator` (compute from FLOPs and bytes at rates measured
  on this CPU, collectives from alpha + bytes / link rate), so it runs on CPU
  and still reorders (start collectives early, wait late).
* ``inductor_overlap``: ``torch.compile(model)`` with PyTorch's overlap
  scheduling inside Inductor (``aten_distributed_optimizations``: the same
  scheduler as ``pytorch_overlap``, on Inductor's post-grad graphs, its order
  pinned with control dependencies, then Inductor's fused kernels), given the
  same CPU cost estimator.
* ``torchtitan_graph``: torchtitan's own graph_trainer EP-overlap passes (a
  make_fx joint forward + backward graph, the MoE layers split into 2 token
  chunks along the batch, the overlap schedule), on ``--model torchtitan``
  only (:mod:`fsmoe_compiler.bench.titan_graph`; skipped, with the reason,
  for other models or without torchtitan).
* ``fsmoe_sequential``, ``fsmoe_tutel``, ``fsmoe``: the fsmoe backend with the
  ``sequential``, ``tutel`` and CP-SAT (``pipeline_degree="auto"``) schedules.
* ``fsmoe_inductor``: ``fsmoe`` with ``codegen="inductor"``: the graph it
  chooses compiled by Inductor, the schedule's order pinned.
* ``fsmoe_partitioned``: ``fsmoe`` with ``grad_partition="auto"``: with
  ``--grad-sync graph``, the backward's gradient all-reduces merged into the
  partitions the measured costs price fastest (``passes.partition_grads``).
* ``fsmoe_bucket``: ``fsmoe`` with the gradients merged as DDP buckets them
  (``grad_partition`` = ``DDP_BUCKET_BYTES``, DDP's default 25 MiB cap): with
  ``--grad-sync graph``, each bucket one all-reduce issued when its last
  gradient exists; a model under 25 MiB of gradients gets one bucket after
  its last gradient, the baseline partitioning must beat.
"""

from __future__ import annotations

import time
from unittest import mock
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

#: The methods ``fsmoe bench`` times, in table order (the simulator's are ``sim.methods.METHODS``).
BENCH_METHODS: tuple[str, ...] = ("eager", "dynamo", "aot_eager", "inductor", "pytorch_overlap", "inductor_overlap",
                                  "torchtitan_graph", "fsmoe_sequential", "fsmoe_tutel", "fsmoe", "fsmoe_inductor",
                                  "fsmoe_partitioned", "fsmoe_bucket")

#: DDP's default bucket cap (``bucket_cap_mb=25``): ``fsmoe_bucket``'s gradient partitions.
DDP_BUCKET_BYTES = 25 << 20

FSMOE_OPTIONS: dict[str, dict[str, Any]] = {
    "fsmoe_sequential": {"scheduler": "sequential"},
    "fsmoe_tutel": {"scheduler": "tutel"},
    "fsmoe": {"scheduler": "cpsat", "pipeline_degree": "auto"},
    "fsmoe_inductor": {"scheduler": "cpsat", "pipeline_degree": "auto", "codegen": "inductor"},
    "fsmoe_partitioned": {"scheduler": "cpsat", "pipeline_degree": "auto", "grad_partition": "auto"},
    "fsmoe_bucket": {"scheduler": "cpsat", "pipeline_degree": "auto", "grad_partition": DDP_BUCKET_BYTES},
}


def parse_methods(spec: str | list[str] | None) -> list[str]:
    """``"eager,fsmoe"`` (or a list) -> validated method names in the given order; None -> all.

    ValueError names the unknown ones and lists the valid methods.
    """
    if spec is None:
        return list(BENCH_METHODS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in BENCH_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid methods: {', '.join(BENCH_METHODS)}")
    if not names:
        raise ValueError(f"no methods given; valid methods: {', '.join(BENCH_METHODS)}")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


# --------------------------------------------------------------------------------------------
# A CPU cost estimator for PyTorch's overlap scheduler
# --------------------------------------------------------------------------------------------


def _vals(x: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda n: n.meta.get("val") if isinstance(n, fx.Node) else n, x)


def _nbytes(x: Any) -> int:
    leaves, _ = torch.utils._pytree.tree_flatten(x)
    total = 0
    for t in leaves:
        if isinstance(t, torch.Tensor):
            try:
                total += int(t.numel()) * t.element_size()
            except Exception:  # noqa: BLE001 - unbacked sizes: count nothing
                pass
    return total


def measure_cpu_rates(threads: int | None = None) -> tuple[float, float]:
    """``(flops per ms, bytes per ms)`` of this CPU at the current thread count: a 256^3 matmul and a 4 MB copy."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    src, dst = torch.randn(1 << 20), torch.empty(1 << 20)

    def best(fn: Callable[[], Any], reps: int = 7) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    best(lambda: a @ b, 2)
    flops_per_ms = 2 * 256**3 / max(best(lambda: a @ b), 1e-6)
    bytes_per_ms = 2 * src.numel() * 4 / max(best(lambda: dst.copy_(src)), 1e-6)
    return flops_per_ms, bytes_per_ms


@dataclass
class CpuRuntimeEstimator:
    """``custom_runtime_estimation(node, override_size) -> ms`` for every node, CPU-only.

    Compute ops: max(FLOPs / flops_per_ms, bytes moved / bytes_per_ms) (a
    roofline at rates measured on this CPU); collectives (``_c10d_functional``
    ops other than ``wait_tensor``): ``alpha_ms + bytes * (W-1)/W / link_bytes_per_ms``
    (the share of the buffer that leaves the rank); waits: 0.
    """

    flops_per_ms: float
    bytes_per_ms: float
    link_bytes_per_ms: float
    world_size: int
    alpha_ms: float = 0.1
    calls: int = field(default=0, compare=False)

    def __call__(self, node: fx.Node, override_size: int | None = None) -> float | None:
        self.calls += 1
        if node.op != "call_function":
            return 0.0
        target = node.target
        ns = getattr(getattr(target, "_schema", None), "name", "") or str(target)
        if "_c10d_functional" in ns:
            if "wait_tensor" in ns:
                return 0.0
            nbytes = override_size if override_size is not None else _nbytes(_vals(node.args))
            share = (self.world_size - 1) / max(self.world_size, 1)
            return self.alpha_ms + nbytes * share / self.link_bytes_per_ms
        from torch._inductor.fx_passes.overlap_scheduling import _get_flop_registry_key

        args, kwargs, out = _vals(node.args), _vals(node.kwargs), node.meta.get("val")
        mem_ms = (_nbytes((args, kwargs)) + _nbytes(out)) / self.bytes_per_ms
        key = _get_flop_registry_key(target)
        flop_ms = 0.0
        if key is not None and out is not None:
            try:
                flops = torch.utils.flop_counter.flop_registry[key](*args, out_val=out, **kwargs)
                flop_ms = float(flops) / self.flops_per_ms
            except Exception:  # noqa: BLE001 - a formula that does not fit: memory bound only
                flop_ms = 0.0
        return max(flop_ms, mem_ms)


@dataclass
class OverlapStats:
    """What PyTorch's overlap scheduler did to each graph it saw."""

    graphs: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        keys = ("collectives", "moved", "overlapped_before", "overlapped_after", "exposed", "potentially_hidden")
        return {k: sum(g[k] for g in self.graphs) for k in keys}


def _collective_spans(gm: fx.GraphModule) -> dict[str, tuple[int, int, int]]:
    """collective start name -> (start index, wait index, compute nodes between them) in graph order."""
    from torch._inductor.fx_passes.overlap_scheduling import is_compute_node

    nodes = list(gm.graph.nodes)
    idx = {n: i for i, n in enumerate(nodes)}
    compute_prefix = [0]
    for n in nodes:
        compute_prefix.append(compute_prefix[-1] + (1 if is_compute_node(n) else 0))
    spans = {}
    for n in nodes:
        if n.op == "call_function" and "wait_tensor" in str(n.target):
            start = n.args[0]
            if isinstance(start, fx.Node) and start in idx:
                s, w = idx[start], idx[n]
                spans[start.name] = (s, w, compute_prefix[w] - compute_prefix[s + 1])
    return spans


def overlap_backend(estimator: CpuRuntimeEstimator, stats: OverlapStats | None = None) -> Callable:
    """A dynamo backend: AOTAutograd + ``schedule_overlap_bucketing`` on the forward and backward graphs, run eagerly."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.fx_passes import overlap_scheduling
    from torch._inductor.fx_passes.overlap_scheduling import schedule_overlap_bucketing

    def compiler(gm: fx.GraphModule, example_inputs: Any) -> Callable:
        from torch._dynamo.utils import counters

        before = _collective_spans(gm)
        keys = ("overlap_scheduling_exposed", "overlap_scheduling_potentially_hidden")
        counted = {k: counters["inductor"][k] for k in keys}
        # The scheduler also calls its GPU roofline (triton's DRAM bandwidth) for every compute
        # node, even with a custom estimator; point that at the CPU estimate for this call.
        with mock.patch.object(overlap_scheduling, "estimate_roofline_runtime_ms", lambda n: estimator(n, None)):
            gm = schedule_overlap_bucketing(
                gm,
                custom_runtime_estimation=estimator,
                collective_estimator="analytical",
                compute_estimator="analytical",
                max_memory_increase_gb=4.0,  # None for both trips over a missing tracker in torch 2.13
                max_memory_increase_ratio=None,
            )
        gm.recompile()
        after = _collective_spans(gm)
        if stats is not None:
            stats.graphs.append(
                {
                    "collectives": len(after),
                    "moved": sum(1 for k, v in after.items() if k in before and v[:2] != before[k][:2]),
                    "overlapped_before": sum(1 for v in before.values() if v[2] > 0),
                    "overlapped_after": sum(1 for v in after.values() if v[2] > 0),
                    # the scheduler's own verdict (torch counters): collectives it left exposed / could hide
                    "exposed": counters["inductor"][keys[0]] - counted[keys[0]],
                    "potentially_hidden": counters["inductor"][keys[1]] - counted[keys[1]],
                    # issue order of the collectives: must be the same on every rank
                    "order": [k for k, _ in sorted(after.items(), key=lambda kv: kv[1][0])],
                }
            )
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def inductor_overlap_runner(model: nn.Module, estimator: CpuRuntimeEstimator) -> Callable[..., torch.Tensor]:
    """``torch.compile(model)`` with Inductor's own overlap scheduling on, priced by ``estimator``.

    The scheduler asks triton for the GPU's rates: its roofline for every compute node and the DRAM
    bandwidth for fused regions. For the rest of this (bench worker) process those answer from the CPU
    estimate and the CPU's measured copy rate (GB/s), since the backward graph compiles inside
    ``loss.backward()``, out of any call's reach; on CPU they only fail otherwise.
    """
    from torch._inductor.fx_passes import overlap_scheduling
    from torch.utils import _runtime_estimation

    mock.patch.object(overlap_scheduling, "estimate_roofline_runtime_ms", lambda n: estimator(n, None)).start()
    mock.patch.object(_runtime_estimation, "get_gpu_dram_gbps", lambda: estimator.bytes_per_ms / 1e6).start()
    return torch.compile(model, options={
        "aten_distributed_optimizations.enable_overlap_scheduling": True,
        "aten_distributed_optimizations.custom_runtime_estimation": estimator,
        "aten_distributed_optimizations.collective_estimator": "analytical",
        "aten_distributed_optimizations.compute_estimator": "analytical",
        "aten_distributed_optimizations.max_memory_increase_gb": 4.0,
    })


@dataclass
class MethodSetup:
    """A method applied to one model: ``runner(*batch)`` is the loss; ``info`` goes to the report."""

    name: str
    model: nn.Module
    runner: Callable[..., torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    stats: OverlapStats | None = None


def make_runner(
    name: str,
    model: nn.Module,
    *,
    world_size: int,
    link_bytes_per_ms: float,
    cpu_rates: tuple[float, float] | None = None,
    fsmoe_extra: dict[str, Any] | None = None,
) -> MethodSetup:
    """Wrap ``model`` for method ``name`` (compilation itself happens on the first call)."""
    if name == "eager":
        return MethodSetup(name, model, model)
    if name == "dynamo":
        return MethodSetup(name, model, torch.compile(model, backend="eager"))
    if name == "aot_eager":
        return MethodSetup(name, model, torch.compile(model, backend="aot_eager"))
    if name == "inductor":
        return MethodSetup(name, model, torch.compile(model))
    if name == "pytorch_overlap":
        flops, mem = cpu_rates or measure_cpu_rates()
        est = CpuRuntimeEstimator(flops, mem, link_bytes_per_ms, world_size)
        stats = OverlapStats()
        info = {"flops_per_ms": flops, "bytes_per_ms": mem, "link_bytes_per_ms": link_bytes_per_ms}
        return MethodSetup(name, model, torch.compile(model, backend=overlap_backend(est, stats)), info, stats)
    if name == "inductor_overlap":
        flops, mem = cpu_rates or measure_cpu_rates()
        est = CpuRuntimeEstimator(flops, mem, link_bytes_per_ms, world_size)
        info = {"flops_per_ms": flops, "bytes_per_ms": mem, "link_bytes_per_ms": link_bytes_per_ms}
        return MethodSetup(name, model, inductor_overlap_runner(model, est), info)
    if name == "torchtitan_graph":
        from .titan_graph import titan_graph_runner

        step = titan_graph_runner(model)  # MethodSkipped (with the reason) for other models or without torchtitan
        return MethodSetup(name, model, step, step.info)
    if name in FSMOE_OPTIONS:
        options = dict(FSMOE_OPTIONS[name], **(fsmoe_extra or {}))
        return MethodSetup(name, model, torch.compile(model, backend="fsmoe", options=options), {"options": options})
    raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(BENCH_METHODS)}")


def warmup_steps(name: str, requested: int, fsmoe_extra: dict[str, Any] | None = None) -> int:
    """Untimed steps for method ``name``: ``requested``, and for fsmoe methods at least enough for the
    profiling calls and the per-task measured calls to be over, so timed steps run the scheduled graph."""
    if name not in FSMOE_OPTIONS:
        return requested
    try:
        from fsmoe_compiler.config import FSMoEConfig

        cfg = FSMoEConfig.from_options(dict(FSMOE_OPTIONS[name], **(fsmoe_extra or {})))
    except Exception:  # noqa: BLE001 - the method will fail at compile and say why
        return requested
    needed = int(getattr(cfg, "profile_steps", 0) or 0) + int(getattr(cfg, "measure_steps", 0) or 0) + 1
    return max(requested, needed)


def fsmoe_summary(model: nn.Module) -> dict[str, Any]:
    """Per graph kind of the fsmoe-compiled ``model``: scheduler, degrees, predicted and measured ms, plan s.

    Read from ``fsmoe_compiler.records`` (best effort: an error is returned as ``{"error": ...}``).
    """
    try:
        from fsmoe_compiler.records import records_for

        out: dict[str, Any] = {}
        for rec in records_for(model):
            for kind in ("forward", "backward"):
                g = rec.latest(kind)
                if g is None:
                    continue
                sch = g.schedule
                row: dict[str, Any] = {"fallback": g.fallback, "compile_s": g.compile_s, "codegen": g.codegen,
                                       "codegen_s": g.codegen_s,
                                       "wait_s": g.wait_s + (sch.wait_s if sch is not None else 0.0)}
                if sch is not None:
                    row.update(
                        scheduler=sch.scheduler,
                        degrees={str(k): v for k, v in sch.degrees.items()},
                        predicted_ms=sch.predicted_ms,
                        measured_ms=sch.measured_ms,
                        plan_s=sch.plan_s,
                        plan_split_s=dict(sch.plan_split_s),
                        status=sch.status,
                        reference_ms=dict(sch.reference_ms),
                        links={k: list(v) for k, v in sch.links.items()},
                        notes=list(sch.notes)[:5],
                    )
                out[f"{kind}{rec.id}" if kind in out else kind] = row
            if rec.split_choice:
                out["token_split"] = rec.split_choice[-1]
        return out
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}

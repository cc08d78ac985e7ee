"""One rank of ``fsmoe bench``: ``python -m fsmoe_compiler.bench.worker CONFIG RANK OUT``.

Started by :mod:`fsmoe_compiler.bench.runner` as a plain subprocess (inside the
rank's network namespace when the link is emulated), so it takes its rendezvous
from the environment (``MASTER_ADDR``, ``MASTER_PORT``, ``GLOO_SOCKET_IFNAME``)
and hands its raw timings back as a JSON file. Each method builds its model from
the same seed, warms up (the first call compiles) and puts its weights back, so
every method's timed steps train from the same weights; then the methods' timed
steps run round-robin, one step of each per repeat (the first method rotates),
so drift hits all alike.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from fsmoe_compiler.names import ALL_TO_ALL

from fsmoe_compiler import split_choice

from . import allocator
from .records import BenchConfig, RankMethodRaw

#: --grad-sync bucket: all dense gradients in one all-reduce (``sync_gradients``' ``bucket_mb``).
GRAD_BUCKET_MB = math.inf
#: Warm-up steps beyond the requested ones while a whole-or-split graph is still measuring both variants.
MAX_EXTRA_WARMUP = 100
#: The replayed all-to-alls are timed as float32 tensors.
_FLOAT32_BYTES = 4


def _agree(values: list[float], op: dist.ReduceOp) -> list[float]:
    """All-reduce ``values`` with ``op`` so every rank holds the same numbers (schedules must agree)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def measure_link(world_size: int, nbytes: int = 1 << 22, reps: int = 3) -> tuple[float, float]:
    """``(alpha_ms, bytes_per_ms)`` of an all-to-all on the default group: a tiny and a ``nbytes`` message.

    bytes_per_ms counts the bytes that leave the rank ((W-1)/W of the buffer).
    Max of the times over ranks, so every rank gets the same answer.
    """
    best = best_all_to_all_ms([1024, nbytes], reps=reps)
    small, big = _agree([best[1024], best[nbytes]], dist.ReduceOp.MAX)
    share = nbytes * (world_size - 1) / world_size
    return small, share / max(big - small, 1e-3)


def best_all_to_all_ms(sizes_bytes: list[int], reps: int = 3) -> dict[int, float]:
    """Best-of-``reps`` ms of one float32 all-to-all on the default group, per message size in bytes sent.

    Timed by the profiler's ``microbenchmark_collectives`` (a warm-up, then a
    barrier before each repetition, so rank skew is not billed to the link;
    each size rounded down to whole elements that split evenly over the ranks).
    Collective: every rank calls it with the same sizes.
    """
    from fsmoe_compiler.profiler.comm import microbenchmark_collectives

    return {n: min(s["ms"] for s in microbenchmark_collectives(kinds=(ALL_TO_ALL,), sizes_bytes=(n,), repeats=reps))
            for n in sorted(set(sizes_bytes))}


_COMM_RE = re.compile(r"all_to_all|wait_tensor|allreduce|all_reduce|alltoall")


def sync_dense_gradients(model: torch.nn.Module) -> None:
    """--grad-sync bucket: ``moe.parallel.sync_gradients`` with every dense gradient in one flat all-reduce.

    One bucket (as DDP buckets do) instead of one all-reduce per parameter,
    whose per-call latency would otherwise dominate a step on an emulated link.
    """
    from fsmoe_compiler.moe.parallel import sync_gradients

    sync_gradients(model, bucket_mb=GRAD_BUCKET_MB)


def eager_breakdown(fwd_bwd: Callable[[], Any], sync: Callable[[], None]) -> dict[str, float]:
    """Split one eager step into all-to-all, gradient sync and compute, in ms.

    * ``all_to_all_ms``: torch.profiler's outermost collective / ``wait_tensor``
      events of the forward + backward (includes waiting for the other rank);
    * ``all_to_all_wire_ms``: the same all-to-alls (shapes from the profile)
      replayed alone after a barrier: the link time without rank skew;
    * ``grad_sync_ms``: the gradient all-reduce, timed after a barrier (with
      ``--grad-sync graph``: the all-reduce events inside backward);
    * ``compute_ms``: forward + backward wall time minus ``all_to_all_ms``;
    * ``expert_gemm_ms``: of that, the experts' batched GEMMs (``aten::bmm``
      outside attention), forward and backward.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        fwd_bwd()
        model_ms = (time.perf_counter() - t) * 1e3
    a2a_us, ar_us, bmm_us, shapes = 0.0, 0.0, 0.0, []
    for ev in prof.events():
        if ev.name in ("aten::bmm", "aten::_grouped_mm"):  # the experts' GEMMs (attention's bmm sits under an attention op)
            parent, inside = ev.cpu_parent, False
            while parent is not None:
                if parent.name in ("aten::bmm", "aten::_grouped_mm") or "attention" in parent.name:
                    inside = True
                    break
                parent = parent.cpu_parent
            if not inside:
                bmm_us += ev.cpu_time_total
        if ev.name == "c10d::alltoall_base_" and ev.input_shapes and ev.input_shapes[0]:
            shapes.append(list(ev.input_shapes[0]))  # one per all-to-all actually issued
        # gloo's own events run on its worker threads, beside the caller's; count the caller's side only
        if ev.name.startswith("gloo:") or not _COMM_RE.search(ev.name):
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            if _COMM_RE.search(parent.name):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            if "all_reduce" in ev.name or "allreduce" in ev.name:
                ar_us += ev.cpu_time_total  # --grad-sync graph: the gradient all-reduces inside backward
            else:
                a2a_us += ev.cpu_time_total
    dist.barrier()
    t = time.perf_counter()
    sync()
    sync_ms = (time.perf_counter() - t) * 1e3 + ar_us / 1e3
    # every rank replays the same list (rank 0's), so the collectives match
    box = [shapes]
    dist.broadcast_object_list(box, src=0)
    sizes = [_FLOAT32_BYTES * math.prod(s) for s in box[0]]
    best = best_all_to_all_ms(sizes) if sizes else {}
    wire_ms = sum(best[n] for n in sizes)
    a2a_ms = a2a_us / 1e3
    return {
        "step_ms": model_ms + sync_ms - ar_us / 1e3,
        "fwd_bwd_ms": model_ms,
        "all_to_all_ms": a2a_ms,
        "all_to_all_count": float(len(box[0])),
        "all_to_all_wire_ms": wire_ms,
        "grad_sync_ms": sync_ms,
        "compute_ms": max(model_ms - a2a_ms - ar_us / 1e3, 0.0),
        "expert_gemm_ms": bmm_us / 1e3,
    }


def _log(rank: int, msg: str) -> None:
    """Progress on stderr (the launcher keeps each rank's log and shows its tail when a rank fails)."""
    print(f"[rank {rank} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def describe_error(exc: BaseException) -> str:
    """``"Type: first line"`` of the root cause (a backend's error is wrapped by dynamo's BackendCompilerFailed)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def run_worker(rank: int, world_size: int, cfg: BenchConfig) -> dict[str, Any]:
    """This rank's raw results: ``{"methods": {name: RankMethodRaw as dict}, "link": ..., "breakdown": ...}``."""
    import torch._dynamo

    from fsmoe_compiler.demo import example_module
    from fsmoe_compiler.moe.parallel import sync_gradients_in_graph

    from .methods import FSMOE_OPTIONS, fsmoe_summary, make_runner, measure_cpu_rates, warmup_steps

    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    torch._dynamo.config.accumulated_recompile_limit = max(1024, torch._dynamo.config.accumulated_recompile_limit)
    mod = example_module(cfg.model)

    alpha_ms, link_bytes_per_ms = measure_link(world_size)
    flops, mem = _agree(list(measure_cpu_rates()), dist.ReduceOp.MIN)
    out: dict[str, Any] = {
        "link": {"alpha_ms": alpha_ms, "bytes_per_ms": link_bytes_per_ms},
        "cpu": {"flops_per_ms": flops, "bytes_per_ms": mem},
        "malloc": allocator.in_use(),
        "methods": {},
    }

    setups: dict[str, Any] = {}
    raws: dict[str, RankMethodRaw] = {}
    batch: tuple | None = None
    for name in cfg.methods:
        raw = raws[name] = RankMethodRaw()
        try:
            torch.manual_seed(cfg.seed)
            model = mod.build_model(**cfg.model_overrides())
            if cfg.grad_sync == "graph":
                sync_gradients_in_graph(model)
            if batch is None:
                c = model.config
                batch = tuple(mod.make_batch(cfg.batch, c.seq_len, c.vocab_size, seed=1000 + rank))
            setup = make_runner(name, model, world_size=world_size, link_bytes_per_ms=link_bytes_per_ms,
                                cpu_rates=(flops, mem), fsmoe_extra=cfg.fsmoe_options)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            sync = sync_dense_gradients if cfg.grad_sync == "bucket" else _synced_in_backward
            step = _make_step(setup.runner, model, opt, batch, sync)
            start = _snapshot(model)
            raw.info["warmup_steps"] = warmup_steps(name, cfg.warmup, cfg.fsmoe_options)
            for i in range(raw.info["warmup_steps"]):
                _log(rank, f"{name}: warm-up step {i}")
                t = time.perf_counter()
                loss = step()
                if i == 0:
                    raw.compile_s = time.perf_counter() - t
                    raw.first_loss = float(loss)
            extra = 0  # a whole-or-split graph measures both variants first: warm up until it has chosen
            while split_choice.unsettled() and extra < MAX_EXTRA_WARMUP:
                step()
                extra += 1
            raw.info["warmup_steps"] += extra
            _restore(model, opt, start)  # every method's timed steps start from the same weights
            setups[name] = (setup, step)
        except Exception as exc:  # noqa: BLE001 - a failing method is reported, the others go on
            raw.error = describe_error(exc)
            raw.info["traceback"] = traceback.format_exc()[-4000:]
            _log(rank, f"{name} failed: {raw.error}\n{raw.info['traceback']}")
        # every rank must agree on which methods go on (a one-sided failure would desync collectives)
        failed = _agree([1.0 if raw.error else 0.0], dist.ReduceOp.MAX)[0]
        if failed and not raw.error:
            raw.error = "failed on another rank"
        if raw.error:
            setups.pop(name, None)

    gc.collect()
    names = list(setups)
    _log(rank, f"timed steps of {', '.join(names) or 'no method'}")
    for rep in range(cfg.steps):
        # round-robin, and the starting method rotates, so no method always follows the same one
        for name in names[rep % len(names):] + names[: rep % len(names)] if names else []:
            setup, step = setups[name]
            dist.barrier()
            t = time.perf_counter()
            step()
            raws[name].times_ms.append((time.perf_counter() - t) * 1e3)

    for name, (setup, _) in setups.items():
        if setup.stats is not None:
            raws[name].info["overlap"] = {"per_graph": setup.stats.graphs, **setup.stats.summary()}
        raws[name].info.update(setup.info)
        if name in FSMOE_OPTIONS:
            raws[name].info["fsmoe"] = fsmoe_summary(setup.model)
            if cfg.trace_dir:
                raws[name].info["trace"] = _write_trace(setup.model, cfg.trace_dir, f"{name}.rank{rank}.json")

    if cfg.breakdown and "eager" in setups:
        setup, _ = setups["eager"]
        model = setup.model
        model.zero_grad(set_to_none=True)
        dist.barrier()
        out["breakdown"] = eager_breakdown(lambda: model(*batch).backward(), lambda: (sync_dense_gradients if cfg.grad_sync == "bucket" else _synced_in_backward)(model))

    out["methods"] = {name: dataclasses.asdict(raw) for name, raw in raws.items()}
    return out


def _write_trace(model: torch.nn.Module, directory: str, filename: str) -> str:
    """``export_trace`` of an fsmoe-compiled model into ``directory``; the path, or why it could not be written."""
    from fsmoe_compiler import export_trace

    path = os.path.join(directory, filename)
    try:
        os.makedirs(directory, exist_ok=True)
        export_trace(model, path)
    except Exception as exc:  # noqa: BLE001 - a trace is a by-product: say why, keep the timings
        return f"not written: {describe_error(exc)}"
    return path


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s parameters and buffers, to put back after warm-up."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer, start: dict[str, torch.Tensor]) -> None:
    """Put ``model``'s weights back to ``start`` in place (compiled graphs keep their tensors) and clear the
    optimizer's state, so every method's timed steps train from the same weights.

    Warm-up lengths differ (an fsmoe method measures its variants for tens of steps, eager takes 2), and
    with dropless routing the weights decide how many tokens each expert and rank gets: measured, the same
    Dynamo graph ran 3-7 % slower or faster after 60 more SGD steps than after 2."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(start[k])
    opt.zero_grad(set_to_none=True)
    opt.state.clear()


def _synced_in_backward(model: torch.nn.Module) -> None:
    """--grad-sync graph: backward already averaged the gradients (``sync_gradients_in_graph``)."""


def _make_step(runner: Callable, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple,
               sync: Callable[[torch.nn.Module], None]) -> Callable[[], torch.Tensor]:
    """One training step: forward, backward, gradient sync (outside any graph, one bucket), SGD update."""

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = runner(*batch)
        loss.backward()
        sync(model)
        opt.step()
        return loss.detach()

    return step


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """Exit when the launcher goes away (it was killed outright): a rank never outlives its run."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="fsmoe-bench-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank process; the exit code is 0 when the result file was written."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m fsmoe_compiler.bench.worker CONFIG_JSON RANK OUT_JSON", file=sys.stderr)
        return 2
    cfg_path, rank_s, out_path = argv
    _exit_with_parent()
    with open(cfg_path) as f:
        cfg = BenchConfig.from_json(f.read())
    rank = int(rank_s)
    torch.set_num_threads(cfg.threads)
    result: dict[str, Any]
    try:
        dist.init_process_group("gloo", rank=rank, world_size=cfg.ranks,
                                timeout=timedelta(seconds=cfg.pg_timeout_s))
        if os.environ.get("FSMOE_BENCH_TEST_CRASH_RANK") == str(rank):  # fault injection for the tests
            os._exit(3)
        result = {"ok": True, **run_worker(rank, cfg.ranks, cfg)}
    except BaseException:  # noqa: BLE001 - the parent wants the cause
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The prepared GPU check: one rank, a toy MoE whose dispatch and combine go through the functional all-to-all,
compiled with ``backend="fsmoe"`` (``strict=True``, pipeline degree 2), trained beside eager.

    python scripts/gpu_check.py                  # CUDA + NCCL when a GPU is there, else CPU + gloo
    python scripts/gpu_check.py --device cpu     # the same checks that make sense without a GPU

It asserts, and prints what it measured:

* every step's loss and every gradient equal eager's (bitwise where nothing is chunked, else within 1e-5);
* the scheduled graphs are in (degree 2 per layer), with positive predicted and measured times;
* peak memory: the report's scheduled-order peak against the traced order, and on CUDA
  ``torch.cuda.max_memory_allocated``;
* CUDA only: a steady-state step makes no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``),
  and in a ``torch.profiler`` trace the NCCL kernels run on a stream no compute kernel runs on.

A world of one keeps it to one GPU; the all-to-all still runs through NCCL (a copy), so the graph has
collectives for the backend to schedule. Exit status 0 when every check passed. Under 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from fsmoe_compiler.moe.dispatch import CapacityDispatcher, _a2a, capacity_combine, capacity_dispatch

D_MODEL, D_FF, EXPERTS, TOKENS = 64, 128, 4, 256
OPTIONS = {"strict": True, "pipeline_degree": 2, "profile_steps": 2, "measure_steps": 1, "time_limit_s": 1.0}
STEPS = 10  # warm-up, 2 profiling calls, the measured call, then scheduled steps


class ExchangingDispatcher(CapacityDispatcher):
    """Capacity dispatch that sends the expert buffer through the functional all-to-all even in a world of one
    (as expert parallelism does over more ranks), so the compiled graphs have collectives to schedule."""

    def forward(self, x, routing, experts):  # type: ignore[override]
        cap = self.capacity(x.shape[0], routing.indices.shape[1])
        buf, slot, weights = capacity_dispatch(x, routing.gates, routing.indices, self.num_experts, cap)
        recv = _a2a(buf.contiguous(), None, None, self.group)
        out = experts.forward_capacity(recv.view_as(buf))
        back = _a2a(out.contiguous(), None, None, self.group)
        return capacity_combine(back.view_as(buf), slot, weights)


class ToyMoE(nn.Module):
    """Two MoE layers (gshard top-2, capacity) with a dense projection between."""

    def __init__(self) -> None:
        super().__init__()
        from fsmoe_compiler.moe import MoELayer

        self.layers = nn.ModuleList()
        for _ in range(2):
            layer = MoELayer(D_MODEL, D_FF, EXPERTS, router="gshard", dispatch="capacity", ep_group="local")
            layer.dispatcher = ExchangingDispatcher(EXPERTS, 1.25, 1, dist.group.WORLD, 1)
            self.layers.append(layer)
        self.proj = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = x.new_zeros(())
        for i, layer in enumerate(self.layers):
            y, a = layer(x)
            x = x + y
            aux = aux + a
            if i == 0:
                x = torch.relu(self.proj(x))
        return x.pow(2).mean() + 0.01 * aux


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model: nn.Module, runner: Any, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = runner(x)
    loss.backward()
    return float(loss), _grads(model)


def _nccl_streams(trace_path: str) -> tuple[set, set]:
    """The CUDA streams NCCL kernels and other kernels ran on, read off a Chrome trace."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    nccl, compute = set(), set()
    for e in events:
        if e.get("cat") != "kernel":
            continue
        stream = (e.get("args") or {}).get("stream")
        (nccl if "nccl" in e.get("name", "").lower() else compute).add(stream)
    return nccl, compute


def check(rank: int, world_size: int, device_name: str) -> dict[str, Any]:
    """One rank's run: train eager and compiled side by side, then the steady-state checks."""
    import fsmoe_compiler

    device = torch.device(device_name, torch.cuda.current_device()) if device_name == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    eager = ToyMoE().to(device)
    torch.manual_seed(0)
    fs = ToyMoE().to(device)
    compiled = torch.compile(fs, backend="fsmoe", options=OPTIONS)
    worst, losses = 0.0, []
    for step in range(STEPS):
        x = torch.randn(TOKENS, D_MODEL, device=device)
        le, ge = _step(eager, eager, x)
        lf, gf = _step(fs, compiled, x)
        losses.append((le, lf))
        assert ge.keys() == gf.keys(), "gradients of different parameters"
        for k in ge:
            worst = max(worst, float((ge[k] - gf[k]).abs().max()))
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in losses), f"losses differ: {losses}"
    assert worst <= 1e-5, f"gradients differ by {worst}"
    rep = fsmoe_compiler.report(compiled)
    out: dict[str, Any] = {"losses": losses, "worst_grad_diff": worst, "graphs": {}}
    for g in rep.graphs():
        s = g.schedule
        assert s is not None, f"the {g.kind} graph was not scheduled: {g.fallback or g.notes}"
        assert set(s.degrees.values()) == {2}, f"{g.kind}: degrees {s.degrees}"
        assert s.predicted_ms > 0 and s.measured_ms and s.measured_ms > 0, f"{g.kind}: times {s.predicted_ms}, {s.measured_ms}"
        out["graphs"][g.kind] = {"degrees": s.degrees, "predicted_ms": s.predicted_ms, "measured_ms": s.measured_ms,
                                 "peak_bytes": s.peak_bytes, "traced_peak_bytes": s.traced_peak_bytes}
    x = torch.randn(TOKENS, D_MODEL, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the steady-state step raises
        try:
            _step_no_sync(fs, compiled, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        out["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _step_no_sync(fs, compiled, x)
            torch.cuda.synchronize()
        path = os.path.join(tempfile.mkdtemp(prefix="fsmoe-gpu-check-"), "trace.json")
        prof.export_chrome_trace(path)
        nccl, compute = _nccl_streams(path)
        assert nccl, f"no NCCL kernel in the trace {path}"
        assert not nccl & compute, f"NCCL kernels share a stream with compute kernels: {nccl & compute} ({path})"
        out["streams"] = {"nccl": sorted(map(str, nccl)), "compute": sorted(map(str, compute)), "trace": path}
    return out


def _step_no_sync(model: nn.Module, runner: Any, x: torch.Tensor) -> None:
    """A training step that reads nothing back to the host (``float(loss)`` would synchronise)."""
    model.zero_grad(set_to_none=True)
    runner(x).backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (NCCL, the default with a GPU) or cpu (gloo)")
    parser.add_argument("--timeout", type=float, default=280.0, help="hard deadline, seconds (default 280)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; valid choices on this machine: cpu")
    from fsmoe_compiler.launch import run_ranks

    t0 = time.perf_counter()
    backend = "nccl" if args.device == "cuda" else "gloo"
    (res,) = run_ranks(check, 1, (args.device,), timeout_s=args.timeout, backend=backend)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps(res, indent=1, default=str))
    print(f"gpu_check: every check passed on {res['device']} ({backend}) in {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launch the bench's rank processes (on loopback or inside emulated-link namespaces) and aggregate them.

Ranks are plain subprocesses (``python -m fsmoe_compiler.bench.worker``) so
that, with ``--emulate-link``, each one can be started by ``ip netns exec``
inside its own namespace. Each gets its own session, and a hard deadline kills
them all (by their process ids) before the namespaces are removed; results come
back as JSON files in a private temporary directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

from . import allocator
from .methods import BENCH_METHODS
from .netns import LinkEmulation, netns_unavailable_reason, parse_link_spec
from .records import BenchConfig, BenchResult, MethodResult, RankMethodRaw


class BenchError(RuntimeError):
    """The ranks failed as a whole (crash, deadline); per-method failures are in the result instead."""


def _free_port() -> int:
    from fsmoe_compiler.launch import free_port

    return free_port()


@contextlib.contextmanager
def _link(cfg: BenchConfig, notes: list[str]) -> Iterator[LinkEmulation | None]:
    """The emulated link when asked for and possible; else None (loopback) with a note saying why."""
    if not cfg.emulate_link:
        yield None
        return
    reason = netns_unavailable_reason()
    if reason:
        notes.append(f"--emulate-link {cfg.emulate_link}: {reason}; running on loopback instead")
        yield None
        return
    spec = parse_link_spec(cfg.emulate_link)
    with LinkEmulation(cfg.ranks, spec.inter, ranks_per_node=cfg.ranks_per_node, intra_rate=spec.intra) as link:
        yield link


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit while the ranks run, so the cleanup in ``finally`` blocks runs (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # the rank's own session: it and anything it started
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def rank_env(cfg: BenchConfig, link: LinkEmulation | None, port: int) -> dict[str, str]:
    """The environment every rank process starts with: rendezvous, gloo interface, threads, malloc settings."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env.update(
        MASTER_ADDR=link.addresses[0] if link else "127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME=link.ifname if link else "lo",
        OMP_NUM_THREADS=str(cfg.threads),
        PYTHONPATH=os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH", "")])),
    )
    env.update(allocator.env_for(cfg.malloc, env))
    return env


def launch(cfg: BenchConfig, link: LinkEmulation | None, workdir: str) -> list[dict[str, Any]]:
    """Run the ranks to completion (or kill them at the deadline); each rank's result dict."""
    cfg_path = os.path.join(workdir, "config.json")
    with open(cfg_path, "w") as f:
        f.write(cfg.to_json())
    port = 29500 if link else _free_port()
    procs: list[subprocess.Popen] = []
    outs = [os.path.join(workdir, f"rank{r}.json") for r in range(cfg.ranks)]
    logs = [os.path.join(workdir, f"rank{r}.log") for r in range(cfg.ranks)]
    try:
        for r in range(cfg.ranks):
            env = rank_env(cfg, link, port)
            argv = [sys.executable, "-m", "fsmoe_compiler.bench.worker", cfg_path, str(r), outs[r]]
            if link:
                argv = link.exec_prefix(r) + argv
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + cfg.timeout_s
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                # a rank failed: the others would wait for it until the process-group timeout;
                # give them a moment to report their own error, then stop them
                failed_at = now
                deadline = min(deadline, now + 10.0)
            if now > deadline:
                if failed_at is not None:
                    break
                raise BenchError(
                    f"ranks did not finish within --timeout {cfg.timeout_s:.0f} s; killed them. "
                    + " ".join(f"rank {r} log tail: {_tail(logs[r], 600)!r}" for r in range(cfg.ranks))
                )
            time.sleep(0.2)
    finally:
        _kill(procs)
    results, died, failed = [], [], []
    for r in range(cfg.ranks):
        if not os.path.exists(outs[r]):
            died.append(f"rank {r} wrote no result (exit code {procs[r].returncode}): {_tail(logs[r])}")
            continue
        with open(outs[r]) as f:
            res = json.load(f)
        if res.get("ok"):
            results.append(res)
        else:
            failed.append(f"rank {r} failed:\n{res.get('error')}")
    if died or failed:  # a rank that died is the likely cause of the others' errors: name it first
        logs_tail = [f"--- rank {r} log (last lines) ---\n" + "\n".join(_tail(logs[r], 6000).splitlines()[-25:])
                     for r in range(cfg.ranks)]
        raise BenchError("\n".join(died + failed + logs_tail))
    return results


def aggregate(cfg: BenchConfig, ranks: list[dict[str, Any]], link_info: dict[str, Any],
              notes: list[str]) -> BenchResult:
    """Per method: slowest rank per repeat, median/IQR/min/max over repeats, speedup vs eager, loss check."""
    methods = []
    for name in cfg.methods:
        per_rank = [RankMethodRaw(**r["methods"][name]) for r in ranks]
        methods.append(MethodResult.aggregate(name, per_rank))
    eager = next((m for m in methods if m.name == "eager" and m.ok and m.median_ms), None)
    for m in methods:
        if eager and m.ok and m.median_ms:
            m.speedup_vs_eager = eager.median_ms / m.median_ms
    warnings = list(notes)
    losses = [(m.name, m.first_loss) for m in methods if m.ok and m.first_loss is not None]
    if losses:
        ref_name, ref = losses[0]
        for name, loss in losses[1:]:
            if abs(loss - ref) > 1e-4 * max(1.0, abs(ref)):
                warnings.append(f"first-step loss of {name} ({loss:.6f}) differs from {ref_name} ({ref:.6f})")
    link_info = dict(link_info)
    link_info["measured_alpha_ms"] = ranks[0]["link"]["alpha_ms"]
    link_info["measured_mbit_s"] = ranks[0]["link"]["bytes_per_ms"] * 8e3 / 1e6
    link_info["cpu"] = ranks[0]["cpu"]
    used = sorted({r.get("malloc", "?") for r in ranks})
    if used != [cfg.malloc]:
        warnings.append(f"malloc: asked for {cfg.malloc}, the ranks ran {', '.join(used)}")
    for m in methods:  # a reordering backend must issue collectives in the same order on every rank
        orders = [[g.get("order") for g in r["methods"][m.name]["info"].get("overlap", {}).get("per_graph", [])]
                  for r in ranks]
        if m.ok and any(o != orders[0] for o in orders[1:]):
            warnings.append(f"{m.name}: the ranks issue collectives in different orders")
    timed = [m for m in methods if m.ok and m.median_ms]
    speedups = {a.name: {b.name: b.median_ms / a.median_ms for b in timed if b is not a} for a in timed}
    return BenchResult(
        config=json.loads(cfg.to_json()),
        link=link_info,
        methods=methods,
        breakdown=ranks[0].get("breakdown", {}),
        warnings=warnings,
        speedups=speedups,
    )


def _topology(cfg: BenchConfig) -> str:
    nodes = cfg.ranks // cfg.ranks_per_node
    joined = "veth pair" if nodes == 2 else "bridge"
    if cfg.ranks_per_node == 1:
        return joined
    return f"{nodes} nodes of {cfg.ranks_per_node} ranks: {joined} between nodes, loopback within"


def run(cfg: BenchConfig) -> BenchResult:
    """Validate, set up the link, run the ranks, tear everything down, aggregate."""
    cfg.validate()
    unknown = [m for m in cfg.methods if m not in BENCH_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid methods: {', '.join(BENCH_METHODS)}")
    if cfg.emulate_link:
        spec = parse_link_spec(cfg.emulate_link)  # bad RATE -> ValueError before anything starts
        if cfg.ranks < 2:
            raise ValueError("--emulate-link needs --ranks >= 2")
        # the node layout's own checks (>= 2 nodes, intra only with nodes of several ranks), before anything starts
        LinkEmulation(cfg.ranks, spec.inter, ranks_per_node=cfg.ranks_per_node, intra_rate=spec.intra)
    notes: list[str] = []
    malloc, why = allocator.resolve(cfg.malloc)  # "auto" made concrete once, so every rank gets the same
    cfg = dataclasses.replace(cfg, malloc=malloc)
    if why:
        notes.append(why)
    t0 = time.monotonic()
    with _sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="fsmoe-bench-") as workdir, \
            _link(cfg, notes) as link:
        link_info: dict[str, Any] = (
            {"mode": "emulated", "rate": cfg.emulate_link, "topology": _topology(cfg)}
            if link else {"mode": "loopback"}
        )
        ranks = launch(cfg, link, workdir)
    result = aggregate(cfg, ranks, link_info, notes)
    result.wall_s = time.monotonic() - t0
    return result

"""Start N local ranks (gloo on 127.0.0.1, a free port) and collect their results.

Every process group gets a timeout and the whole run a hard deadline, so a rank
that dies or a collective that never completes becomes an exception in the
caller instead of a hang. Used by the tests, ``fsmoe demo`` and benchmarks.
"""

from __future__ import annotations

import faulthandler
import io
import os
import queue as queue_mod
import signal
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank raised, died, or the run passed its deadline."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout_s: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    stack_file: str | None = None,
) -> None:
    if stack_file is not None and hasattr(signal, "SIGUSR1"):  # the parent asks for our stack when we hang
        faulthandler.register(signal.SIGUSR1, file=open(stack_file, "w"), all_threads=True)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        # every rank's connections are up before any rank may return and tear its own down (else a slower
        # peer still connecting sees "connection closed by peer" in init_process_group)
        dist.barrier()
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", _dumps(value)))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    *,
    timeout_s: float = 240.0,
    pg_timeout_s: float = 60.0,
    backend: str = "gloo",
    threads_per_rank: int = 1,
    grace_s: float = 10.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return each rank's result.

    ``fn`` must be importable (module level). Raises ``RankError`` with the
    failing ranks' tracebacks if any rank raises or exits (after waiting up to
    ``grace_s`` for the others to report, so the root cause is in the message
    beside its echoes on other ranks), and kills every rank if the run is not
    done within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    stacks = tempfile.TemporaryDirectory(prefix="fsmoe-ranks-")
    stack_files = [os.path.join(stacks.name, f"rank{r}.txt") for r in range(world_size)]
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world_size, port, backend, pg_timeout_s, threads_per_rank, fn, args, results, stack_files[r]),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if errors:
                    break
                missing = sorted(set(range(world_size)) - set(out))
                raise RankError(f"ranks {missing} did not finish within {timeout_s:.0f} s"
                                + _stacks_of(procs, missing, stack_files))
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in out and r not in errors and p.exitcode not in (None, 0):
                        errors[r] = f"exited with code {p.exitcode} without a result"
                continue
            if status == "error":
                if not errors:  # give the other ranks a moment to report their own cause
                    deadline = min(deadline, time.monotonic() + grace_s)
                errors[rank] = payload
            else:
                out[rank] = _loads(payload)
        if errors:
            silent = sorted(set(range(world_size)) - set(out) - set(errors))
            raise RankError("\n".join(f"rank {r} failed:\n{errors[r]}" for r in sorted(errors))
                            + _stacks_of(procs, silent, stack_files))
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        stacks.cleanup()
    return [out[r] for r in range(world_size)]


def _stacks_of(procs: list, ranks: list[int], stack_files: list[str]) -> str:
    """The Python stacks of ranks that are still running (a hang's other half), for the error message."""
    alive = [r for r in ranks if procs[r].is_alive()]
    if not alive or not hasattr(signal, "SIGUSR1"):
        return ""
    for r in alive:
        os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(1.0)
    parts = []
    for r in alive:
        try:
            with open(stack_files[r]) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        parts.append(f"\nrank {r} had not reported; where it was:\n{text or '(no stack written)'}")
    return "".join(parts)

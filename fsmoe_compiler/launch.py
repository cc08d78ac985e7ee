"""Start local ranks (gloo on 127.0.0.1, a free port) and collect their results.

Two ways to run ``fn(rank, world_size, *args)`` on every rank:

* :func:`run_ranks` spawns fresh processes for one run. ``fsmoe demo``, the
  simulator's local measurement and tests that kill, hang or crash ranks use it.
* :class:`RankPool` spawns its processes once, on its first job, and runs every
  later job in the same processes, each in a fresh process group on a new port
  with the process state put back as it was (see :class:`RankPool`). The test
  suite shares one pool, so a multi-rank test costs its own work rather than
  a Python start and a ``torch`` import per rank.

Every process group gets a timeout and every run a hard deadline, so a rank
that dies or a collective that never completes becomes an exception in the
caller instead of a hang; the error carries the tracebacks of the ranks that
failed and the Python stacks of the ranks that had not reported.

This module starts processes for tests, the demo and benchmarks; it is not
part of the training runtime (``fsmoe_compiler.runtime``).
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import io
import os
import pickle
import queue as queue_mod
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank raised, died, or the run passed its deadline.

    ``failed`` maps the ranks that raised or died to their traceback or exit
    status; ``silent`` lists the ranks that had not reported at all.
    """

    def __init__(self, message: str, failed: dict[int, str] | None = None, silent: list[int] | None = None) -> None:
        super().__init__(message)
        self.failed = dict(failed or {})
        self.silent = list(silent or [])


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


def _rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}


def rank_device(backend: str, local_rank: int) -> torch.device:
    """The device a rank computes on: under NCCL its local rank's GPU (never GPU 0 for every rank on a node),
    otherwise the CPU."""
    return torch.device("cuda", local_rank) if "nccl" in backend else torch.device("cpu")


def _join_group(rank: int, world_size: int, backend: str, pg_timeout_s: float, store: Any = None) -> None:
    """``init_process_group`` (``env://``, rank 0 serving the store, unless a ``store`` is given) and a barrier.
    Under NCCL the rank first takes its local rank's GPU (``torch.cuda.set_device``) and binds the group to it
    (``device_id``), so its collectives, microbenchmarks and cost agreement run there."""
    device = rank_device(backend, int(os.environ.get("LOCAL_RANK", rank)))
    bound: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        bound["device_id"] = device
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s),
                            store=store, **bound)
    # every rank's connections are up before any rank may return and tear its own down (else a slower
    # peer still connecting sees "connection closed by peer" in init_process_group)
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# fresh processes


def _dump_stacks_to(file: Any) -> None:
    """Have this process write its threads' stacks to ``file`` when it crashes (SIGSEGV, SIGABRT, ...) and when
    the parent asks (SIGUSR1, a hang): the parent puts them in the error it raises."""
    faulthandler.enable(file=file, all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=file, all_threads=True)


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
    if stack_file is not None:
        _dump_stacks_to(open(stack_file, "w"))
    os.environ.update(_rank_env(rank, world_size, port))
    torch.set_num_threads(threads)
    try:
        _join_group(rank, world_size, backend, pg_timeout_s)
        value = fn(rank, world_size, *args)
        results.put((None, rank, "ok", _dumps(value)))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        results.put((None, rank, "error", traceback.format_exc()))
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
    pool: "RankPool | None" = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return each rank's result.

    ``fn`` must be importable (module level). Raises ``RankError`` with the
    failing ranks' tracebacks if any rank raises or exits (after waiting up to
    ``grace_s`` for the others to report, so the root cause is in the message
    beside its echoes on other ranks), and kills every rank if the run is not
    done within ``timeout_s``. The ranks are fresh spawned processes, or the
    processes of ``pool`` (whose world size and backend must match).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if pool is not None:
        if (pool.world_size, pool.backend) != (world_size, backend):
            raise ValueError(f"the pool runs {pool.world_size} {pool.backend} ranks; "
                             f"{world_size} {backend} ranks were asked for")
        return pool.run(fn, args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s,
                        threads_per_rank=threads_per_rank, grace_s=grace_s)
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
    done = False
    try:
        out = _collect(procs, results, None, timeout_s, grace_s, stack_files)
        done = True
    finally:
        for p in procs:
            p.join(timeout=5 if done else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        stacks.cleanup()
    return out


def _collect(procs: list, results: Any, job: int | None, timeout_s: float, grace_s: float,
             stack_files: list[str]) -> list[Any]:
    """Every rank's result of ``job``, in rank order; ``RankError`` naming the failures and the silent ranks' stacks."""
    world_size = len(procs)
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(out) + len(errors) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if errors:
                break
            missing = sorted(set(range(world_size)) - set(out))
            raise RankError(f"ranks {missing} did not finish within {timeout_s:.0f} s"
                            + _stacks_of(procs, missing, stack_files), silent=missing)
        try:
            job_of, rank, status, payload = results.get(timeout=min(remaining, 1.0))
        except queue_mod.Empty:
            for r, p in enumerate(procs):
                if r not in out and r not in errors and p.exitcode not in (None, 0):
                    errors[r] = f"exited with code {p.exitcode} without a result" + _crash_of(stack_files[r])
            continue
        if job_of != job:  # a late answer to an earlier job of a pool (its ranks were replaced since)
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
                        + _stacks_of(procs, silent, stack_files), failed=errors, silent=silent)
    return [out[r] for r in range(world_size)]


def _crash_of(stack_file: str) -> str:
    """What a rank that died wrote when it crashed (faulthandler's dump of a fatal signal), for the error."""
    try:
        with open(stack_file) as f:
            text = f.read().strip()
    except OSError:
        return ""
    return f"; where it crashed:\n{text}" if text else ""


def _stacks_of(procs: list, ranks: list[int], stack_files: list[str]) -> str:
    """The Python stacks of ranks that are still running (a hang's other half), for the error message."""
    alive = [r for r in ranks if procs[r].is_alive()]
    if not alive or not hasattr(signal, "SIGUSR1"):
        return ""
    for r in alive:
        os.kill(procs[r].pid, signal.SIGUSR1)
    deadline, sizes = time.monotonic() + 1.0, None
    while time.monotonic() < deadline:  # faulthandler writes at once: wait until every dump stops growing
        now = [os.path.getsize(stack_files[r]) if os.path.exists(stack_files[r]) else 0 for r in alive]
        if all(now) and now == sizes:
            break
        sizes = now
        time.sleep(0.05)
    parts = []
    for r in alive:
        try:
            with open(stack_files[r]) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        parts.append(f"\nrank {r} had not reported; where it was:\n{text or '(no stack written)'}")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# a pool of ranks reused across runs


class _ProcessState:
    """What a pool job may change in its process and the next job must not see: put back by :meth:`restore`."""

    def __init__(self) -> None:
        import torch._dynamo  # noqa: F401 - the configs are part of the state
        import torch._functorch.config  # noqa: F401
        import torch._inductor.config  # noqa: F401

        self.environ = dict(os.environ)
        self.path = list(sys.path)
        self.cwd = os.getcwd()
        self.seed = torch.initial_seed()
        self.dtype = torch.get_default_dtype()
        self.grad = torch.is_grad_enabled()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.configs = {name: sys.modules[name].get_config_copy()
                        for name in ("torch._dynamo.config", "torch._functorch.config", "torch._inductor.config")
                        if name in sys.modules}

    def restore(self, collect: bool = False) -> None:
        """Put the state back; ``collect`` also runs the garbage collector (a tenth of a second or more)."""
        from fsmoe_compiler.runtime import control

        for key in set(os.environ) - set(self.environ):
            del os.environ[key]
        for key, value in self.environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        sys.path[:] = self.path
        if os.getcwd() != self.cwd:
            os.chdir(self.cwd)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # as torch's own test cases start: reset() leaves the counters
        for name, saved in self.configs.items():
            config = sys.modules[name]
            now = config.get_config_copy()
            for key, value in saved.items():
                if now.get(key) != value:
                    setattr(config, key, value)
        torch.manual_seed(self.seed)
        torch.set_default_dtype(self.dtype)
        torch.set_grad_enabled(self.grad)
        torch.use_deterministic_algorithms(self.deterministic)
        control.reset()
        if collect:
            gc.collect()


def _pool_main(rank: int, world_size: int, backend: str, jobs: Any, results: Any, stack_file: str,
               parent: int, preload: tuple[str, ...]) -> None:
    """A pool rank: run jobs until told to stop (``None``) or the parent is gone; each job starts clean."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills the pool
    _dump_stacks_to(open(stack_file, "a"))  # appends, so the parent can empty the file before each job
    import fsmoe_compiler.runtime.control  # noqa: F401 - reset before every job

    for name in preload:  # what they set at import (a Dynamo flag) belongs to the state every job starts from
        importlib.import_module(name)
    clean = _ProcessState()
    gc.freeze()  # what the imports made lives as long as the process: later collections need not scan it
    results.put((0, rank, "ok", _dumps(os.getpid())))  # ready
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue_mod.Empty:
            if os.getppid() != parent:
                return
            continue
        if job is None:
            return
        job_id, path, port, pg_timeout_s, threads, payload = job
        clean.restore()
        sys.path[:] = path  # the caller's, so ``fn`` imports here as it does there
        os.environ.update(_rank_env(rank, world_size, port))
        torch.set_num_threads(threads)
        try:
            with warnings.catch_warnings():
                fn, args = pickle.loads(payload)
                # the parent serves this job's store: already listening, so no rank waits on a connect retry
                store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=pg_timeout_s))
                _join_group(rank, world_size, backend, pg_timeout_s, store)
                del store
                value = fn(rank, world_size, *args)
            results.put((job_id, rank, "ok", _dumps(value)))
        except BaseException:  # noqa: BLE001 - report anything to the parent
            results.put((job_id, rank, "error", traceback.format_exc()))
        finally:  # after the result went out: the caller need not wait for this
            left = _leave_group(rank, world_size)
            clean.restore(collect=True)
            gc.freeze()  # what outlived the job (module caches): the next job's collection need not scan it
        if not left:  # the process group would not come down: let the parent replace this process
            return


def _leave_group(rank: int, world_size: int, timeout_s: float = 30.0) -> bool:
    """Wait (bounded) until every rank is done with the group, then destroy it; False if that failed."""
    if not dist.is_initialized():
        return True
    try:  # no rank tears its end down while another may still be in a collective or reading the store
        store = dist.distributed_c10d._get_default_store()
        store.set(f"fsmoe/pool/left/{rank}", b"1")
        store.wait([f"fsmoe/pool/left/{r}" for r in range(world_size)], timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - a peer died or is stuck: the parent replaces the pool anyway
        pass
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        return False
    return True


class RankPool:
    """``world_size`` local ranks started once and reused: :meth:`run` has the contract of :func:`run_ranks`.

    The processes are spawned by :meth:`start` or the first :meth:`run` (and
    again after a failure that left a rank stuck or dead). Each job starts clean: a new process group
    (initialised with ``pg_timeout_s`` and destroyed after the job, once every
    rank is done with it) whose store the caller serves on a port the OS
    picks (``MASTER_PORT`` for the job), ``torch._dynamo.reset()`` and
    Dynamo's counters cleared, the Dynamo, functorch and Inductor configs,
    environment, ``sys.path`` (the caller's, for the job), working directory,
    default dtype, grad mode, deterministic-algorithms flag and RNG seed as
    the process had them before its first job,
    ``torch.set_num_threads(threads_per_rank)``, warning filters restored
    after the job, and :func:`fsmoe_compiler.runtime.control.reset`. Module
    imports and anything a job caches in module globals stay. The modules
    named in ``preload`` are imported before that state is taken, so what
    they set at import is kept: ``fsmoe_compiler.moe`` turns on Dynamo's
    ``capture_scalar_outputs`` (dropless dispatch needs it), which a later
    job would otherwise see undone while the module stays imported.

    A job that raises on some rank raises ``RankError`` as :func:`run_ranks`
    does. If a rank does not report within ``timeout_s`` (or within
    ``grace_s`` of another rank's failure), or dies, the error carries the
    stacks of the ranks that had not reported, and every process of the pool
    is killed; the next job starts new ones. Jobs that kill, hang or crash
    ranks on purpose, or need another world size or environment at start-up,
    belong in :func:`run_ranks`.
    """

    def __init__(self, world_size: int = 2, *, backend: str = "gloo", threads_per_rank: int = 1,
                 start_timeout_s: float = 180.0, preload: tuple[str, ...] = ("fsmoe_compiler.moe",)) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.threads_per_rank = threads_per_rank
        self.start_timeout_s = start_timeout_s
        self.preload = tuple(preload)
        self.started = 0  # processes spawned so far (replacements included)
        self.jobs = 0  # jobs handed to the ranks so far
        self._procs: list = []
        self._queues: list = []
        self._results: Any = None
        self._stacks: tempfile.TemporaryDirectory | None = None
        self._busy = False
        self._closed = False
        self._starting = False
        self._store: Any = None

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids (empty before the first job and after :meth:`close`)."""
        return [p.pid for p in self._procs]

    def _stack_files(self) -> list[str]:
        assert self._stacks is not None
        return [os.path.join(self._stacks.name, f"rank{r}.txt") for r in range(self.world_size)]

    def start(self) -> None:
        """Spawn the ranks now, without waiting: they import torch while the caller goes on; the first job
        waits until they are ready. (:meth:`run` starts them itself when they are not running.)"""
        if self._closed:
            raise RuntimeError("the rank pool is closed")
        if not self._procs:
            self._spawn()

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._queues = [ctx.Queue() for _ in range(self.world_size)]
        self._stacks = tempfile.TemporaryDirectory(prefix="fsmoe-pool-")
        files = self._stack_files()
        for f in files:
            open(f, "w").close()
        self._procs = [
            ctx.Process(target=_pool_main,
                        args=(r, self.world_size, self.backend, self._queues[r], self._results, files[r], os.getpid(),
                              self.preload),
                        daemon=True, name=f"fsmoe-pool-rank{r}")
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self.started += self.world_size
        self._starting = True

    def _stop(self, wait_s: float) -> None:
        """Ask the ranks to leave (``wait_s`` > 0) or kill them at once; forget them either way."""
        if wait_s > 0:
            for q in self._queues:
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + wait_s
            for p in self._procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for q in [*self._queues, self._results]:
            if q is not None:
                q.close()
                q.cancel_join_thread()
        if self._stacks is not None:
            self._stacks.cleanup()
        self._procs, self._queues, self._results, self._stacks, self._store = [], [], None, None, None
        self._starting = False

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        *,
        timeout_s: float = 240.0,
        pg_timeout_s: float = 60.0,
        threads_per_rank: int | None = None,
        grace_s: float = 10.0,
    ) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on the pool's ranks; each rank's result, in rank order.

        ``timeout_s`` counts from the job's hand-over; starting the ranks (the
        first job, or after a failure) has its own ``start_timeout_s``.
        """
        if self._closed:
            raise RuntimeError("the rank pool is closed")
        if self._busy:
            raise RuntimeError("the rank pool runs one job at a time")
        payload = pickle.dumps((fn, args))  # fails here, before any rank sees it, if fn is not importable
        threads = self.threads_per_rank if threads_per_rank is None else threads_per_rank
        self._busy = True
        healthy = False
        try:
            if not self._procs or not all(p.is_alive() for p in self._procs):
                self._stop(wait_s=0)
                self._spawn()
            files = self._stack_files()
            if self._starting:  # each rank has imported torch and is ready for jobs ("job 0")
                _collect(self._procs, self._results, 0, self.start_timeout_s, 0.0, files)
                self._starting = False
            for f in files:  # this job's stacks only
                open(f, "w").close()
            # the job's store, on a port the OS picks; kept until the next job, so ranks still leaving can use it
            self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=pg_timeout_s))
            self.jobs += 1
            job = (self.jobs, list(sys.path), self._store.port, pg_timeout_s, threads, payload)
            for q in self._queues:
                q.put(job)
            try:
                out = _collect(self._procs, self._results, self.jobs, timeout_s, grace_s, files)
            except RankError as exc:  # every rank reported, some raised: the ranks can take the next job
                healthy = not exc.silent and all(p.is_alive() for p in self._procs)
                raise
            healthy = True
            return out
        finally:
            self._busy = False
            if not healthy:  # a rank is stuck, dead or interrupted: start over at the next job
                self._stop(wait_s=0)

    def close(self) -> None:
        """Stop the ranks (they finish nothing further; any still exiting after a second is killed); later
        runs raise."""
        self._closed = True
        self._stop(wait_s=1.0)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

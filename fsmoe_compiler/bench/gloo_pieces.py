"""How long one gloo all-to-all takes on an emulated link when one rank posts it late, whole or in pieces.

A gloo send waits for the peer's "receive posted" notice, and the late rank's
notice travels on the same TCP stream behind its own data, so a late rank can
make the two directions run one after the other. This script measures it:
2 ranks, each in its own network namespace joined by a ``tc tbf`` link (root
needed), exchange ``--mb`` MB per rank, posted together or with one rank
``--late-ms`` late, as one ``all_to_all_single`` or as k pieces posted back to
back. Times are from the early rank's post to the end of its last wait, the
median of ``--reps``.

Usage (root)::

    python -m fsmoe_compiler.bench.gloo_pieces --rate 300mbit
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta

PIECES = (1, 2, 4, 8)


def _rank(rank: int, mb: float, late_ms: float, reps: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    x = torch.randn(int(mb * (1 << 20)) // 4 // 8 * 8)
    cases = {"together": (0.0, 0.0), "rank 0 late": (late_ms, 0.0), "rank 1 late": (0.0, late_ms)}
    for k in PIECES:
        for name, delays in cases.items():
            times = []
            for _ in range(reps):
                dist.barrier()
                time.sleep(0.03)
                start = time.perf_counter()  # the early rank's post (or both ranks' when together)
                time.sleep(delays[rank] / 1e3)
                outs = [torch.empty_like(p) for p in x.chunk(k)]
                works = [dist.all_to_all_single(o, p, async_op=True) for o, p in zip(outs, x.chunk(k))]
                for w in works:
                    w.wait()
                times.append((time.perf_counter() - start) * 1e3)
            worst = torch.tensor([statistics.median(times)])
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            if rank == 0:
                print(f"{k:>6}  {name:<12}  {worst.item():8.1f}", flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="300mbit", help="link rate, as for fsmoe bench --emulate-link")
    p.add_argument("--mb", type=float, default=4.0, help="MB each rank sends in all (half to the other rank)")
    p.add_argument("--late-ms", type=float, default=20.0, help="how late the late rank posts")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        _rank(args.rank, args.mb, args.late_ms, args.reps)
        return 0
    from fsmoe_compiler.bench.netns import LinkEmulation
    from fsmoe_compiler.launch import free_port

    print(f"gloo all-to-all of {args.mb:g} MB per rank over {args.rate}, one rank {args.late_ms:g} ms late or not; "
          f"ms from the first post to the last wait (median of {args.reps})")
    print(f"{'pieces':>6}  {'posted':<12}  {'ms':>8}", flush=True)
    with LinkEmulation(world_size=2, rate=args.rate) as link:
        env = dict(os.environ, MASTER_ADDR=link.addresses[0], MASTER_PORT=str(free_port()),
                   GLOO_SOCKET_IFNAME=link.ifname)
        cmd = [sys.executable, "-m", "fsmoe_compiler.bench.gloo_pieces", "--mb", str(args.mb),
               "--late-ms", str(args.late_ms), "--reps", str(args.reps), "--rank"]
        procs = [subprocess.Popen(link.exec_prefix(r) + cmd + [str(r)], env=env) for r in range(2)]
        try:
            return max(p.wait(timeout=600) for p in procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())

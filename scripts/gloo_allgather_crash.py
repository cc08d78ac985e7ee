"""Reproduce PyTorch's gloo all-gather heap corruption (why ``ops.GLOO_ALONE_OPS`` keeps such an all-gather alone).

Two gloo ranks on loopback issue ``--in-flight`` functional all-gathers
(``funcol.all_gather_single``: ``_c10d_functional.all_gather_into_tensor``,
which gloo runs through ``allgather_into_tensor_coalesced``) before waiting
for them, ``--reps`` times at each of a few small sizes. On torch 2.13 two in
flight killed a rank with SIGSEGV or SIGABRT ("malloc(): unaligned tcache
chunk detected") in every run of 2000 repetitions; one at a time never did.
``--beside all_to_all`` puts an all-to-all in flight beside each all-gather
instead. Run it after a torch upgrade: if it prints "ok" with ``--in-flight 4``
several times, the rule may be relaxed for that version.

    python scripts/gloo_allgather_crash.py --in-flight 2 --reps 2000
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES_BYTES = (8, 256, 4096)


def _issue(kind: str, x: torch.Tensor):
    import torch.distributed._functional_collectives as funcol

    if kind == "all_to_all":
        return funcol.all_to_all_single(x, None, None, dist.group.WORLD)
    gather = getattr(funcol, "all_gather_single", funcol.all_gather_tensor)
    return gather(x, 0, dist.group.WORLD)


def _rank(rank: int, port: int, in_flight: int, reps: int, beside: str) -> None:
    import torch.distributed._functional_collectives as funcol

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    kinds = ["all_gather"] + ([beside] if beside else [])
    for nbytes in SIZES_BYTES:
        x = torch.randn(max(2, nbytes // 4 // 2 * 2))
        for _ in range(reps):
            dist.barrier()
            outs = [_issue(kinds[i % len(kinds)], x) for i in range(in_flight)]
            for out in outs:
                funcol.wait_tensor(out)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", type=int, default=2, help="collectives issued before waiting (default 2)")
    parser.add_argument("--reps", type=int, default=2000, help="repetitions per size (default 2000)")
    parser.add_argument("--beside", choices=["all_to_all"], default=None,
                        help="alternate all-gathers with this collective instead of all-gathers only")
    args = parser.parse_args(argv)
    if args.in_flight < 1 or args.reps < 1:
        parser.error(f"--in-flight and --reps must be >= 1, got {args.in_flight} and {args.reps}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank, args=(port, args.in_flight, args.reps, args.beside), nprocs=2, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=600):
            pass
    except mp.ProcessExitedException as e:  # a rank died of a signal: the bug
        print(f"torch {torch.__version__}: {e}")
        return 1
    print(f"torch {torch.__version__}: ok ({args.in_flight} in flight, {args.reps} repetitions x "
          f"{len(SIZES_BYTES)} sizes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How to chunk a dropless expert-parallel layer: a measurement, hand-written in eager PyTorch.

``python -m fsmoe_compiler.bench.split_study [--emulate-link 300mbit]`` starts 2
local gloo ranks (in network namespaces joined by a shaped link when root) and
times the part of a dropless MoE layer that chunking pipelines, forward and
backward by hand (no autograd, so each variant's overlap is exactly what it
writes): the data all-to-all, the experts (``gelu(x @ w1) @ w2`` per local
expert, the rows every rank sent it) and the combine all-to-all. Every
variant issues its all-to-alls asynchronously as early as its inputs allow and
waits right before the first use, which is what the scheduled graph does.

Variants, each at degree r:

* ``sequential``: r = 1.
* ``hidden``: the dispatched rows split along the hidden dimension. Every
  chunk has the layer's own split sizes (no new count exchange). The first
  GEMM sums partial products over the chunks (it overlaps the dispatch
  chunks), the activation waits for the sum, the second GEMM's output goes
  back in column chunks (it overlaps the combine chunks). Backward mirrors it.
* ``token``: each (rank, expert) block of ``c`` rows is cut into r row ranges
  ``[k c / r, (k + 1) c / r)``: every chunk runs the whole expert FFN on its
  rows. Split sizes are derived from the counts both sides already hold (no
  new exchange), but every chunk gathers its rows into a send buffer and the
  result is scattered back.
* ``groups``: token groups with their own counts (a micro-batch pipeline
  inside the layer): the tokens are cut into r groups, each sorts its own choices,
  exchanges its own counts (a small all-to-all and a host sync before its data
  all-to-all can be issued) and runs dispatch, experts and combine.

The table gives the median over repeats of the slower rank's time per layer,
forward and backward. It is a study, not part of ``fsmoe bench``;
:func:`forward_by_token` runs one variant's forward and sums each token's
expert outputs, so ``tests/test_split_study.py`` checks that every variant
computes the unchunked layer.

What it showed (defaults: the bench's headline layer, 1024 tokens per rank,
d_model 256, d_ff 1536, 4 experts top-2, 300 Mbit/s emulated, 2 shared cores;
one run at load ~4, ms per layer forward + backward): r = 1 369; r = 2 hidden
313, token ranges 312, token groups 310 (all ~1.18x); r = 4 hidden 326
(1.13x), token ranges 284 (1.30x), groups 287 (1.29x). At r = 2 the three are
equal; at r = 4 the hidden split falls behind, because its activation waits
for every dispatch chunk (the first GEMM is a sum of partial products), so
no combine chunk can start before all dispatch chunks arrived, while a token
chunk runs the whole FFN, so chunk k's combine overlaps chunk k+1's experts. Runs at
load ~20 scatter by +-20 % and rank the variants differently. The compiler
splits dropless layers along the hidden dim because every chunk keeps the
layer's own split sizes (the graph's unbacked SymInts, exchanged once): no
new count exchange, host sync or per-chunk index arithmetic, and at r = 2,
which the planner picked in most bench runs on this link, it loses nothing
to the token splits. Token
ranges are the next step: they would win at r = 4 and, as no GEMM is split
along its contraction, stay exact for bf16 GEMMs (which the hidden split
refuses).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> tuple[torch.Tensor, Any]:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, async_op=True)
    return out, work


class Layer:
    """One rank's share of a dropless layer: the rows it sends, the counts both ways, its experts' weights."""

    def __init__(self, rank: int, world: int, tokens: int, top_k: int, experts: int, d_model: int, d_ff: int,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed + rank)
        self.world, self.e_local, self.m, self.h, self.k = world, experts // world, d_model, d_ff, top_k
        self.tokens = tokens
        self.indices = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
        self.x = torch.randn(tokens, d_model, generator=g)
        self.w1 = torch.randn(self.e_local, d_model, d_ff, generator=g) / d_model ** 0.5
        self.w2 = torch.randn(self.e_local, d_ff, d_model, generator=g) / d_ff ** 0.5
        self.send_counts, self.recv_counts, self.x_sorted = self.route(self.indices, self.x)
        self.sorted_token = self.token_of
        self.dy_sorted = torch.randn_like(self.x_sorted)
        self.x_recv, w = _a2a(self.x_sorted, self.splits(self.recv_counts), self.splits(self.send_counts))
        w.wait()  # the forward's received rows: what the backward's saved activations are made of

    def route(self, indices: torch.Tensor, x: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
        """Sort the (token, choice) pairs by expert and exchange the counts: ``(send counts, receive counts,
        the sorted rows)``; ``self.token_of`` keeps each sorted row's token (within ``x``)."""
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.world * self.e_local)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts)
        self.token_of = order // self.k
        return counts.tolist(), recv.tolist(), x.index_select(0, self.token_of)

    def splits(self, counts: list[int]) -> list[int]:
        el = self.e_local
        return [sum(counts[r * el:(r + 1) * el]) for r in range(self.world)]

    # ------------------------------------------------------------------ the experts on received rows
    def per_expert(self, rows: torch.Tensor, counts: list[int]) -> list[list[torch.Tensor]]:
        """``rows`` in arrival order (source rank, local expert) -> ``[expert][source rank]`` pieces."""
        pieces = list(torch.split(rows, counts))
        return [[pieces[r * self.e_local + j] for r in range(self.world)] for j in range(self.e_local)]

    @staticmethod
    def arrival(outs: list[torch.Tensor], counts_by_expert: list[list[int]], world: int) -> torch.Tensor:
        """Per-expert outputs -> rows in arrival order (the inverse of ``per_expert``)."""
        parts = [list(torch.split(o, c)) for o, c in zip(outs, counts_by_expert)]
        return torch.cat([parts[j][r] for r in range(world) for j in range(len(outs))])


def _ffn(L: "Layer", j: int, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ L.w1[j]) @ L.w2[j]


def _ffn_backward(L: "Layer", j: int, dy: torch.Tensor, saved: tuple) -> torch.Tensor:
    """dx of expert j from dy and its saved (x, pre, h); the weight gradients are computed and dropped."""
    x, pre, h = saved
    dh = dy @ L.w2[j].t()
    _ = h.t() @ dy
    dpre = torch.ops.aten.gelu_backward(dh, pre)
    _ = x.t() @ dpre
    return dpre @ L.w1[j].t()


def _saved(L: "Layer", j: int, x: torch.Tensor) -> tuple:
    pre = x @ L.w1[j]
    return x, pre, F.gelu(pre)


def _counts_by_expert(L: "Layer", counts: list[int]) -> list[list[int]]:
    return [[counts[s * L.e_local + j] for s in range(L.world)] for j in range(L.e_local)]


def sequential(L: Layer, r: int) -> tuple[Callable, Callable]:
    out_s, in_s = L.splits(L.recv_counts), L.splits(L.send_counts)
    cnt = _counts_by_expert(L, L.recv_counts)
    saved = [_saved(L, j, torch.cat(p)) for j, p in enumerate(L.per_expert(L.x_recv, L.recv_counts))]

    def run(src: torch.Tensor, backward: bool) -> torch.Tensor:
        recv, w = _a2a(src, out_s, in_s)
        w.wait()
        ins = [torch.cat(p) for p in L.per_expert(recv, L.recv_counts)]
        outs = [_ffn_backward(L, j, x, saved[j]) if backward else _ffn(L, j, x) for j, x in enumerate(ins)]
        back, w = _a2a(L.arrival(outs, cnt, L.world), in_s, out_s)
        w.wait()
        return back

    return (lambda: run(L.x_sorted, False)), (lambda: run(L.dy_sorted, True))


def hidden(L: Layer, r: int) -> tuple[Callable, Callable]:
    cols = [slice(k * L.m // r, (k + 1) * L.m // r) for k in range(r)]
    cnt = _counts_by_expert(L, L.recv_counts)
    out_s, in_s = L.splits(L.recv_counts), L.splits(L.send_counts)
    saved = [_saved(L, j, torch.cat(p)) for j, p in enumerate(L.per_expert(L.x_recv, L.recv_counts))]

    def fwd() -> torch.Tensor:
        sent = [_a2a(L.x_sorted[:, c], out_s, in_s) for c in cols]
        pre: list = [None] * L.e_local
        for k, (recv, w) in enumerate(sent):
            w.wait()
            for j, p in enumerate(L.per_expert(recv, L.recv_counts)):
                part = torch.cat(p) @ L.w1[j][cols[k]]
                pre[j] = part if pre[j] is None else pre[j] + part
        hs = [F.gelu(p) for p in pre]
        back = [_a2a(L.arrival([h @ L.w2[j][:, c] for j, h in enumerate(hs)], cnt, L.world), in_s, out_s)
                for c in cols]
        for _, w in back:
            w.wait()
        return torch.cat([b for b, _ in back], dim=1)

    def bwd() -> None:
        sent = [_a2a(L.dy_sorted[:, c], out_s, in_s) for c in cols]
        dh: list = [None] * L.e_local
        for k, (dy, w) in enumerate(sent):
            w.wait()
            for j, p in enumerate(L.per_expert(dy, L.recv_counts)):
                d = torch.cat(p)
                _ = saved[j][2].t() @ d  # dW2, its columns k
                part = d @ L.w2[j][:, cols[k]].t()
                dh[j] = part if dh[j] is None else dh[j] + part
        dpre = [torch.ops.aten.gelu_backward(d, saved[j][1]) for j, d in enumerate(dh)]
        back = [_a2a(L.arrival([d @ L.w1[j][cols[k]].t() for j, d in enumerate(dpre)], cnt, L.world), in_s, out_s)
                for k in range(r)]
        for j in range(L.e_local):
            _ = saved[j][0].t() @ dpre[j]  # dW1, under the combine chunks
        for _, w in back:
            w.wait()
        return torch.cat([b for b, _ in back], dim=1)

    return fwd, bwd


def _cut(c: int, r: int, k: int) -> tuple[int, int]:
    return k * c // r, (k + 1) * c // r


def token(L: Layer, r: int) -> tuple[Callable, Callable]:
    """Row ranges of every (rank, expert) block; the index of chunk k's rows on both sides."""
    def rows(counts: list[int], k: int) -> tuple[torch.Tensor, list[int]]:
        idx, sizes, off = [], [], 0
        for c in counts:
            a, b = _cut(c, r, k)
            idx.append(torch.arange(off + a, off + b))
            sizes.append(b - a)
            off += c
        return torch.cat(idx), sizes

    send = [rows(L.send_counts, k) for k in range(r)]
    recv = [rows(L.recv_counts, k) for k in range(r)]
    saved = [[_saved(L, j, torch.cat(p)) for j, p in enumerate(L.per_expert(L.x_recv.index_select(0, recv[k][0]),
                                                                             recv[k][1]))] for k in range(r)]

    def run(src: torch.Tensor, backward: bool) -> torch.Tensor:
        sent = [_a2a(src.index_select(0, send[k][0]), L.splits(recv[k][1]), L.splits(send[k][1])) for k in range(r)]
        back = []
        for k, (rx, w) in enumerate(sent):
            w.wait()
            ins = [torch.cat(p) for p in L.per_expert(rx, recv[k][1])]
            outs = [_ffn_backward(L, j, x, saved[k][j]) if backward else _ffn(L, j, x) for j, x in enumerate(ins)]
            back.append(_a2a(L.arrival(outs, _counts_by_expert(L, recv[k][1]), L.world),
                             L.splits(send[k][1]), L.splits(recv[k][1])))
        full = src.new_empty(src.shape)
        for k, (b, w) in enumerate(back):
            w.wait()
            full.index_copy_(0, send[k][0], b)
        return full

    return (lambda: run(L.x_sorted, False)), (lambda: run(L.dy_sorted, True))


def groups(L: Layer, r: int) -> tuple[Callable, Callable]:
    """Token groups, each with its own routing and count exchange (a host sync) before its data all-to-all.

    The backward reuses each group's counts (saved by the forward), as a real backward would.
    """
    size = L.tokens // r
    sl = [slice(g * size, (g + 1) * size) for g in range(r)]
    routed, token_of = [], []
    for g, s in enumerate(sl):
        routed.append(L.route(L.indices[s], L.x[s]))
        token_of.append(L.token_of + g * size)
    dys = [torch.randn_like(xs) for _, _, xs in routed]
    saved = []
    for send_c, recv_c, xs in routed:
        rx, w = _a2a(xs, L.splits(recv_c), L.splits(send_c))
        w.wait()
        saved.append([_saved(L, j, torch.cat(p)) for j, p in enumerate(L.per_expert(rx, recv_c))])

    def run(backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        back, pending = [], None
        for g in range(r + 1):
            nxt = None
            if g < r:  # the next group's counts (the host waits for them), then its data all-to-all
                send_c, recv_c, xs = routed[g] if backward else L.route(L.indices[sl[g]], L.x[sl[g]])
                nxt = (g, send_c, recv_c, _a2a(dys[g] if backward else xs, L.splits(recv_c), L.splits(send_c)))
            if pending is not None:
                k, send_c, recv_c, (rx, w) = pending
                w.wait()
                ins = [torch.cat(p) for p in L.per_expert(rx, recv_c)]
                outs = [_ffn_backward(L, j, x, saved[k][j]) if backward else _ffn(L, j, x) for j, x in enumerate(ins)]
                back.append(_a2a(L.arrival(outs, _counts_by_expert(L, recv_c), L.world),
                                 L.splits(send_c), L.splits(recv_c)))
            pending = nxt
        for _, w in back:
            w.wait()
        return torch.cat([b for b, _ in back]), torch.cat(token_of)

    return (lambda: run(False)), (lambda: run(True))


VARIANTS = {"sequential": sequential, "hidden": hidden, "token": token, "groups": groups}


def forward_by_token(L: Layer, name: str, r: int) -> torch.Tensor:
    """The forward of variant ``name`` at degree ``r``, each token's expert outputs summed: ``[tokens, d_model]``.

    Every variant computes the same layer, so the results agree up to float
    reassociation (the tests check it). Collective: both ranks call it alike.
    """
    fwd, _ = VARIANTS[name](L, r)
    out = fwd()
    rows, token_of = out if name == "groups" else (out, L.sorted_token)
    return torch.zeros_like(L.x).index_add(0, token_of, rows)


def worker(rank: int, cfg: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    L = Layer(rank, 2, cfg["tokens"], cfg["top_k"], cfg["experts"], cfg["d_model"], cfg["d_ff"])
    runs: dict[str, tuple[Callable, Callable]] = {}
    for name in cfg["variants"]:
        for r in ([1] if name == "sequential" else cfg["degrees"]):
            fwd, bwd = VARIANTS[name](L, r)
            if name != "groups":  # one routing and count exchange per layer (groups do theirs per group)
                fwd = (lambda f: lambda: (L.route(L.indices, L.x), f()))(fwd)
            runs[f"{name} r={r}"] = (fwd, bwd)
    times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "backward": []} for k in runs}
    names = list(runs)
    for rep in range(cfg["warmup"] + cfg["steps"]):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for phase, fn in zip(("forward", "backward"), runs[name]):
                dist.barrier()
                t = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t) * 1e3
                if rep >= cfg["warmup"]:
                    times[name][phase].append(ms)
    with open(out_path, "w") as f:
        json.dump(times, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsmoe_compiler.bench.split_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emulate-link", default="300mbit")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1536)
    p.add_argument("--degrees", default="2,4")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", nargs=3, metavar=("CONFIG", "RANK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cfg_path, rank, out = args.worker
        with open(cfg_path) as f:
            worker(int(rank), json.load(f), out)
        return 0
    from .netns import LinkEmulation, netns_unavailable_reason
    from .records import BenchConfig
    from .runner import rank_env

    cfg = dict(tokens=args.tokens, top_k=args.top_k, experts=args.experts, d_model=args.d_model, d_ff=args.d_ff,
               degrees=[int(d) for d in args.degrees.split(",")], variants=args.variants.split(","),
               steps=args.steps, warmup=args.warmup)
    reason = netns_unavailable_reason() if args.emulate_link else "no --emulate-link"
    with tempfile.TemporaryDirectory(prefix="fsmoe-split-") as tmp:
        cfg_path = os.path.join(tmp, "cfg.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        link = LinkEmulation(2, args.emulate_link) if not reason else None
        if link:
            link.__enter__()
        try:
            env = rank_env(BenchConfig(methods=[], threads=1), link, 29500 if link else 29533)
            procs = []
            for r in range(2):
                argv_r = [sys.executable, "-m", "fsmoe_compiler.bench.split_study", "--worker", cfg_path, str(r),
                          os.path.join(tmp, f"r{r}.json")]
                procs.append(subprocess.Popen((link.exec_prefix(r) if link else []) + argv_r, env=env))
            codes = [pr.wait(timeout=1800) for pr in procs]
        finally:
            if link:
                link.__exit__(None, None, None)
        if any(codes):
            print(f"ranks failed: exit codes {codes}", file=sys.stderr)
            return 1
        res = [json.load(open(os.path.join(tmp, f"r{r}.json"))) for r in range(2)]
    print(f"link: {'emulated ' + args.emulate_link if not reason else 'loopback (' + reason + ')'}; "
          f"{args.tokens} tokens x top-{args.top_k}, {args.experts} experts, d_model {args.d_model}, "
          f"d_ff {args.d_ff}; median of {args.steps} repeats of the slower rank, ms per layer")
    base = None
    print(f"{'variant':<16}{'forward':>10}{'backward':>10}{'total':>10}{'vs r=1':>8}")
    for name in res[0]:
        med = {ph: statistics.median(max(a, b) for a, b in zip(res[0][name][ph], res[1][name][ph]))
               for ph in ("forward", "backward")}
        tot = med["forward"] + med["backward"]
        base = base or tot
        print(f"{name:<16}{med['forward']:>10.1f}{med['backward']:>10.1f}{tot:>10.1f}{base / tot:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

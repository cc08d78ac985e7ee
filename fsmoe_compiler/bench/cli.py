"""``fsmoe bench``: time MoE training steps of several compilers side by side on local gloo ranks.

:data:`DESCRIPTION` (the ``--help`` text) says what it runs and prints. The
integrator's ``fsmoe_compiler/cli.py`` mounts this with
:func:`add_bench_parser`; ``python -m fsmoe_compiler.bench`` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from fsmoe_compiler import records
from fsmoe_compiler.reporting.tables import link_models_text

from .allocator import MALLOCS
from .records import DEFAULT_MODEL, DEFAULT_SIZES, DISPATCH, DROPLESS_ONLY, GRAD_SYNC, BenchConfig, BenchResult

#: What ``fsmoe bench --help`` says above the options.
DESCRIPTION = """\
Starts N local gloo ranks (default 2) and times training steps (forward,
backward, gradient sync: by default outside the compiled graph as one bucketed
all-reduce, with --grad-sync graph inside backward; SGD update) of an example MoE model after warm-up, for: eager, dynamo
(torch.compile(backend="eager"): Dynamo's graph run by PyTorch, as fsmoe's "as traced" variant runs it), aot_eager,
inductor (plain torch.compile: Inductor's fused kernels, no overlap scheduling; its first step compiles for tens of
seconds), pytorch_overlap (PyTorch's schedule_overlap_bucketing on the same ATen graphs,
with a CPU cost estimator), inductor_overlap (torch.compile with that scheduler inside Inductor, same
estimator), torchtitan_graph (torchtitan's own graph_trainer
EP-overlap passes: one make_fx forward + backward graph, each MoE layer in 2
token chunks along the batch, its overlap schedule; --model torchtitan only,
else skipped; the CPU-only changes it needs are listed under the table),
fsmoe_sequential, fsmoe_tutel, fsmoe (CP-SAT, pipeline_degree="auto"), fsmoe_inductor (fsmoe with
codegen="inductor": the chosen graph compiled by Inductor, its order pinned) and fsmoe_partitioned (fsmoe with
grad_partition="auto": with --grad-sync graph, the gradient all-reduces merged into partitions) and fsmoe_bucket
(fsmoe with the gradients in DDP's 25 MiB buckets: a small model's in one all-reduce after its last gradient, the
baseline partitioning must beat). The methods' steps
run round-robin, one of each per
repeat; the table shows the median over repeats of the slowest rank's step
time, the interquartile range, the speedup over eager and the first step's
loss (all methods must agree). A method that fails is marked failed with its
error and the others go on.

--emulate-link RATE (root only) puts each rank in its own network namespace,
joined by veth links shaped with tc tbf to RATE, so communication takes real
wall time without eating compute cores. The default model is
communication-heavy: GPT-2-style, 2 MoE layers, d_model 256, d_ff 1536, 4
experts top-2, 1024 tokens per rank; with 1 thread per rank and
--emulate-link 300mbit to 500mbit (slower cores: the lower rate) the
all-to-alls alone on the link take about as long as the expert GEMMs (the
line under the table shows one eager step's measured split). With
--shared-expert --grad-sync graph the scheduler also has a shared expert and
the gradient all-reduces to place around the all-to-alls.

--dispatch dropless sends every token to its experts (sort-based
permutation, token counts exchanged first, all-to-alls of data-dependent
sizes); fsmoe then chunks along the hidden dim. --model torchtitan runs
torchtitan's own MoE layer (dropless, SwiGLU experts in bf16 grouped GEMMs),
its experts sharded over the ranks by torchtitan's expert parallelism.

Every rank runs jemalloc with purging off where it is installed (--malloc),
so freed memory is reused as a caching allocator does on CUDA and no method
pays page faults for re-allocating its activations every step."""


def _configure(p: argparse.ArgumentParser) -> None:
    from .methods import BENCH_METHODS

    p.add_argument("--ranks", type=int, default=2, help="local gloo ranks (default 2)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="example model: gpt2, mixtral, torchtitan (torchtitan's own MoE layer Qwen3-style: softmax "
                   "top-k, dropless, its experts sharded over the ranks by torchtitan's expert parallelism; needs the "
                   "ecosystem extra) or torchtitan_dsv3 (the same layer DeepSeek-V3-style: sigmoid scores, routing "
                   f"limited to 2 of 4 expert groups, a shared expert) (default {DEFAULT_MODEL})")
    p.add_argument("--layers", type=int, default=DEFAULT_SIZES["layers"], help="decoder layers (default %(default)s)")
    p.add_argument("--d-model", type=int, default=DEFAULT_SIZES["d_model"], help="hidden size (default %(default)s)")
    p.add_argument("--d-ff", type=int, default=DEFAULT_SIZES["d_ff"], help="expert FFN size (default %(default)s)")
    p.add_argument("--experts", type=int, default=DEFAULT_SIZES["experts"],
                   help="experts per MoE layer, split over the ranks (default %(default)s)")
    p.add_argument("--top-k", type=int, default=DEFAULT_SIZES["top_k"], help="experts per token (default %(default)s)")
    p.add_argument("--capacity-factor", type=float, default=DEFAULT_SIZES["capacity_factor"],
                   help="expert capacity factor (default %(default)s)")
    p.add_argument("--shared-expert", action="store_true",
                   help="add a dense shared expert (width --d-ff) beside each MoE layer's routed experts, "
                   "as DeepSeek-MoE and Qwen-MoE do")
    p.add_argument("--dispatch", choices=DISPATCH, default=None,
                   help="'capacity' (default; every expert gets capacity-factor x its fair share of tokens, "
                   "fixed-size all-to-alls) or 'dropless' (every token goes to its experts: sort-based permutation, "
                   "token counts exchanged first, all-to-alls of data-dependent sizes; the only one of torchtitan)")
    p.add_argument("--batch", type=int, default=DEFAULT_SIZES["batch"], help="sequences per rank (default %(default)s)")
    p.add_argument("--seq", type=int, default=DEFAULT_SIZES["seq"], help="sequence length (default %(default)s)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per rank; sets --batch to TOKENS // --seq (overrides --batch)")
    p.add_argument("--steps", type=int, default=10, help="timed repeats per method (default 10)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per method first; the first compiles (default 2; fsmoe methods take at least "
                   "their profile_steps + measure_steps + 1, so timed steps run the scheduled graph)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset, in table order (default all: {','.join(BENCH_METHODS)})")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--emulate-link", default=None, metavar="RATE",
                   help="root only: each rank in its own network namespace, veth links shaped with tc tbf to RATE "
                   "(e.g. 200mbit, 1gbit); with --ranks-per-node, inter=RATE[,intra=RATE]: nodes joined at the "
                   "inter rate, the ranks of a node on its loopback, shaped to the intra rate if given; without "
                   "root it says so and runs on loopback")
    p.add_argument("--ranks-per-node", type=int, default=1,
                   help="with --emulate-link: ranks per node namespace (default 1), e.g. --ranks 4 "
                   "--ranks-per-node 2 for two nodes of two ranks")
    p.add_argument("--fsmoe-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fsmoe backend option for the fsmoe methods, repeatable (e.g. max_degree=8, "
                   "time_limit_s=2, cache_dir=/tmp/fsmoe-cache); VALUE is read as JSON, else as a string")
    p.add_argument("--grad-sync", choices=GRAD_SYNC, default="bucket",
                   help="how every method averages gradients over ranks: 'bucket' (default: after backward, outside "
                   "any graph, one flat all-reduce as DDP buckets) or 'graph' (inside backward, one functional "
                   "all-reduce per parameter, so compiled backward graphs hold them and may overlap them)")
    p.add_argument("--malloc", choices=MALLOCS, default="auto",
                   help="the ranks' malloc: 'jemalloc' (preloaded, never purges: freed memory is reused, as the "
                   "CUDA caching allocator does), 'glibc-keep' (glibc never trimming; its heap can fragment and "
                   "grow, and one method then pays page faults at random), 'glibc' (defaults), 'auto' (default: "
                   "jemalloc where installed, else glibc-keep)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the profiled eager step that splits a step into all-to-all / grad sync / compute")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--trace-dir", metavar="DIR",
                   help="each rank writes the predicted and measured timelines of every fsmoe method as a Chrome "
                   "trace, DIR/METHOD.rankN.json (fsmoe_compiler.export_trace)")
    p.add_argument("--timeout", type=float, default=600.0, help="hard deadline for the whole run, seconds (default 600)")
    p.set_defaults(func=run_bench)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on ``subparsers`` (``set_defaults(func=run_bench)``)."""
    p = subparsers.add_parser(
        "bench",
        help="time training steps of eager, aot_eager, inductor, PyTorch's overlap scheduler, torchtitan's graph_trainer "
             "EP overlap and fsmoe on local ranks",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    return p


def parse_fsmoe_options(items: list[str]) -> dict[str, Any]:
    """``["max_degree=8", "cache_dir=/tmp/c"]`` -> ``{"max_degree": 8, "cache_dir": "/tmp/c"}`` (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--fsmoe-option wants KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The validated :class:`BenchConfig` of parsed arguments (ValueError on bad input)."""
    from fsmoe_compiler.demo import example_module

    from .methods import parse_methods
    from .netns import parse_link_spec

    example_module(args.model)
    methods = parse_methods(args.methods)
    if args.emulate_link:
        parse_link_spec(args.emulate_link)
    batch = args.batch
    if args.tokens is not None:
        if args.tokens < args.seq:
            raise ValueError(f"--tokens ({args.tokens}) must be >= --seq ({args.seq})")
        batch = args.tokens // args.seq
    fsmoe_options = parse_fsmoe_options(args.fsmoe_option)
    from fsmoe_compiler.config import FSMoEConfig

    try:  # before any rank starts: a bad option fails here, naming it, not in every rank's first compile
        FSMoEConfig.from_options(fsmoe_options)
    except ValueError as exc:
        raise ValueError(f"--fsmoe-option: {exc} (VALUE is read as JSON: true, false, 8, \"auto\")") from exc
    cfg = BenchConfig(
        methods=methods, ranks=args.ranks, model=args.model, layers=args.layers, d_model=args.d_model,
        d_ff=args.d_ff, experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
        shared_expert=args.shared_expert, batch=batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
        dispatch=args.dispatch or ("dropless" if args.model in DROPLESS_ONLY else "capacity"),
        threads=args.threads,
        emulate_link=args.emulate_link, ranks_per_node=args.ranks_per_node, timeout_s=args.timeout,
        breakdown=args.breakdown,
        fsmoe_options=fsmoe_options, grad_sync=args.grad_sync,
        trace_dir=os.path.abspath(args.trace_dir) if args.trace_dir else None, malloc=args.malloc,
    )
    cfg.validate()
    return cfg


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def render(result: BenchResult) -> str:
    """The results table, the link and the eager step split, and any warnings, as text."""
    c = result.config
    link = result.link
    lines = [
        f"fsmoe bench: {c['model']} MoE, {c['layers']} layers, d_model {c['d_model']}, d_ff {c['d_ff']}, "
        f"{c['experts']} experts top-{c['top_k']} "
        + ("(dropless)" if c.get("dispatch") == "dropless" else f"(capacity factor {c['capacity_factor']})")
        + (" + shared expert" if c.get("shared_expert") else "") + ", "
        f"{c['batch']}x{c['seq']} tokens per rank; {c['ranks']} gloo ranks x {c['threads']} thread(s); "
        f"{c['warmup']} warm-up + {c['steps']} timed steps per method, round-robin; gradient sync "
        + ("inside backward (per parameter)" if c.get("grad_sync") == "graph" else "after backward (one bucket)")
        + f"; malloc: {c.get('malloc', '?')}",
        "link: " + (f"emulated {link['rate']} ({link['topology']}, tc tbf)" if link["mode"] == "emulated"
                    else "loopback (not shaped)")
        + f"; all-to-all measured {link.get('measured_mbit_s', 0):.0f} Mbit/s, "
        f"alpha {link.get('measured_alpha_ms', 0):.2f} ms",
    ]
    rows = []
    for m in result.methods:
        if not m.ok:
            skipped = "MethodSkipped: " in (m.error or "")
            reason = (m.error or "").split("MethodSkipped: ", 1)[-1] if skipped else (m.error or "")
            rows.append([m.name, "skipped" if skipped else "FAILED", "-", "-", "-", "-", "-", reason[:90]])
            continue
        note = ""
        tg = m.info.get("all_to_all") if m.name == "torchtitan_graph" else None
        if tg:
            note = (f"{tg['traced']}->{tg['final']} all-to-alls ({m.info['chunks']} chunks along "
                    f"{m.info['chunk_dim']}), schedule moved {m.info.get('scheduled_moved', 0)} nodes")
        ov = m.info.get("overlap")
        if ov:
            note = (f"{ov['moved']}/{ov['collectives']} collectives moved, "
                    f"{ov['overlapped_after']} overlap compute (was {ov['overlapped_before']}), "
                    f"{ov.get('exposed', '?')} left exposed")
        fs = m.info.get("fsmoe")
        if fs and "error" not in fs:
            parts = []
            for kind, short in (("forward", "fw"), ("backward", "bw")):
                g = fs.get(kind)
                if not g:
                    continue
                if g.get("fallback"):
                    kept = g["fallback"].startswith(records.FASTEST_AS_TRACED)  # chosen, not failed
                    parts.append(f"{short}: " + ("as traced, measured fastest" if kept else "fallback, why below"))
                elif "predicted_ms" in g:
                    meas = g.get("measured_ms")
                    parts.append(f"{short} r={','.join(map(str, g['degrees'].values())) or '-'} "
                                 f"pred {g['predicted_ms']:.0f}/meas {_fmt(meas, '.0f')} ms")
            note = "; ".join(parts)
        rows.append([
            m.name, _fmt(m.median_ms), f"{_fmt(m.q1_ms)}-{_fmt(m.q3_ms)}", f"{_fmt(m.min_ms)}-{_fmt(m.max_ms)}",
            _fmt(m.speedup_vs_eager, ".2f") + ("x" if m.speedup_vs_eager else ""), _fmt(m.first_loss, ".6f"),
            _fmt(m.compile_s, ".1f"), note,
        ])
    lines.append(tabulate(rows, headers=["method", "median ms", "IQR ms", "min-max ms", "vs eager",
                                         "first loss", "1st step s", "notes"], tablefmt="simple"))
    b = result.breakdown
    if b:
        lines.append(
            f"eager step split (one profiled step, rank 0): {b['step_ms']:.1f} ms = "
            f"{int(b['all_to_all_count'])} all-to-alls {b['all_to_all_ms']:.1f} ms (alone on the link: "
            f"{b['all_to_all_wire_ms']:.1f} ms) + compute {b['compute_ms']:.1f} ms (expert GEMMs "
            f"{b.get('expert_gemm_ms', 0.0):.1f} ms) + gradient all-reduce "
            f"{b['grad_sync_ms']:.1f} ms"
        )
    for m in result.methods:
        if m.ok and m.name == "torchtitan_graph":
            lines.append("torchtitan_graph: graph_trainer passes " + ", ".join(
                r["pass"] for r in m.info.get("passes", [])) + "; disabled through its compile.disable_passes: "
                + ", ".join(m.info.get("disabled_passes", {})) + "; process-local changes applied: "
                + ("; ".join(m.info.get("cpu_changes_text", {}).values()) or "none"))
    overheads = [f"{m.name} {max(m.info['overhead_s_by_rank']):.2f} s" for m in result.methods
                 if m.ok and m.info.get("overhead_s_by_rank")]
    for m in result.methods:
        fs = m.info.get("fsmoe") if m.ok else None
        graphs = [g for g in (fs or {}).values() if isinstance(g, dict) and g.get("predicted_ms")]
        pred = sum(g["predicted_ms"] for g in graphs)
        if graphs and all(g.get("measured_ms") for g in graphs):
            meas = sum(g["measured_ms"] for g in graphs)
            lines.append(f"{m.name}: predicted forward + backward {pred:.1f} ms, measured {meas:.1f} ms "
                         f"(median per graph, rank 0), error {100 * (pred - meas) / meas:+.1f} %")
        links = {k: v for g in graphs for k, v in (g.get("links") or {}).items()}
        if links:
            lines.append(f"{m.name} link models (measured, last graph's): " + link_models_text(links))
        for kind in ("forward", "backward"):
            why = ((fs or {}).get(kind) or {}).get("fallback")
            if why and not why.startswith(records.FASTEST_AS_TRACED):
                lines.append(f"{m.name} {kind} graph fell back: {why}")
        chosen = (fs or {}).get("token_split")
        if chosen:
            lines.append(f"{m.name}: {chosen}")
        refs = [g.get("reference_ms") or {} for g in graphs]
        if m.name == "fsmoe" and graphs and all({"tutel", "lower_bound"} <= set(r) for r in refs):
            tut = sum(r["tutel"] for r in refs)
            lb = sum(r["lower_bound"] for r in refs)
            lines.append(f"{m.name} cost model, its own graphs and costs, forward + backward: schedule {pred:.1f} ms, "
                         f"tutel order {tut:.1f} ms ({tut / pred:.2f}x), lower bound {lb:.1f} ms (no order beats "
                         f"tutel's by more than {tut / lb:.2f}x)")
    if overheads:
        lines.append("backend compile overhead (the slowest rank's passes at compile + chunking and planning, "
                     "profiling steps and waits for the other ranks excluded, both graphs): "
                     + ", ".join(overheads))
    codegen = [f"{m.name} {max(m.info['codegen_s_by_rank']):.1f} s" for m in result.methods
               if m.ok and any(m.info.get("codegen_s_by_rank") or ())]
    if codegen:
        lines.append("Inductor compile of the graphs fsmoe chose (the slowest rank, decomposition and pinning "
                     "included; not in the overhead above): " + ", ".join(codegen))
    shown = [n for n in ("fsmoe", "fsmoe_inductor") if result.speedups.get(n)] or \
        [n for n in ("fsmoe_tutel",) if result.speedups.get(n)]
    for name in shown:
        lines.append(f"{name} step vs the others (median / median): "
                     + ", ".join(f"{v:.2f}x {k}" for k, v in result.speedups[name].items()))
    for w in result.warnings:
        lines.append(f"warning: {w}")
    lines.append(f"wall time {result.wall_s:.1f} s")
    return "\n".join(lines)


def _fail(msg: str) -> int:
    print(f"fsmoe bench: error: {msg}", file=sys.stderr)
    return 2


def run_bench(args: argparse.Namespace) -> int:
    """Entry of ``fsmoe bench``; returns the exit code (2 on bad input, 1 when the ranks failed)."""
    from .runner import BenchError, run

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        return _fail(str(e))
    for note in _preflight_notes(cfg):
        print(note)
    try:
        result = run(cfg)
    except ValueError as e:
        return _fail(str(e))
    except BenchError as e:
        print(f"fsmoe bench: the ranks failed: {e}", file=sys.stderr)
        return 1
    print(render(result))
    if args.json:
        Path(args.json).write_text(result.to_json())
        print(f"wrote {args.json}")
    return 0


def _preflight_notes(cfg: BenchConfig) -> list[str]:
    from .netns import netns_unavailable_reason

    if cfg.emulate_link and (reason := netns_unavailable_reason()):
        return [f"fsmoe bench: --emulate-link needs root and iproute2: {reason}; running on loopback instead"]
    return []


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for ``python -m fsmoe_compiler.bench``."""
    parser = argparse.ArgumentParser(prog="fsmoe bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_bench(args)


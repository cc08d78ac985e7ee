"""``fsmoe simulate``: replay the scheduler on layer grids or one configured layer stack, against the baselines.

:data:`DESCRIPTION` (the ``--help`` text) says what the two modes print.
``fsmoe_compiler/cli.py`` mounts the subcommand through
:func:`add_simulate_parser`; ``python -m fsmoe_compiler.sim.cli`` runs it
alone. A CLI may import everything, lazily: the ``local`` preset's measurement
comes from ``fsmoe_compiler.bench.links`` (torch ranks), imported only when
that preset runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tabulate import tabulate

#: What ``fsmoe simulate --help`` says above the options.
DESCRIPTION = """\
Two modes:

* ``--grid fsmoe``: FSMoE's 1458 layers on each cost preset (or ``--preset
  NAME``); prints per preset the speedup of our schedule over ``sequential``,
  ``tutel`` and ``fsmoe_paper`` (geomean / min / max), the ceiling on that
  speedup (geomean of baseline / lower bound), the gap to the lower bound,
  solver time per layer and how often CP-SAT proved optimality. ``--json PATH``
  writes the same as JSON.
* ``--config B=4,L=512,M=2048,H=8192,f=2.4,gpus=32,ffn=gpt [--layers 4]``: one
  layer (or a stack of identical blocks); prints each method's makespan and,
  with ``--trace out.json``, writes all methods' schedules as one Chrome trace."""


def _configure(p: argparse.ArgumentParser) -> None:
    from fsmoe_compiler.sim.presets import DEFAULT_PRESETS, preset_names
    from fsmoe_compiler.sim.simulate import DEFAULT_GRID_LAYERS

    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--grid", metavar="NAME", help="run a layer grid: 'fsmoe' (FSMoE's 1458 layers)")
    mode.add_argument(
        "--config",
        metavar="K=V,...",
        help="one layer, e.g. B=4,L=512,M=2048,H=8192,f=2.4,gpus=32,ffn=gpt (required B, L, M, f; "
        "H defaults to 4*M, gpus to 16, ffn to gpt)",
    )
    p.add_argument(
        "--preset",
        action="append",
        metavar="NAME",
        help=f"cost preset, repeatable: {', '.join(preset_names())} (grid default: all of "
        f"{', '.join(DEFAULT_PRESETS)}; --config default: fsmoe-testbed)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"blocks (attention + MoE) in the simulated model (default: {DEFAULT_GRID_LAYERS} for --grid, "
        "1 for --config)",
    )
    p.add_argument(
        "--no-split-weight-grads",
        dest="split_weight_grads",
        action="store_false",
        help="schedule ours on the plain backward task graph (weight and input gradients of a layer as one task); "
        "by default ours may run weight-gradient GEMMs apart from the input-gradient chain, as the compiler can",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="run only the first N grid points")
    p.add_argument("--every", type=int, default=1, metavar="K", help="run every K-th grid point (a spread sample)")
    p.add_argument("--workers", type=int, default=1, help="processes for the grid (default 1)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S", help="CP-SAT time limit per solve, seconds")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--trace", metavar="PATH", help="(--config) write the schedules as a Chrome trace")
    p.add_argument("--show-costs", action="store_true", help="print each preset's alpha/beta cost models first")
    p.add_argument("--validate", action="store_true", help="check every schedule with validate_schedule (slower)")
    p.add_argument("--refit", action="store_true", help="re-measure the 'local' preset instead of using its cache")
    p.set_defaults(func=run_simulate)


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``simulate`` subcommand on ``subparsers`` (``set_defaults(func=run_simulate)``)."""
    p = subparsers.add_parser(
        "simulate",
        help="replay the scheduler on FSMoE's 1458-layer grid or one layer stack, against the baselines",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    return p


def _fail(msg: str) -> int:
    print(f"fsmoe simulate: error: {msg}", file=sys.stderr)
    return 2


def run_simulate(args: argparse.Namespace) -> int:
    """Entry of ``fsmoe simulate``; returns the exit code (2 on a usage error)."""
    from fsmoe_compiler.sim.grid import ConfigError, get_grid, parse_config
    from fsmoe_compiler.sim.presets import DEFAULT_PRESETS, PRESETS, preset_names
    from fsmoe_compiler.sim.simulate import DEFAULT_GRID_LAYERS

    presets = args.preset or (list(DEFAULT_PRESETS) if args.grid else ["fsmoe-testbed"])
    if args.layers is None:
        args.layers = DEFAULT_GRID_LAYERS if args.grid else 1
    for name in presets:
        if name not in PRESETS:
            return _fail(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")
    if args.layers < 1:
        return _fail(f"--layers must be >= 1, got {args.layers}")
    if args.workers < 1:
        return _fail(f"--workers must be >= 1, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit must be >= 1, got {args.limit}")
    if args.every < 1:
        return _fail(f"--every must be >= 1, got {args.every}")
    if args.show_costs:
        gpus_list = sorted({16, 32, 48}) if args.grid else None
        if not args.grid:
            try:
                gpus_list = [parse_config(args.config).gpus]
            except ConfigError as e:
                return _fail(str(e))
        try:
            _print_costs(presets, gpus_list, args.refit)
        except ValueError as e:
            return _fail(str(e))
    if args.grid:
        if args.trace:
            return _fail("--trace needs --config (one layer stack), not --grid")
        try:
            specs = get_grid(args.grid)
        except ValueError as e:
            return _fail(str(e))
        specs = specs[:: args.every]
        if args.limit is not None:
            specs = specs[: args.limit]
        return _run_grid(args, specs, presets)
    try:
        spec = parse_config(args.config)
    except ConfigError as e:
        return _fail(str(e))
    return _run_config(args, spec, presets)


def _run_grid(args: argparse.Namespace, specs: list, presets: list[str]) -> int:
    from fsmoe_compiler.sim.simulate import simulate_grid
    from fsmoe_compiler.sim.summary import summarize, summary_rows

    summaries = []
    t_all = time.perf_counter()
    for name in presets:
        t0 = time.perf_counter()
        try:
            results = simulate_grid(
                specs,
                name,
                layers=args.layers,
                workers=args.workers,
                time_limit_s=args.time_limit,
                validate=args.validate,
                refit=args.refit,
                split_weight_grads=args.split_weight_grads,
                measure=_measure_for(name),
            )
        except ValueError as e:
            return _fail(str(e))
        wall = time.perf_counter() - t0
        summ = summarize(results, name, wall_s=wall)
        summaries.append(summ)
        print(f"[{name}] {len(results)} points in {wall:.1f} s", file=sys.stderr, flush=True)
        if summ.bound_violations:
            print(f"warning: [{name}] ours is below the lower bound at {summ.bound_violations} point(s): "
                  "a bug in the schedule or the bound", file=sys.stderr)
    headers, rows = summary_rows(summaries)
    print(f"grid {args.grid}: {len(specs)} layer configs, each a model of {args.layers} identical block(s) "
          f"(attention + MoE), one training step (forward + backward + dense-gradient all-reduce).\n"
          f"speedup = baseline step time / ours; ceiling = geomean(baseline / lower bound), the most any "
          f"schedule could gain; gap LB = ours / lower bound - 1")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(f"total wall time {time.perf_counter() - t_all:.1f} s")
    if args.json:
        out = {
            "grid": args.grid,
            "layers": args.layers,
            "split_weight_grads": args.split_weight_grads,
            "points": len(specs),
            "wall_s": time.perf_counter() - t_all,
            "presets": {s.preset: s.to_json() for s in summaries},
        }
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _run_config(args: argparse.Namespace, spec, presets: list[str]) -> int:
    from fsmoe_compiler.reporting.trace import schedule_to_chrome_trace
    from fsmoe_compiler.sim.methods import LOWER_BOUND, OURS, REPORTED_METHODS
    from fsmoe_compiler.sim.presets import get_preset
    from fsmoe_compiler.sim.simulate import simulate_point

    out_json: dict = {"config": None, "layers": args.layers, "presets": {}}
    traces: dict = {}
    rows = []
    notes: list[str] = []
    for name in presets:
        try:
            costs = get_preset(name, spec.gpus, refit=args.refit, measure=_measure_for(name))
        except ValueError as e:
            return _fail(str(e))
        res, plans = simulate_point(spec, costs, layers=args.layers, time_limit_s=args.time_limit,
                                     validate=args.validate, keep_schedules=True,
                                     split_weight_grads=args.split_weight_grads)
        out_json["config"] = res.config
        out_json["presets"][name] = {
            "makespan_ms": res.makespan_ms,
            "solver_s": res.solver_s,
            "optimal": res.optimal,
            "detail": res.detail,
        }
        for m in REPORTED_METHODS:
            ms = res.makespan_ms[m]
            p = plans[m]
            speed = "" if m in (OURS, LOWER_BOUND) else f"{ms / res.makespan_ms[OURS]:.3f}x"
            rows.append([name if m == OURS else "", m, f"{ms:.3f}", f"{p.forward_ms:.3f}", f"{p.backward_ms:.3f}",
                         _degrees(p.r_fwd), _degrees(p.r_bwd), speed])
            out_json["presets"][name].setdefault("methods", {})[m] = {
                "makespan_ms": ms, "forward_ms": p.forward_ms, "backward_ms": p.backward_ms,
                "r_fwd": list(p.r_fwd), "r_bwd": list(p.r_bwd), "status": p.status}
        if args.trace:
            for m, plan in plans.items():
                if plan.schedule is not None:
                    traces[f"{name}: {m}" if len(presets) > 1 else m] = (plan.schedule, plan.graph)
        d = res.detail
        notes.append(f"{name}: ours r_fwd={d.get('r_fwd')} r_bwd={d.get('r_bwd')} status={d.get('status')}, "
                     f"solver {res.solver_s * 1e3:.0f} ms, {'proved optimal' if res.optimal else 'not proved optimal'}")
    print(f"layer {args.config}, model of {args.layers} block(s): step time = forward + backward (ms, simulated)")
    headers = ["preset", "method", "step ms", "fwd ms", "bwd ms", "r_fwd", "r_bwd", "speedup of ours"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    for line in notes:
        print(line)
    if args.trace:
        schedule_to_chrome_trace(
            {k: s for k, (s, _) in traces.items()},
            args.trace,
            graph={k: g for k, (_, g) in traces.items()},
            metadata={"config": args.config, "layers": args.layers, "presets": presets},
        )
        print(f"wrote Chrome trace {args.trace} ({len(traces)} schedules; open in https://ui.perfetto.dev)")
    if args.json:
        Path(args.json).write_text(json.dumps(out_json, indent=1))
    return 0


def _print_costs(presets: list[str], gpus_list: list[int], refit: bool) -> None:
    """Table of every preset's cost models (alpha ms, beta ms per element or per MAC) at each GPU count."""
    from fsmoe_compiler.sim.presets import costs_table, get_preset

    rows = []
    for name in presets:
        for gpus in gpus_list:
            for op, a, b in costs_table(get_preset(name, gpus, refit=refit, measure=_measure_for(name))):
                rows.append([name, gpus, op, f"{a:.4g}", f"{b:.4g}"])
            refit = False
    print("cost models t(n) = alpha + beta * n (ms; n = elements, or MACs for gemm/dense)")
    print(tabulate(rows, headers=["preset", "gpus", "op", "alpha ms", "beta ms/unit"], tablefmt="github"))


def _measure_for(preset: str) -> Callable[[], Any] | None:
    """The measurement a preset needs: ``local``'s starts torch ranks (``bench.links``, imported only then)."""
    if preset != "local":
        return None
    from fsmoe_compiler.bench.links import measure_local

    return measure_local


def _degrees(rs: Sequence[int]) -> str:
    """Pipeline degrees per layer, compact: "4" when all equal, else "4,2,8"."""
    if not rs:
        return "-"
    return str(rs[0]) if len(set(rs)) == 1 else ",".join(map(str, rs))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fsmoe_compiler.sim.cli ...``: the simulate subcommand on its own."""
    parser = argparse.ArgumentParser(prog="fsmoe simulate", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

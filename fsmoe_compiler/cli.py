"""``fsmoe``: the command line (demo, explain, simulate, bench)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

#: The examples ``demo`` and ``explain`` take (``demo.EXAMPLES``; not imported here, it imports torch).
_MODEL_HELP = ("example model: mixtral, gpt2, torchtitan or torchtitan_dsv3 (torchtitan's MoE layer, the ecosystem "
               "extra; default mixtral)")

def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a tiny Mixtral-style MoE decoder on local gloo ranks with backend='fsmoe' and eager side by side",
        description="Start N local gloo ranks (experts split over them), train a tiny Mixtral-style MoE decoder "
        "for a few steps with torch.compile(backend='fsmoe') and in eager mode from the same initial weights, "
        "print the MoE regions the backend found, the schedule it chose, and the losses of both, step by step.",
    )
    p.add_argument("--ranks", type=int, default=2, help="number of local gloo ranks (default 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: enough to reach the scheduled graphs, run them 8 steps and print "
                   "their schedule with predicted against measured times, 16 with the default options)")
    p.add_argument("--model", default="mixtral", help=_MODEL_HELP)
    p.add_argument("--dispatch", default=None, help="override the model's dispatch: capacity or dropless")
    p.add_argument("--timeout", type=float, default=600.0, help="hard deadline for the whole run, seconds")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from fsmoe_compiler.demo import run_demo

    ok = run_demo(ranks=args.ranks, steps=args.steps, model=args.model, dispatch=args.dispatch, timeout_s=args.timeout)
    return 0 if ok else 1


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="print the MoE regions fsmoe finds in an example model's forward and backward graphs",
        description="Compile an example model with the fsmoe backend on one process, run one forward and "
        "backward, and print per graph a table of the MoE regions found and the nodes in each role.",
    )
    p.add_argument("--model", default="mixtral", help=_MODEL_HELP)
    p.add_argument("--dispatch", default=None, help="override the model's dispatch: capacity or dropless")
    p.add_argument("--router", default=None, help="override the model's router (e.g. gshard, sigmoid, xmoe, softmoe)")
    p.add_argument("--all-nodes", action="store_true", help="list every node of each role, not the first 8")
    p.set_defaults(func=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from fsmoe_compiler.demo import build_example
    from fsmoe_compiler.introspect import explain

    model, inputs = build_example(args.model, dispatch=args.dispatch, router=args.router)
    result = explain(model, *inputs, quiet=True)
    print(result.render(max_names=None if args.all_nodes else 8), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsmoe",
        description="fsmoe-compiler: a torch.compile backend that recognises and schedules Mixture-of-Experts layers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_explain(sub)
    from fsmoe_compiler.sim.cli import add_simulate_parser

    add_simulate_parser(sub)
    from fsmoe_compiler.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # bad input: say what and the valid choices, no traceback
        print(f"fsmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

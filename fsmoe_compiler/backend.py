"""The ``fsmoe`` torch.compile backend: aot_autograd with our pass pipelines on both graphs.

Dynamo hands us an FX graph; aot_autograd splits it into forward and backward
ATen graphs and gives each to a graph compiler. It runs the ``COMPILE`` passes
(recognition) at once and returns a ``ScheduledGraph``: its first calls
profile the graph chunked to each candidate degree (``CHUNK``), then the
planner ranks the degrees on the measured costs (``SCREEN``), schedules the
best one (``SCHEDULE``) and the reordered graph is swapped in. If a pass
fails, the unmodified graph runs and the report says why (``strict=True``
raises instead). Registered as the ``fsmoe`` entry point of
``torch_dynamo_backends``, so ``torch.compile(model, backend="fsmoe")`` works
without importing this package.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Sequence

import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from fsmoe_compiler import records
from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.gc_pause import gc_paused
from fsmoe_compiler.passes.annotate import annotate
from fsmoe_compiler.passes.chunk import chunk
from fsmoe_compiler.passes.context import Pass, PassContext, check_pipeline
from fsmoe_compiler.passes.graph_utils import copy_graph_module
from fsmoe_compiler.passes.recognize import recognize
from fsmoe_compiler.passes.whole import whole
from fsmoe_compiler.passes.solve import solve
from fsmoe_compiler.passes.taskgraph import taskgraph
from fsmoe_compiler.passes.verify import graph_signature, verify
from fsmoe_compiler.planner import Pipelines
from fsmoe_compiler.runtime.control import OwnClock, exchange
from fsmoe_compiler.scheduled_graph import ScheduledGraph


class FSMoECompileError(RuntimeError):
    """A pass could not apply and ``strict=True`` asked for an error instead of a fallback."""


# The pass pipelines, in the order the data flows. Each pass is a function (gm, ctx) -> gm that declares
# what it reads from and writes to the PassContext; check_pipeline below proves every read is written first.

#: At compile time, for the forward and the backward graph alike.
COMPILE: tuple[Pass, ...] = (
    recognize,  # find MoE regions: router, dispatch, expert, combine, shared expert -> ctx.regions
    whole,  # every recognised layer handled whole? else a note (strict: an error naming the layer and the fix)
    verify,  # inputs, outputs, collective order unchanged; else fall back
)
#: Per candidate pipeline degree, before profiling it.
CHUNK: tuple[Pass, ...] = (
    chunk,  # split each region's dispatch -> experts -> combine into ctx.degrees chunks -> ctx.chunking
    verify,
)
#: Per candidate degree once costs are measured, to rank the degrees cheaply; the graph is not changed.
SCREEN: tuple[Pass, ...] = (
    taskgraph,  # tasks on compute / link resources, deps, durations from ctx.costs -> ctx.taskgraph, ctx.taskmap
    solve,  # a quick schedule (the list scheduler where the options say cpsat) -> ctx.schedule
)
#: On the best-ranked degree.
SCHEDULE: tuple[Pass, ...] = (
    taskgraph,
    solve,  # the scheduler the options name -> ctx.schedule
    annotate,  # reorder: collectives early, waits late; meta task/stream (the sequential baseline stays as traced)
    verify,
)

check_pipeline(COMPILE)
check_pipeline(CHUNK, given=("regions",))
check_pipeline(SCREEN, given=("regions", "costs"))
check_pipeline(SCHEDULE, given=("regions", "costs"))


def run_pipeline(passes: tuple[Pass, ...], gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Run ``passes`` in order on ``gm``."""
    for p in passes:
        gm = p(gm, ctx)
    return gm


PIPELINES = Pipelines(chunk=lambda gm, ctx: run_pipeline(CHUNK, gm, ctx),
                      screen=lambda gm, ctx: run_pipeline(SCREEN, gm, ctx),
                      schedule=lambda gm, ctx: run_pipeline(SCHEDULE, gm, ctx))


def fsmoe_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: Any = None, **kwargs: Any
) -> Callable:
    """Compile a Dynamo graph: aot_autograd with the ``COMPILE`` passes on the forward and backward graphs."""
    if kwargs:
        raise ValueError(
            f"the fsmoe backend takes only options=..., got {sorted(kwargs)}; "
            f"valid options go in options: {[f for f in FSMoEConfig.__dataclass_fields__]}"
        )
    config = FSMoEConfig.from_options(options)
    record = records.new_record(config, example_inputs, records.origin_of(gm))
    records.note_break(record, gm)
    return aot_autograd(
        fw_compiler=_graph_compiler("forward", config, record),
        bw_compiler=_graph_compiler("backward", config, record),
    )(gm, example_inputs)


def _graph_compiler(kind: str, config: FSMoEConfig, record: records.CompileRecord) -> Callable:
    def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = PassContext(graph_kind=kind, config=config, strict=config.strict, original=graph_signature(gm))
        forward = record.latest("forward")
        if kind == "backward" and forward is not None:  # backward regions take their layer from the forward's
            ctx.regions["forward"] = list(forward.regions)
        _dump(config, record, kind, "before", gm)
        fallback = None
        clock = OwnClock()
        try:
            with gc_paused():
                result = run_pipeline(COMPILE, copy_graph_module(gm), ctx)
        except Exception as exc:  # any pass failure: run the unmodified graph, say why
            if config.strict:
                raise FSMoECompileError(f"fsmoe could not compile the {kind} graph: {exc}") from exc
            fallback = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"fsmoe: {kind} graph falls back to the unmodified graph ({fallback})", stacklevel=2)
            result = gm
        if config.check_ranks:  # on every path, so no rank waits alone in the gather
            _check_ranks_agree(kind, ctx.regions.get(kind, []) if fallback is None else [])
        report = records.GraphReport(
            kind=kind,
            regions=list(ctx.regions.get(kind, [])),
            notes=list(ctx.notes),
            fallback=fallback,
            num_nodes=len(result.graph.nodes),
            compile_s=clock.own(),
            wait_s=clock.waited(),
        )
        record.graphs.append(report)
        _dump(config, record, kind, "after", result)
        if fallback is not None:
            return make_boxed_func(result.forward)
        scheduled = ScheduledGraph(result, ctx, config, report, PIPELINES,
                                   dump=lambda stage, g: _dump(config, record, kind, stage, g))
        return make_boxed_func(lambda *args: scheduled(list(args)))

    return compile_graph


class RanksDisagree(ValueError):
    """Ranks found different MoE regions; their collectives would not match."""


def _region_summary(regions: list) -> list[tuple]:
    return [(r.layer, r.router, r.num_experts, r.top_k, r.capacity, r.dropless) for r in regions]


def _check_ranks_agree(kind: str, regions: list) -> None:
    """Raise ``RanksDisagree`` if another rank found different regions in this graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    mine = _region_summary(regions)
    everyone = exchange(f"regions/{kind}", mine)  # over the store: no collective while Dynamo compiles
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            raise RanksDisagree(
                f"fsmoe: in the {kind} graph rank {dist.get_rank()} found MoE regions {mine} "
                f"but rank {rank} found {theirs} (layer, router, experts, top-k, capacity, dropless); "
                "all ranks must run the same model"
            )


def _dump(config: FSMoEConfig, record: records.CompileRecord, kind: str, stage: str, gm: fx.GraphModule) -> None:
    if config.dump_dir is None:
        return
    os.makedirs(config.dump_dir, exist_ok=True)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    path = os.path.join(config.dump_dir, f"graph{record.id}_{kind}_{stage}_rank{rank}.py")
    tasks = [f"#   {n.name}: task {m['task']}, stream {m.get('stream')}" for n in gm.graph.nodes
             if isinstance(m := n.meta.get("fsmoe"), dict) and "task" in m]
    with open(path, "w") as f:
        f.write(gm.print_readable(print_output=False))
        if tasks:
            f.write("\n# node -> task, stream (in graph order)\n" + "\n".join(tasks) + "\n")

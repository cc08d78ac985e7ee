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

import dataclasses
import hashlib
import os
import sys
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from fsmoe_compiler import inductor_codegen, records
from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.gc_pause import gc_paused
from fsmoe_compiler.passes.annotate import annotate
from fsmoe_compiler.passes.chunk import chunk
from fsmoe_compiler.passes.context import Pass, PassContext, check_pipeline
from fsmoe_compiler.passes.graph_utils import copy_graph_module
from fsmoe_compiler.passes.narrow_comm import narrow_comm
from fsmoe_compiler.passes.partition_grads import partition_grads
from fsmoe_compiler.passes.recognize import recognize
from fsmoe_compiler.passes.whole import whole
from fsmoe_compiler.passes.solve import solve
from fsmoe_compiler.passes.split_tokens import TokenSplit, candidate_ranges, split_tokens, splits_for
from fsmoe_compiler.passes.taskgraph import taskgraph
from fsmoe_compiler.ops import collective_sequence
from fsmoe_compiler.passes.verify import graph_signature, verify
from fsmoe_compiler.planner import Pipelines, distributed
from fsmoe_compiler.runtime import control
from fsmoe_compiler.runtime.control import OwnClock
from fsmoe_compiler.scheduled_graph import ScheduledGraph
from fsmoe_compiler.split_choice import AS_TRACED, WHOLE, SplitOrWhole, Variant, choice_key


class FSMoECompileError(RuntimeError):
    """A pass could not apply and ``strict=True`` asked for an error instead of a fallback."""


# The pass pipelines, in the order the data flows. Each pass is a function (gm, ctx) -> gm that declares
# what it reads from and writes to the PassContext; check_pipeline below proves every read is written first.

#: On Dynamo's graph, before autograd, when the forward graph's regions asked for it (then traced again).
PRE_AUTOGRAD: tuple[Pass, ...] = (
    split_tokens,  # run dropless layers that cannot chunk after dispatch on token ranges -> both graphs hold them
)
#: At compile time, for the forward and the backward graph alike.
COMPILE: tuple[Pass, ...] = (
    narrow_comm,  # all-to-alls whose payload is exact in bf16/fp16 send that (half the bytes) -> ctx.original
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
    partition_grads,  # gradient all-reduces merged into the partitions the costs price fastest (grad_partition)
    taskgraph,
    solve,  # the scheduler the options name -> ctx.schedule
    annotate,  # reorder: collectives early, waits late; meta task/stream (the sequential baseline stays as traced)
    verify,
)

check_pipeline(PRE_AUTOGRAD)
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
    control.start()  # this rank's heartbeat, so the others can tell it is alive while it compiles
    record = records.new_record(config, example_inputs, dynamo_origin(gm))
    records.note_break(record, gm)  # the Dynamo graph break that ended gm, for the report
    compile_ = _aot(config, record)
    with control.doing("compiling", "", f"Dynamo graph {record.compile_id} at {record.site}"):
        try:
            return compile_(gm, example_inputs)
        except SplitTokensFirst as request:  # the forward graph named layers to run on token ranges: trace again
            return _compile_split(gm, example_inputs, config, record, request.splits)


def _aot(config: FSMoEConfig, record: records.CompileRecord) -> Callable:
    """aot_autograd with the fsmoe graph compilers, reporting into ``record``."""
    return aot_autograd(
        fw_compiler=_graph_compiler("forward", config, record),
        bw_compiler=_graph_compiler("backward", config, record),
        # data writes into graph inputs that need no gradient stay in the forward graph as copy_ (as Dynamo's
        # aot_eager backends keep them); returned as extra outputs instead, AOT's default partitioner rejects
        # Megatron-Core's allgather dispatcher at EP=2 ("Node slice_scatter_1 was invalid, but is output")
        keep_inference_input_mutations=True,
    )


def _compile_split(gm: fx.GraphModule, example_inputs: Sequence[Any], config: FSMoEConfig,
                   record: records.CompileRecord, splits: list[TokenSplit]) -> Callable:
    """Compile ``gm`` with ``splits`` applied: alone for ``split_tokens=N``; for ``"auto"`` beside the whole graph,
    each range count from 2 up to the splits' measured against it and against ``gm`` run as traced
    (``SplitOrWhole``). A split graph that does not compile is left out, and why."""
    if config.split_tokens != "auto":
        split_fn = _compile_split_graph(gm, example_inputs, config, record, splits)
        return split_fn if split_fn is not None else _aot(config, record)(gm, example_inputs)
    variants = []
    found = list(record.token_split or [])
    for ranges in candidate_ranges(max(s.chunks for s in splits)):
        split_record = records.new_record(config, example_inputs, record.origin)
        split_record.token_split = list(found)
        fn = _compile_split_graph(gm, example_inputs, config, split_record,
                                  [dataclasses.replace(s, chunks=min(s.chunks, ranges)) for s in splits])
        if fn is None:
            record.token_split = [*(record.token_split or []), *split_record.token_split[len(found):]]
            records.drop(split_record)
            continue
        variants.append(Variant(f"{ranges} ranges", fn, split_record))
    record.token_split = [*(record.token_split or []),
                          "dynamo: the whole graph, compiled beside the token-split ones; the fastest runs"]
    whole = Variant(WHOLE, _aot(config, record)(gm, example_inputs), record)
    if not variants:
        return whole.fn
    # what eager runs (plain torch.compile's code under codegen="inductor"): kept where no schedule can win
    as_traced = Variant(AS_TRACED, _as_traced(gm, example_inputs, config, record), record)
    key = choice_key(record.site, hashlib.sha1(gm.code.encode()).hexdigest())
    return SplitOrWhole([as_traced, whole, *variants], key, voting=config.check_ranks)


def _as_traced(gm: fx.GraphModule, example_inputs: Sequence[Any], config: FSMoEConfig,
               record: records.CompileRecord) -> Callable:
    """Dynamo's graph as it is: run by PyTorch, or under ``codegen="inductor"`` compiled by Inductor as plain
    ``torch.compile`` would (its Python code, and why, if Inductor fails on it)."""
    if config.codegen != "inductor":
        return gm
    from torch._inductor.compile_fx import compile_fx

    try:
        return compile_fx(gm, example_inputs)
    except Exception as exc:  # noqa: BLE001 - the variant still runs, as Python code
        if config.strict:
            raise FSMoECompileError(f"fsmoe: Inductor could not compile the graph as traced: {exc}") from exc
        record.token_split = [*(record.token_split or []), f"dynamo: the graph as traced runs as Python code "
                              f"(Inductor failed on it: {type(exc).__name__}: {str(exc)[:300]})"]
        return gm


def _compile_split_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], config: FSMoEConfig,
                         record: records.CompileRecord, splits: list[TokenSplit]) -> Callable | None:
    """aot_autograd on ``gm`` split by ``splits``, reporting into ``record``; None (and a note) when the split
    cannot be made or the split graph does not trace (``strict``: ``FSMoECompileError``)."""
    split_gm = _split_dynamo_graph(gm, config, record, splits)
    if split_gm is gm:
        return None
    grad = torch.is_grad_enabled()
    try:
        return _aot(config, record)(split_gm, example_inputs)
    except Exception as exc:  # a size the split did not follow
        # a trace that failed inside the graph's own no_grad block (torchtitan's count exchange) left grad mode
        # off: the whole graph traced so would give no gradient to anything before the block
        torch._C._set_grad_enabled(grad)
        if config.strict:
            raise FSMoECompileError(f"fsmoe: the token-split graph failed to compile: {exc}") from exc
        record.graphs.clear()
        record.token_split = [*(record.token_split or []), f"dynamo: tokens not split (the split graph failed "
                              f"to compile: {type(exc).__name__}: {str(exc)[:300]})"]
        return None


class SplitTokensFirst(Exception):
    """Raised by the forward graph compiler to have the Dynamo graph split into token ranges and traced again."""

    def __init__(self, splits: list[TokenSplit]) -> None:
        super().__init__(f"split {len(splits)} MoE layer(s) into token ranges first")
        self.splits = splits


def _split_dynamo_graph(gm: fx.GraphModule, config: FSMoEConfig, record: records.CompileRecord,
                        splits: list[TokenSplit]) -> fx.GraphModule:
    """The ``PRE_AUTOGRAD`` passes on a copy of Dynamo's graph; on failure the graph as traced, and why."""
    ctx = PassContext(graph_kind="dynamo", config=config, strict=config.strict, token_splits=splits)
    try:
        out = run_pipeline(PRE_AUTOGRAD, copy_graph_module(gm), ctx)
    except Exception as exc:
        if config.strict:
            raise FSMoECompileError(f"fsmoe could not split tokens: {exc}") from exc
        ctx.notes.append(f"dynamo: tokens not split ({type(exc).__name__}: {exc})")
        ctx.token_splits = []
    record.token_split = [*(record.token_split or []), *ctx.notes]
    return out if ctx.token_splits else gm  # nothing split: the graph as traced


def dynamo_origin(gm: fx.GraphModule) -> records.Origin:
    """Where Dynamo traced ``gm``: its frame (the program point; a graph break's resume function is one of
    its own), compile id, why the graph ended (a graph break's reason and place) and the modules being called."""
    site = "unknown"
    ctx = torch._guards.TracingContext.try_get()
    codes = list(getattr(ctx, "traced_code", None) or [])
    if codes:
        code = codes[0]
        site = f"{code.co_name}@{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    reason = getattr(gm, "compile_subgraph_reason", None)
    graph_break = where = None
    if reason is not None and getattr(reason, "graph_break", False):
        graph_break = str(reason.reason).strip()
        stack = list(getattr(reason, "user_stack", None) or [])
        if stack:
            f = stack[-1]
            where = f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
    owners: list[weakref.ref] = []
    frame = sys._getframe(1)
    while frame is not None:  # the modules whose call Dynamo is compiling (the compiled model among them)
        obj = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(obj, torch.nn.Module) and not any(o() is obj for o in owners):
            owners.append(weakref.ref(obj))
        frame = frame.f_back
    return records.Origin(site=site, compile_id=str(gm.meta.get("dynamo_compile_id", "?")),
                          graph_break=graph_break, break_at=where, owners=owners)


_GROUP_SHAPES: dict[str, Any] = {}


def _group_shape(name: str | None) -> Any:
    """A process group as the same value on every rank that holds a group like it: its size and rank strides
    (expert-parallel groups [0, 1] and [2, 3] both read (2, (0, 1))); its name where it cannot be resolved."""
    if name is None or not distributed():
        return name
    if name not in _GROUP_SHAPES:
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group

            ranks = dist.get_process_group_ranks(_resolve_process_group(name))
            _GROUP_SHAPES[name] = (len(ranks), tuple(r - ranks[0] for r in ranks))
        except Exception:  # noqa: BLE001 - a fake or destroyed group
            _GROUP_SHAPES[name] = name
    return _GROUP_SHAPES[name]


#: Options that do not shape a plan (what is checked, reported or cached): every other option is part of the key.
NOT_IN_AGREEMENT = frozenset({"strict", "check_ranks", "dump_dir", "cache_dir"})


def agreement_key(kind: str, gm: fx.GraphModule, regions: list, config: FSMoEConfig | None = None) -> str:
    """What the ranks agree on for a graph: its kind, its collectives in traced order (op and group, not
    sizes: dropless sizes differ per rank, a dynamic-shape recompile makes them symbolic) and its MoE regions
    (without the sizes). Graphs with equal keys on two ranks issue the same collectives and would be chunked
    and scheduled alike, wherever Dynamo cut them (the same layer traced whole on one rank and after a graph
    break on another has one key). Not the program point: that names the slot a graph's planning lives in.
    The options that shape the plan are part of it: the same model compiled twice with other options (the
    bench's methods, side by side in one process) is two graphs to agree on, not one."""
    collectives = [(op, _group_shape(g)) for op, g in collective_sequence(gm.graph)]
    plan = None if config is None else tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                                             if f.name not in NOT_IN_AGREEMENT)
    sig = (kind, collectives, [_region_summary(r, sizes=False) for r in regions], plan)
    return hashlib.sha1(repr(sig).encode()).hexdigest()[:16]


def _graph_compiler(kind: str, config: FSMoEConfig, record: records.CompileRecord) -> Callable:
    def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        # what Inductor needs to compile the chosen graph later, after profiling
        trace = inductor_codegen.capture(kind, example_inputs) if config.codegen == "inductor" else None
        with control.doing("compiling", "", f"the {kind} graph of Dynamo graph {record.compile_id} at {record.site}"):
            try:
                return _compile_graph(kind, config, record, gm, trace)
            except SplitTokensFirst as exc:  # a request, not a failure: the others must not see this rank failed
                request = exc
        raise request

    return compile_graph


def _compile_graph(kind: str, config: FSMoEConfig, record: records.CompileRecord, gm: fx.GraphModule,
                   trace: inductor_codegen.TraceState | None = None) -> Callable:
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
        if kind == "forward" and record.token_split is None:
            setting = 1 if config.scheduler in ("sequential", "none") else config.split_tokens  # baselines as traced
            splits, notes = splits_for(result, ctx.regions_here, setting)
            record.token_split = notes
            if splits:
                raise SplitTokensFirst(splits)
        if kind == "forward":
            ctx.notes[:0] = record.token_split
    except SplitTokensFirst:
        raise
    except Exception as exc:  # any pass failure: run the unmodified graph, say why
        if config.strict:
            raise FSMoECompileError(f"fsmoe could not compile the {kind} graph: {exc}") from exc
        fallback = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"fsmoe: {kind} graph falls back to the unmodified graph ({fallback})", stacklevel=2)
        result = gm
    regions = ctx.regions.get(kind, []) if fallback is None else []
    if config.check_ranks:
        _compare_with_peers(kind, record, regions)
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
    # a fallback runs as traced, but still takes part in the calls' votes, so the other ranks see it at once
    scheduled = ScheduledGraph(result, ctx, config, report, PIPELINES,
                               dump=lambda stage, g: _dump(config, record, kind, stage, g),
                               site=record.site, key=agreement_key(kind, result, regions, config),
                               traced_only=fallback, trace=trace)
    return make_boxed_func(lambda *args: scheduled(list(args)))


class RanksDisagree(ValueError):
    """Ranks found different MoE regions; their collectives would not match."""


def _region_summary(region: Any, sizes: bool = True) -> tuple:
    if sizes:
        return (region.layer, region.router, region.num_experts, region.top_k, region.capacity, region.dropless)
    return (region.layer, region.router, region.num_experts, region.top_k, region.dropless)


def _compare_with_peers(kind: str, record: records.CompileRecord, regions: list) -> None:
    """Raise ``RanksDisagree`` if another rank found other MoE regions in the first whole graph of this
    program point; never waits (what it compares is what the others have published so far).

    A graph that ends at a graph break is not compared (another rank may trace the same frame whole), nor
    a recompile (it may see other sizes). Schedule-relevant agreement is per call (``scheduled_graph``);
    this only turns a different model on some rank into an error at compile time.
    """
    if not distributed():
        return
    first = control.local("fsmoe.compiled_sites", set)
    ident = (record.site, kind)
    if ident in first:
        return
    first.add(ident)
    mine = [_region_summary(r, sizes=False) for r in regions]
    whole = record.graph_break is None
    name = f"graphs/{hashlib.sha1(record.site.encode()).hexdigest()[:12]}/{kind}"
    control.post(name, (whole, mine))
    if not whole:
        return
    for rank, (theirs_whole, theirs) in sorted(control.posted(name).items()):
        if theirs_whole and theirs != mine:
            raise RanksDisagree(
                f"fsmoe: in the {kind} graph at {record.site} rank {control.rank()} found MoE regions {mine} "
                f"but rank {rank} found {theirs} (layer, router, experts, top-k, dropless); "
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

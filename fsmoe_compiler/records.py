"""What the backend remembers about each compile, for ``report`` and ``explain``.

Dynamo hands the backend a model's parameters as graph inputs, so a record
keeps weak references to them; a graph that takes no parameter (the tail of a
forward after a graph break, a residual add) is tied to the modules whose
calls were on the Python stack when Dynamo compiled it (the compiled wrapper
and the modules it called). ``records_for(model)`` finds the records of
``model`` by either, without reaching into Dynamo's internals. Each record
also keeps why Dynamo ended the graph (``GraphCompileReason``, the record
``torch._dynamo.explain`` reads): a graph break, with its cause and fix.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from fsmoe_compiler.reporting.breaks import GraphBreak, graph_break

_counter = itertools.count()


@dataclass
class TaskRow:
    """One scheduled task: where the scheduler put it and, once timed, when it really ran (ms from call start)."""

    task: str
    resource: str
    layer: int
    chunk: int
    role: str
    start_ms: float
    end_ms: float
    measured_start_ms: float | None = None
    measured_end_ms: float | None = None


@dataclass
class ScheduleReport:
    """What the scheduler chose for one graph and how its prediction compares with the measured run.

    ``candidates`` maps each pipeline degree tried to its predicted makespan
    (with CP-SAT and several degrees: the list scheduler's makespan, except
    for the chosen degree, which CP-SAT then solves);
    ``degrees`` is the degree applied per layer (a layer the chunk pass could
    not split keeps 1, with the reason in ``notes``); ``plan_s`` is the
    compile overhead of planning (chunking, task graphs, solves, annotation),
    profiling calls excluded. ``reference_ms`` prices the same task graph with
    the same costs under the ``tutel`` and ``sequential`` orders and gives a
    lower bound no order beats, so the gain, and the gain left, read off one
    cost model, free of run-to-run noise.
    """

    scheduler: str
    degrees: dict[int, int]
    candidates: dict[int, float]
    predicted_ms: float
    tasks: list[TaskRow]
    notes: list[str] = field(default_factory=list)
    profile_calls: int = 0
    plan_s: float = 0.0
    wait_s: float = 0.0  # planning time spent waiting for the other ranks at control exchanges (not in plan_s)
    plan_split_s: dict[str, float] = field(default_factory=dict)  # plan_s by phase: chunk, rank degrees, schedule
    cache_hit: bool = False
    status: str = ""
    reference_ms: dict[str, float] = field(default_factory=dict)  # "tutel", "sequential", "lower_bound"
    measured_calls_ms: list[float] = field(default_factory=list)
    schedule: Any = field(default=None, repr=False)  # scheduler.Schedule, for traces
    taskgraph: Any = field(default=None, repr=False)  # scheduler.TaskGraph

    @property
    def measured_ms(self) -> float | None:
        """Median wall time of the scheduled graph's calls so far (None before the first)."""
        calls = sorted(self.measured_calls_ms)
        return calls[len(calls) // 2] if calls else None


@dataclass
class GraphReport:
    """One aot_autograd graph after the pass pipeline.

    ``fallback`` is the reason the unmodified graph was used instead, or None;
    ``schedule`` is filled once profiling ends and the scheduled graph is
    swapped in; ``compile_s`` is the pass pipeline's time at compile, and
    ``wait_s`` the time this rank then waited for the others to agree on the
    regions (their Dynamo tracing, not this backend's work; not in ``compile_s``).
    """

    kind: str  # "forward" | "backward"
    regions: list
    notes: list[str]
    fallback: str | None
    num_nodes: int
    schedule: ScheduleReport | None = None
    compile_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class CompileRecord:
    """One Dynamo graph compiled by the fsmoe backend and its aot graphs.

    ``module_refs`` are the modules whose calls were on the stack when Dynamo
    compiled it; ``graph_break`` is the Dynamo graph break that ended it (None
    when the graph ran to the end of its frame); ``compile_id`` is Dynamo's
    (``"frame/recompile"``, as ``TORCH_LOGS`` prints it).
    """

    id: int
    config: Any
    param_refs: list[weakref.ref] = field(default_factory=list, repr=False)
    graphs: list[GraphReport] = field(default_factory=list)
    module_refs: list[weakref.ref] = field(default_factory=list, repr=False)
    graph_break: GraphBreak | None = None
    compile_id: str | None = None
    num_params: int = 0

    def owns_any(self, params: Iterable[torch.Tensor]) -> bool:
        mine = {id(p) for p in (r() for r in self.param_refs) if p is not None}
        return any(id(p) in mine for p in params)

    def called_from(self, module: torch.nn.Module) -> bool:
        """``module`` (or the module a compiled wrapper wraps) was being called when Dynamo compiled this graph."""
        wanted = {id(module), id(getattr(module, "_orig_mod", module))}
        return any(id(m) in wanted for m in (r() for r in self.module_refs) if m is not None)

    def alive(self) -> bool:
        refs = self.param_refs + self.module_refs
        return not refs or any(r() is not None for r in refs)

    def latest(self, kind: str) -> GraphReport | None:
        """The most recently compiled graph of ``kind`` (recompiles replace earlier ones)."""
        found = [g for g in self.graphs if g.kind == kind]
        return found[-1] if found else None


def schedule_report(scheduler: str, plan: Any, profile_calls: int, cache_hit: bool) -> ScheduleReport:
    """The report of a ``planner.Plan``: one row per scheduled task, the degrees applied, predicted times."""
    ctx = plan.ctx
    sched, graph = ctx.schedule, ctx.taskgraph
    rows = []
    for resource, ids in sched.order.items():
        for tid in ids:
            t = graph.tasks[tid]
            rows.append(TaskRow(task=tid, resource=resource, layer=t.layer, chunk=t.chunk, role=t.role,
                                start_ms=sched.start[tid], end_ms=sched.end[tid]))
    rows.sort(key=lambda r: (r.start_ms, r.resource, r.task))
    return ScheduleReport(scheduler=scheduler, degrees={layer: info.degree for layer, info in ctx.chunking.items()},
                          candidates=dict(plan.predicted), predicted_ms=sched.makespan, tasks=rows,
                          notes=list(ctx.notes), profile_calls=profile_calls, plan_s=plan.plan_s, wait_s=plan.wait_s,
                          plan_split_s=dict(plan.split_s), cache_hit=cache_hit, status=sched.status,
                          reference_ms=dict(sched.meta.get("reference_ms", {})), schedule=sched, taskgraph=graph)


_RECORDS: list[CompileRecord] = []


def new_record(config: Any, example_inputs: Iterable[Any], gm: Any = None) -> CompileRecord:
    """Register a compile: the parameters it was given, the modules being called, why Dynamo ended the graph."""
    params = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    record = CompileRecord(next(_counter), config, [weakref.ref(p) for p in params],
                           module_refs=_calling_modules(), num_params=len(params))
    if gm is not None:
        record.graph_break = graph_break(getattr(gm, "compile_subgraph_reason", None))
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    record.compile_id = None if compile_id is None else str(compile_id)
    _RECORDS.append(record)
    return record


def _calling_modules() -> list[weakref.ref]:
    """Weak references to the modules whose ``forward``/``__call__`` frames are on the stack, innermost first."""
    out: dict[int, weakref.ref] = {}
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            module = frame.f_locals.get("self")
            if isinstance(module, torch.nn.Module) and id(module) not in out:
                out[id(module)] = weakref.ref(module)
        frame = frame.f_back
    return list(out.values())


def records_for(model: torch.nn.Module) -> list[CompileRecord]:
    """Records of every graph compiled from ``model`` (or its compiled wrapper), oldest first.

    A graph belongs to ``model`` when it takes one of its parameters or was
    compiled while ``model`` was being called (graphs that take no parameter).
    """
    params = list(model.parameters())
    _RECORDS[:] = [r for r in _RECORDS if r.alive()]
    return [r for r in _RECORDS if r.owns_any(params) or r.called_from(model)]

"""What the backend remembers about each compile, for ``report`` and ``explain``.

A record belongs to a model when one of its graph inputs is a parameter of
the model (Dynamo hands them to the backend), or when the model, its
compiled wrapper or one of its modules was being called when Dynamo
compiled the graph (the backend notes the modules on the call stack): so a
graph that takes no parameter (a graph break's resume function, a graph of
collectives and indexing only) is the model's too. Records hold weak
references only.
"""

from __future__ import annotations

import itertools
import statistics
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

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
    kind: str = ""  # the task's kind; "host_cpu": a collective's time on the host's cores, no node of its own to time


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
    peak_bytes: int | None = None  # the scheduled graph's peak of live tensor bytes in its order (memory.peak_bytes)
    traced_peak_bytes: int | None = None  # the same for the graph as traced
    measured_calls_ms: list[float] = field(default_factory=list)  # this rank's wall time of each scheduled call
    # per scheduled call, the time of the rank that entered it last (the least of every rank's wall time, shared
    # at the next call's vote): the others' extra is their wait at the first collective for it to arrive, set by
    # the code between calls (the optimizer, Python, Dynamo's guards), which no graph-level prediction can know
    aligned_calls_ms: list[float] = field(default_factory=list)
    codegen: str = "eager"  # what the measured calls ran: the graph's ATen calls, or Inductor's code for it
    # Inductor's code against the plain graph's measured time (median of the first scheduled calls over the timed
    # call), learned in this run or read from the profile cache; the prediction for the compiled code is scaled by it
    calibration: float | None = None
    calibration_from: str = ""  # "this run" or "cache"
    # the link models the prediction used, per f"{kind}/{group_size}": (alpha ms, ms per MiB, host CPU share or None)
    links: dict[str, tuple[float, float, float | None]] = field(default_factory=dict)
    schedule: Any = field(default=None, repr=False)  # scheduler.Schedule, for traces
    taskgraph: Any = field(default=None, repr=False)  # scheduler.TaskGraph

    @property
    def codegen_predicted_ms(self) -> float:
        """The prediction for the code that runs: ``predicted_ms`` (the plain graph's profile) times the
        calibration where one is known."""
        return self.predicted_ms * (self.calibration or 1.0)

    @property
    def measured_ms(self) -> float | None:
        """Median time of the scheduled graph's calls so far, each from the last rank's entry
        (``aligned_calls_ms``; alone, or before any was shared: this rank's wall times); None before the first.
        Of an even count, the mean of the middle two, not the slower one."""
        calls = self.aligned_calls_ms or self.measured_calls_ms
        return statistics.median(calls) if calls else None

    @property
    def own_ms(self) -> float | None:
        """Median wall time of the scheduled graph's calls on this rank, its waits for the other ranks included."""
        return statistics.median(self.measured_calls_ms) if self.measured_calls_ms else None


@dataclass
class GraphReport:
    """One aot_autograd graph after the pass pipeline.

    ``fallback`` is the reason the unmodified graph was used instead, or None; ``unscheduled`` why the graph
    runs as traced without planning (nothing to schedule), or None;
    ``schedule`` is filled once profiling ends and the scheduled graph is
    swapped in; ``compile_s`` is the pass pipeline's time at compile (``codegen_s``: Inductor's compile of the
    graph that runs, under ``codegen="inductor"``), and
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
    unscheduled: str | None = None
    codegen: str = "eager"  # how the graph that runs now was generated ("inductor" once Inductor compiled it)
    codegen_s: float = 0.0  # Inductor's compile of it (decomposition and pinning included), not in compile_s


@dataclass
class Origin:
    """Where Dynamo traced a graph: the program point (``site``: the frame's function, file and first line; a
    graph break's resume function is a site of its own), Dynamo's compile id, the graph break that ended the
    graph (Dynamo's reason and the user code line), and the modules being called (weak references)."""

    site: str = "unknown"
    compile_id: str = "?"
    graph_break: str | None = None
    break_at: str | None = None
    owners: list[weakref.ref] = field(default_factory=list, repr=False)


#: How a note of ``CompileRecord.token_split`` that records the whole-or-split choice starts.
SPLIT_CHOICE = "token split:"
#: How a compiled graph's ``fallback`` begins when the whole-or-split choice kept Dynamo's graph instead: no failure.
FASTEST_AS_TRACED = "runs as traced: Dynamo's graph, run by PyTorch, was the fastest"


@dataclass
class CompileRecord:
    """One Dynamo graph compiled by the fsmoe backend and its aot graphs."""

    id: int
    config: Any
    param_refs: list[weakref.ref] = field(default_factory=list, repr=False)
    graphs: list[GraphReport] = field(default_factory=list)
    origin: Origin = field(default_factory=Origin)
    #: What the token-split pass did to the Dynamo graph (its notes), None until the forward graph decided.
    token_split: list[str] | None = None

    @property
    def split_choice(self) -> list[str]:
        """The notes of ``token_split`` that say which whole-or-split variant was kept and why."""
        return [n for n in self.token_split or [] if n.startswith(SPLIT_CHOICE)]

    @property
    def site(self) -> str:
        return self.origin.site

    @property
    def compile_id(self) -> str:
        return self.origin.compile_id

    @property
    def graph_break(self) -> str | None:
        return self.origin.graph_break

    def owns_any(self, params: Iterable[torch.Tensor]) -> bool:
        mine = {id(p) for p in (r() for r in self.param_refs) if p is not None}
        return any(id(p) in mine for p in params)

    def called_from(self, modules: Iterable[torch.nn.Module]) -> bool:
        """One of ``modules`` was being called when Dynamo compiled this graph."""
        owners = {id(m) for m in (r() for r in self.origin.owners) if m is not None}
        return any(id(m) in owners for m in modules)

    def alive(self) -> bool:
        """Some parameter or calling module of this record still exists (or it never had any)."""
        refs = self.param_refs + self.origin.owners
        return not refs or any(r() is not None for r in refs)

    def latest(self, kind: str) -> GraphReport | None:
        """The most recently compiled graph of ``kind`` (recompiles replace earlier ones)."""
        found = [g for g in self.graphs if g.kind == kind]
        return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------
# Dynamo graph breaks as the report shows them (cause and fix), kept beside the records by record id


_BREAKS: dict[int, Any] = {}


def note_break(record: CompileRecord, gm: Any) -> None:
    """Keep why Dynamo ended ``gm`` when it was a graph break (``gm.compile_subgraph_reason``, the record
    ``torch._dynamo.explain`` reads), classified by ``reporting.breaks``: where, the cause, the fix."""
    from fsmoe_compiler.reporting.breaks import graph_break

    found = graph_break(getattr(gm, "compile_subgraph_reason", None))
    if found is not None:
        _BREAKS[record.id] = found
    live = {r.id for r in _RECORDS}
    for gone in [k for k in _BREAKS if k not in live]:  # records dropped with their models
        del _BREAKS[gone]


def break_of(record: CompileRecord) -> Any:
    """The ``reporting.breaks.GraphBreak`` that ended ``record``'s graph, or None."""
    return _BREAKS.get(record.id)


def schedule_report(scheduler: str, plan: Any, profile_calls: int, cache_hit: bool) -> ScheduleReport:
    """The report of a ``planner.Plan``: one row per scheduled task, the degrees applied, predicted times."""
    ctx = plan.ctx
    sched, graph = ctx.schedule, ctx.taskgraph
    rows = []
    for resource, ids in sched.order.items():
        for tid in ids:
            t = graph.tasks[tid]
            rows.append(TaskRow(task=tid, resource=resource, layer=t.layer, chunk=t.chunk, role=t.role,
                                start_ms=sched.start[tid], end_ms=sched.end[tid], kind=t.kind))
    rows.sort(key=lambda r: (r.start_ms, r.resource, r.task))
    costs = ctx.costs
    links = {k: (c.alpha, c.beta * (1 << 20), costs.cpu_share.get(k), c.floor) for k, c in sorted(costs.comm.items())
             } if costs is not None else {}
    return ScheduleReport(scheduler=scheduler, degrees={layer: info.degree for layer, info in ctx.chunking.items()},
                          candidates=dict(plan.predicted), predicted_ms=sched.makespan, tasks=rows,
                          notes=list(ctx.notes), profile_calls=profile_calls, plan_s=plan.plan_s, wait_s=plan.wait_s,
                          plan_split_s=dict(plan.split_s), cache_hit=cache_hit, status=sched.status,
                          reference_ms=dict(sched.meta.get("reference_ms", {})), peak_bytes=plan.peak_bytes,
                          traced_peak_bytes=plan.traced_peak_bytes, links=links, schedule=sched, taskgraph=graph)


_RECORDS: list[CompileRecord] = []


def new_record(config: Any, example_inputs: Iterable[Any], origin: Origin | None = None) -> CompileRecord:
    """Register a compile and remember which parameters it was given and where it came from."""
    params = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    record = CompileRecord(next(_counter), config, [weakref.ref(p) for p in params], origin=origin or Origin())
    _RECORDS.append(record)
    return record


def drop(record: CompileRecord) -> None:
    """Forget ``record`` (a compiled variant that will never run again: the report shows the one that runs)."""
    _RECORDS[:] = [r for r in _RECORDS if r is not record]


def records_for(model: torch.nn.Module) -> list[CompileRecord]:
    """Records of every graph compiled from ``model`` (or its compiled wrapper), oldest first: those given a
    parameter of it and those compiled while it (or one of its modules) was being called."""
    params = list(model.parameters())
    modules = list(model.modules())
    _RECORDS[:] = [r for r in _RECORDS if r.alive()]
    return [r for r in _RECORDS if r.owns_any(params) or r.called_from(modules)]

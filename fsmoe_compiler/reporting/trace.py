"""Export schedules as Chrome trace JSON (chrome://tracing, https://ui.perfetto.dev).

One process (``pid``) per schedule, e.g. per method (``ours``, ``tutel``,
``sequential``), and inside it one track (``tid``) per resource (``compute``,
``inter``, ``intra``). Each task is a complete event (``"ph": "X"``) whose
``ts`` / ``dur`` are the task's start and duration in microseconds (schedules
are in milliseconds). Torch-free: needs only the scheduler's types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

#: Resources get their tracks in this order; unknown resources follow, sorted.
RESOURCE_ORDER = ("compute", "inter", "intra")


@dataclass(frozen=True)
class TraceSpan:
    """One task placed in time: what the trace shows as a bar."""

    name: str
    resource: str
    start_ms: float
    dur_ms: float
    args: dict[str, Any] = field(default_factory=dict)


def schedule_spans(schedule: Any, graph: Any | None = None) -> list[TraceSpan]:
    """The spans of a scheduler ``Schedule`` (one per task), sorted by start.

    The resource of a task is read from ``schedule.order`` and its duration is
    ``end - start``, so the Schedule alone suffices; with the ``TaskGraph`` the
    events also carry each task's kind, role, layer, chunk and phase.
    """
    tasks = getattr(graph, "tasks", None) or {}
    spans = []
    for resource, ids in schedule.order.items():
        for tid in ids:
            args: dict[str, Any] = {"task": tid}
            task = tasks.get(tid)
            if task is not None:
                for key in ("kind", "role", "layer", "chunk", "phase", "size"):
                    val = getattr(task, key, None)
                    if val not in (None, ""):
                        args[key] = val
            start = schedule.start[tid]
            spans.append(TraceSpan(name=tid, resource=resource, start_ms=start, dur_ms=schedule.end[tid] - start, args=args))
    spans.sort(key=lambda s: (s.start_ms, s.resource, s.name))
    return spans


def _track_order(resources: Iterable[str]) -> list[str]:
    res = set(resources)
    return [r for r in RESOURCE_ORDER if r in res] + sorted(res - set(RESOURCE_ORDER))


def chrome_trace_events(
    spans_by_process: Mapping[str, list[TraceSpan]], resources: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Trace events: metadata naming each process and track, then one "X" event per span.

    ``resources`` fixes the track list (so an idle resource still gets its
    track); by default every resource a span uses.
    """
    events: list[dict[str, Any]] = []
    all_res = set(resources) if resources is not None else set()
    for spans in spans_by_process.values():
        all_res |= {s.resource for s in spans}
    tracks = _track_order(all_res)
    tid_of = {r: i + 1 for i, r in enumerate(tracks)}
    for pid, (pname, spans) in enumerate(spans_by_process.items(), start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": pname}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for r in tracks:
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid_of[r], "args": {"name": r}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid_of[r], "args": {"sort_index": tid_of[r]}})
        for s in spans:
            events.append(
                {
                    "ph": "X",
                    "name": s.name,
                    "cat": s.resource,
                    "pid": pid,
                    "tid": tid_of[s.resource],
                    "ts": s.start_ms * 1e3,
                    "dur": s.dur_ms * 1e3,
                    "args": dict(s.args),
                }
            )
    return events


def schedule_to_chrome_trace(
    schedule: Any,
    path: str | Path | None = None,
    *,
    graph: Any | None = None,
    name: str = "schedule",
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``schedule`` as Chrome trace JSON to ``path`` (if given) and return the JSON object.

    ``schedule`` is one scheduler ``Schedule`` (a process called ``name``) or a
    mapping ``{process name: Schedule}`` to compare methods side by side, one
    process each. ``graph`` (a TaskGraph, or a mapping from process name to
    TaskGraph) adds task attributes to the events. Every process gets a track
    for each resource in ``RESOURCE_ORDER`` plus any other resource used.
    ``metadata`` goes under the top-level ``"metadata"`` key (makespans,
    preset, layer shape ...).
    """
    scheds = {str(k): v for k, v in schedule.items()} if isinstance(schedule, Mapping) else {name: schedule}
    if isinstance(graph, Mapping):
        graphs = {str(k): v for k, v in graph.items()}
    else:
        graphs = {k: graph for k in scheds}
    by_proc = {k: schedule_spans(s, graphs.get(k)) for k, s in scheds.items()}
    resources = set(RESOURCE_ORDER)
    for s in scheds.values():
        resources |= set(s.order)
    trace: dict[str, Any] = {
        "traceEvents": chrome_trace_events(by_proc, resources),
        "displayTimeUnit": "ms",
        "metadata": {"makespan_ms": {k: s.makespan for k, s in scheds.items()}, **dict(metadata or {})},
    }
    if path is not None:
        Path(path).write_text(json.dumps(trace, separators=(",", ":")))
    return trace


__all__ = ["TraceSpan", "chrome_trace_events", "schedule_spans", "schedule_to_chrome_trace"]

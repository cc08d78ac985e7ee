"""``explain(model, *inputs)`` and ``report(compiled)``: what the backend found, as tables.

``explain`` compiles the model with the fsmoe backend, runs one forward and
(when the output needs gradients) one backward, and restores the parameters'
gradients afterwards. ``report`` reads the records of a model already compiled
with ``backend="fsmoe"`` and run: every graph the backend compiled for it,
those that take no parameter included.

Both show the Dynamo graph breaks that ended a graph, with the cause and the
setting or switch that removes each (``reporting.breaks``); a break that
splits an MoE layer (the graph before it has routing left alone that leaves
the graph, or the graph after it starts from routing scores it takes as an
input) is listed first, with the roles each side holds. Routing left alone
and partial regions say which roles they lack.
"""

from __future__ import annotations

import ast
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from fsmoe_compiler import records
from fsmoe_compiler.passes.region import LeftAlone, missing_roles
from fsmoe_compiler.reporting.breaks import GraphBreak
from fsmoe_compiler.reporting.tables import regions_table, roles_table, schedule_summary, tasks_table


@dataclass
class BreakReport:
    """A Dynamo graph break after Dynamo graph ``graph`` (an index into ``Explanation.records``).

    ``layer`` is the routing left alone in that graph when the break splits an
    MoE layer (a ``LeftAlone`` note: its anchor, module, the roles found and
    missing), else None.
    """

    graph: int
    info: GraphBreak
    layer: LeftAlone | None = None
    module: str = ""  # the module the layer is in, when the graph's nodes do not name it
    skipped: str = ""  # the function the break is in when Dynamo then compiled no graph of it (ran it eagerly)
    layer_graph: int = -1  # the Dynamo graph whose routing was left alone (``graph`` or the next one)

    @property
    def splits_layer(self) -> bool:
        return self.layer is not None

    def __str__(self) -> str:
        text = f"{self.info}"
        if self.skipped and self.layer is None:
            text = (f"Dynamo ran {self.skipped} outside any graph after a graph break inside it (a break inside a "
                    f"loop makes Dynamo skip the whole frame): an MoE layer in it is left out, unscheduled; "
                    f"cause: {self.info.what}, at {self.info.where}; fix: {self.info.fix}")
        if self.layer is not None:
            module = self.layer.module or self.module
            where = f" in {module}" if module else ""
            text = (f"MoE layer routed at {self.layer.anchor}{where} split by the Dynamo graph break after Dynamo "
                    f"graph {self.graph}: Dynamo graph {self.layer_graph} has its {', '.join(self.layer.present)}, "
                    f"not its {', '.join(self.layer.missing)}, so no graph holds it whole and it runs unscheduled; "
                    f"cause: {self.info.what}, at {self.info.where}; fix: {self.info.fix}")
        return text


@dataclass
class Explanation:
    """The graphs the fsmoe backend compiled for one model, with their MoE regions."""

    records: list[records.CompileRecord]

    def graph_breaks(self) -> list[BreakReport]:
        """Every Dynamo graph break that ended one of these graphs, tied to the MoE layer it splits, if any.

        A break splits a layer when the graph it ends has routing-like scores
        that formed no region and whose routing result leaves the graph (is
        one of its outputs), or when the next graph starts with such routing.
        """
        out = {i: BreakReport(i, records.break_of(rec), _split_layer(rec), layer_graph=i)
               for i, rec in enumerate(self.records) if records.break_of(rec) is not None}
        linked = {i for i, b in out.items() if b.splits_layer}
        for i, b in out.items():  # a break just before a graph whose routing lacks roles (and no break of its own)
            if not b.splits_layer and i + 1 < len(self.records) and i + 1 not in linked:
                b.layer, b.layer_graph = _split_layer(self.records[i + 1], leaving=False), i + 1
                linked.add(i + 1)
        sites = [rec.site for rec in self.records]
        for b in out.values():
            if b.layer is None:
                b.skipped = _skipped_frame(b.info, sites)
            rec = self.records[b.layer_graph]
            innermost = rec.origin.owners[0]() if rec.origin.owners else None
            if b.layer is not None and not b.layer.module and innermost is not None:
                b.module = type(innermost).__name__  # the module whose frame Dynamo compiled
        return list(out.values())

    def partial(self) -> list[str]:
        """Routing left alone and regions with a core role missing, each with the roles it lacks."""
        out = []
        for g in self.graphs():
            out.extend(str(n) for n in g.notes if isinstance(n, LeftAlone) and n.missing)
            for r in g.regions:
                lacking = _lacking(g.kind, r)
                if lacking:
                    out.append(f"{g.kind}: MoE layer {r.layer}: partial region, no {', '.join(lacking)} role")
        return out

    def graphs(self, kind: str | None = None) -> list[records.GraphReport]:
        """The latest graph of each kind per Dynamo graph (recompiles replace older ones)."""
        out = []
        for rec in self.records:
            for k in ("forward", "backward"):
                g = rec.latest(k)
                if g is not None and (kind is None or k == kind):
                    out.append(g)
        return out

    def regions(self, kind: str = "forward") -> list:
        """All MoE regions found in graphs of ``kind``."""
        return [r for g in self.graphs(kind) for r in g.regions]

    def fallbacks(self) -> list[str]:
        return [f"{g.kind}: {g.fallback}" for g in self.graphs() if g.fallback]

    def schedules(self, kind: str | None = None) -> list[records.ScheduleReport]:
        """The schedules chosen for the latest graphs of ``kind`` (graphs still profiling have none)."""
        return [g.schedule for g in self.graphs(kind) if g.schedule is not None]

    def predicted_ms(self) -> float | None:
        """Predicted time of one forward + backward of every scheduled graph (None until scheduled)."""
        scheds = self.schedules()
        return sum(s.predicted_ms for s in scheds) if scheds else None

    def measured_ms(self) -> float | None:
        """Measured median time of the same graphs (None until they ran scheduled)."""
        scheds = self.schedules()
        if not scheds or any(s.measured_ms is None for s in scheds):
            return None
        return sum(s.measured_ms for s in scheds)

    def render(self, max_names: int | None = 8, max_tasks: int | None = 40) -> str:
        if not self.records:
            return "fsmoe: no graph of this model was compiled with the fsmoe backend (run it once first)."
        parts = []
        multi = len(self.records) > 1
        breaks = {b.graph: b for b in self.graph_breaks()}
        split = [b for b in breaks.values() if b.splits_layer]
        if split:
            parts.append(f"!! {len(split)} MoE layer(s) split by Dynamo graph breaks (left out, run unscheduled):")
            parts.extend(f"!! {b}" for b in split)
            parts.append("")
        skipped = [b for b in breaks.values() if b.skipped and not b.splits_layer]
        if skipped:
            parts.append(f"!! {len(skipped)} function(s) Dynamo ran outside any graph after a graph break:")
            parts.extend(f"!! {b}" for b in skipped)
            parts.append("")
        for i, rec in enumerate(self.records):
            parts.extend(f"note: {n}" for n in rec.split_choice)
            for kind in ("forward", "backward"):
                g = rec.latest(kind)
                if g is None:
                    continue
                title = f"{kind} graph" + (f" (Dynamo graph {i}{_whose(rec)})" if multi else "")
                parts.append(f"== {title}: {g.num_nodes} nodes, {len(g.regions)} MoE region(s)")
                if g.fallback:
                    parts.append(f"fallback to the unmodified graph: {g.fallback}")
                for note in g.notes:
                    parts.append(f"note: {note}")
                for r in g.regions:  # partial regions the whole pass did not note already
                    if _lacking(kind, r) and not any("partial region" in n and f"MoE layer {r.layer} (" in n
                                                     for n in g.notes):
                        parts.append(f"note: {kind}: MoE layer {r.layer}: partial region, no "
                                     f"{', '.join(_lacking(kind, r))} role")
                if g.regions:
                    parts.append(regions_table(g.regions))
                    parts.append("")
                    parts.append(roles_table(g.regions, max_names=max_names))
                if g.schedule is not None:
                    parts.append("")
                    parts.append(schedule_summary(g.schedule))
                    for note in g.schedule.notes:
                        parts.append(f"note: {note}")
                    parts.append(tasks_table(g.schedule, limit=max_tasks))
                    if max_tasks is not None and len(g.schedule.tasks) > max_tasks:
                        parts.append(f"... {len(g.schedule.tasks) - max_tasks} more task(s); render(max_tasks=None) shows all")
                parts.append("")
            if i in breaks:
                parts.append(f"-- Dynamo graph break after Dynamo graph {i}: {breaks[i].info}")
                parts.append("")
        return "\n".join(parts).rstrip() + "\n"

    def __str__(self) -> str:
        return self.render()


def _split_layer(rec: records.CompileRecord, leaving: bool = True) -> LeftAlone | None:
    """Routing left alone in ``rec``'s forward graph, with some core role missing (and leaving the graph)."""
    g = rec.latest("forward")
    for note in g.notes if g is not None else ():
        if isinstance(note, LeftAlone) and note.missing and (note.leaves_graph or not leaving):
            return note
    return None


def _skipped_frame(info: GraphBreak, sites: list[str]) -> str:
    """The function a graph break is in when it was inlined from a caller's frame and no graph of its own (nor
    of a resume function after the break) was compiled: Dynamo skipped its frame. "" otherwise."""
    if len(info.frames) < 2:
        return ""
    file, line, func, _ = info.frames[-1]
    base = os.path.basename(file)
    first = _first_line(file, line)
    if first is None:
        return ""
    for site in sites:
        name, _, where = site.partition("@")
        if where == f"{base}:{first}" and name == func:
            return ""
        resumed = where.partition(":")[2]  # a resume function starts at its line in the function it resumes
        if (where.startswith(base + ":") and name.startswith(f"torch_dynamo_resume_in_{func}_at_")
                and resumed.isdigit() and _first_line(file, int(resumed)) == first):
            return ""
    return f"{func} ({base}:{line})"


@functools.lru_cache(maxsize=64)
def _functions(file: str) -> tuple[tuple[int, int, int], ...]:
    """(first line as in ``co_firstlineno``, def line, last line) of every function in ``file``."""
    try:
        with open(file) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return ()
    return tuple((min([n.lineno] + [d.lineno for d in n.decorator_list]), n.lineno, n.end_lineno or n.lineno)
                 for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _first_line(file: str, line: int) -> int | None:
    """``co_firstlineno`` of the innermost function of ``file`` that holds ``line`` (None if unknown)."""
    holding = [f for f in _functions(file) if f[1] <= line <= f[2]]
    return max(holding, key=lambda f: f[1])[0] if holding else None


def _whose(rec: records.CompileRecord) -> str:
    what = f", {len(rec.param_refs)} parameter(s)" if rec.param_refs else ", takes no parameter"
    return (f", compile id {rec.compile_id}" if rec.compile_id != "?" else "") + what


def _lacking(kind: str, region: Any) -> list[str]:
    """The core roles ``region`` lacks; a backward region without a dispatch role lacks nothing (no gradient
    flows to the layer's input in that graph, so there is nothing to un-permute)."""
    lacking = missing_roles(region)
    return [] if kind == "backward" and lacking == ["dispatch"] else lacking


def explain(
    model: torch.nn.Module, *inputs: Any, options: Any = None, backward: bool = True, quiet: bool = False
) -> Explanation:
    """Compile ``model`` with the fsmoe backend, run it on ``inputs``, print and return what was found.

    ``backward=False`` skips the backward graph; ``quiet=True`` only returns.
    """
    from fsmoe_compiler.backend import fsmoe_backend

    before = len(records._RECORDS)
    compiled = torch.compile(model, backend=fsmoe_backend, options=options)
    saved = {p: p.grad for p in model.parameters()}
    try:
        out = compiled(*inputs)
        leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if backward and leaves:
            torch.autograd.backward([t.float().sum() for t in leaves])
    finally:
        for p, g in saved.items():
            p.grad = g
    result = Explanation(records._RECORDS[before:])
    if not quiet:
        print(result.render(), end="")
    return result


def export_trace(compiled: torch.nn.Module, path: str) -> dict:
    """Write a Chrome/Perfetto trace of each scheduled graph: the predicted timeline and, when timed, the measured one.

    One process per graph and timeline ("forward predicted", "forward measured",
    ...), one track per resource. Returns the trace object.
    """
    from fsmoe_compiler.reporting.trace import TraceSpan, chrome_trace_events

    import json

    processes: dict[str, list] = {}
    meta: dict[str, Any] = {}
    rep = report(compiled)
    for i, g in enumerate(rep.graphs()):
        s = g.schedule
        if s is None:
            continue
        name = f"{g.kind}" + (f" {i // 2}" if len(rep.records) > 1 else "")
        processes[f"{name} predicted"] = [
            TraceSpan(t.task, t.resource, t.start_ms, t.end_ms - t.start_ms,
                      {"layer": t.layer, "chunk": t.chunk, "role": t.role}) for t in s.tasks]
        measured = [TraceSpan(t.task, t.resource, t.measured_start_ms, t.measured_end_ms - t.measured_start_ms,
                              {"layer": t.layer, "chunk": t.chunk, "role": t.role})
                    for t in s.tasks if t.measured_start_ms is not None and t.measured_end_ms is not None]
        if measured:
            processes[f"{name} measured"] = measured
        meta[name] = {"scheduler": s.scheduler, "degrees": {str(k): v for k, v in s.degrees.items()},
                      "predicted_ms": s.predicted_ms, "measured_ms": s.measured_ms}
    if not processes:
        raise ValueError("export_trace: no scheduled graph yet; run the compiled model past its profiling steps "
                         "(profile_steps calls, plus one warm-up) first")
    trace = {"traceEvents": chrome_trace_events(processes), "displayTimeUnit": "ms", "metadata": meta}
    with open(path, "w") as f:
        json.dump(trace, f, separators=(",", ":"))
    return trace


def report(compiled: torch.nn.Module) -> Explanation:
    """What the fsmoe backend found in a model compiled with ``backend="fsmoe"`` (after it ran)."""
    if not isinstance(compiled, torch.nn.Module):
        raise TypeError(f"report() takes the compiled nn.Module, got {type(compiled).__name__}")
    return Explanation(records.records_for(compiled))

"""``ScheduledGraph``: what aot_autograd calls for one graph: warm up, profile, then run the planned graph.

A small state machine over the calls of one compiled graph; the planning
itself is ``fsmoe_compiler.planner``'s.

* **warm-up** (the first call): the recognised graph runs as traced.
* **profiling** (the next ``profile_steps`` calls): each call runs one chunked
  variant (degree 1, 2, 4, ... in turn) under the profiler; they compute the
  same results, so they are ordinary training steps.
* **planned** (every later call): costs are measured and agreed, a plan is
  made and its graph swapped in: no recompile of the model. A profile-cache
  hit on every rank goes straight here.

Any failure while planning falls back, on every rank together, to the graph
as traced and says why in the report (``strict=True`` raises).

**Ranks.** A graph with collectives runs anything but its traced self (a
chunked variant, the planned graph) only on calls where every rank said it
will do the same. Calls are paired by agreement key (a digest of the graph's
kind, collectives and MoE regions; ``backend.agreement_key``): the n-th call
of a graph with key K on one rank is the n-th on the others, which holds
wherever Dynamo cut the program, since the collectives pair up that way
themselves. Each call starts with a vote (``runtime.control.vote``, instance
n of the key's series) on (key, planning epoch, step, mode). What a call runs
lives in a :class:`Slot`, one per program point (the Dynamo frame the graph
came from) and key, shared by every graph Dynamo compiles there with that
key:

* all ballots equal: every rank runs that mode and the slot steps on;
* some rank's slot now holds another graph of the same key (a recompile on
  that rank): every rank runs as traced and planning starts again from the
  graphs each rank has now (at most ``MAX_EPOCHS`` times);
* some rank stopped planning this slot (its planning failed): all do;
* the vote was abandoned (some rank is not coming: it runs a graph with
  another key here, eager code, or nothing) or the ranks are at different
  steps: this call runs as traced; after ``ABANDON_LIMIT`` such calls in a
  row, this rank stops asking and runs every graph of that key as traced from
  then on, and says so (``runtime.control.leave``), so the others stop
  waiting for it there at once.

Running as traced is always safe: it issues the collectives in program order,
as every other rank's traced graph or eager code does. Alone (one rank, or
``check_ranks=False``) the vote is this rank's own ballot.
"""

from __future__ import annotations

import hashlib
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from fsmoe_compiler import inductor_codegen, records
from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.gc_pause import gc_paused
from fsmoe_compiler.ops import is_collective
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.planner import (Pipelines, Plan, PlanError, Variants, cached_costs, calibration_key, distributed,
                                    make_plan, measure_costs, store_costs)
from fsmoe_compiler.profiler import CostModel, ProfileCache, StepProfiler
from fsmoe_compiler.runtime import control
from fsmoe_compiler.runtime.executor import GraphExecutor

#: Keep at most this many wall times of scheduled calls for the report's median.
_KEEP_CALLS = 64
#: Planning epochs of one program point (a first plan and restarts after recompiles) before it stays as traced.
MAX_EPOCHS = 3
#: Calls in a row some rank did not join before this rank stops asking for that program point.
ABANDON_LIMIT = 3
#: Calls of a compiled (Inductor) scheduled graph whose median, over the plain graph's timed call, calibrates it.
CALIBRATION_CALLS = 3


@dataclass
class Slot:
    """The agreed state of one program point and agreement key on this rank (see the module docstring).

    ``start`` is the call (of the key's series) at which the current planning
    epoch began, agreed by every rank: it names the epoch's planning
    agreements. ``step`` counts the agreed calls since (0: warm-up next, then
    the profiling steps, then planned calls); ``current`` is the graph whose
    planning state the steps belong to; ``demoted`` is why every rank runs this
    slot as traced from now on; ``alone`` why this rank stopped asking the
    others (it runs as traced without a vote).
    """

    site: str
    key: str
    start: int | None = None
    step: int = 0
    epochs: int = 0
    current: "ScheduledGraph | None" = None
    demoted: str | None = None
    alone: str | None = None
    streak: int = 0
    missed: int = 0

    def intended(self, graph: "ScheduledGraph") -> tuple:
        """What this rank proposes to run at the next call of ``graph``."""
        if self.demoted is not None:
            return ("demoted", self.demoted)
        if graph.traced_only is not None:
            return ("demoted", f"the passes failed on this graph ({graph.traced_only})")
        if self.current is None:
            self.current = graph
        if self.current is not graph:
            return ("restart",)
        if graph.runner is not None:
            return ("planned",)
        if self.step == 0:
            return ("warmup",)
        return ("profile", self.step)

    def ballot(self, graph: "ScheduledGraph") -> tuple:
        return (self.key, self.start, self.step, self.intended(graph))

    def settle(self, graph: "ScheduledGraph", verdict: control.Verdict, ballot: tuple, n: int) -> tuple:
        """The mode call ``n`` runs, from the verdict; steps the slot on as every rank that voted does."""
        if not verdict.agreed:
            return self._missed(graph, verdict.reason, n)
        ballots = verdict.ballots or [ballot]
        modes = [b[3] for b in ballots]
        demoted = [m[1] for m in modes if m[0] == "demoted"]
        if demoted:
            self.streak = 0
            if self.demoted is None:
                self.demoted = demoted[0]
                graph.note("demoted", f"runs as traced on every rank: {demoted[0]}")
            return ("traced",)
        restarted = [r for r, m in enumerate(modes) if m[0] == "restart"]
        if restarted:
            self.streak = 0
            self.epochs += 1
            self.start, self.step, self.current = n, 1, graph  # this call, as traced, is the new epoch's warm-up
            graph.restart(f"plan/{self.key}/{n}")
            graph.note(f"restart{self.epochs}", f"rank(s) {restarted} compiled this graph again (a recompile): "
                       f"planning restarted at call {n} from the graphs every rank has now")
            if self.epochs >= MAX_EPOCHS:
                self.demoted = f"recompiled {self.epochs} times on some rank; planning given up"
                graph.note("demoted", f"runs as traced on every rank: {self.demoted}")
            return ("traced",)
        if any(b != ballot for b in ballots):
            return self._missed(graph, f"the ranks are at different steps of this graph's planning ({ballots})", n)
        self.streak = 0
        if self.step == 0:  # the warm-up every rank agreed to: the epoch starts here
            self.start = n
            graph.restart(f"plan/{self.key}/{n}")
        self.step += 1
        return ballot[3]

    def _missed(self, graph: "ScheduledGraph", why: str, n: int) -> tuple:
        """A call not every rank agreed to run alike: as traced; after ``ABANDON_LIMIT`` in a row, alone on
        the key's series from the next call on (every slot of this key on this rank, since calls pair by key),
        and the other ranks are told so."""
        self.streak += 1
        self.missed += 1
        graph.note("missed", f"{self.missed} call(s) ran as traced without every rank (last: {why})")
        if self.streak >= ABANDON_LIMIT:
            self.alone = (f"{self.streak} calls in a row without every rank; this rank runs the graph as traced "
                          f"from now on (last: {why})")
            graph.note("alone", self.alone)
            _left()[graph.series] = self.alone
            control.leave(graph.series, n + 1, self.alone)
        return ("alone",)


@dataclass
class LastCall:
    """This rank's wall time of call ``n`` of a series, a scheduled call, until the next call's vote shares it.

    Every rank's time of the same call is known there; the least is the time of the rank that entered the call
    last, which waited for nobody at its first collective: the graph's own time, the one its prediction is for
    (``ScheduleReport.aligned_calls_ms``). The code between calls sets how long the others waited.
    """

    n: int
    ms: float
    sched: records.ScheduleReport


def _last_calls() -> dict[str, LastCall]:
    return control.local("fsmoe.last_calls", dict)


def _slots() -> dict[tuple[str, str], Slot]:
    return control.local("fsmoe.slots", dict)


def _calls() -> dict[str, int]:
    return control.local("fsmoe.series_calls", dict)


def _left() -> dict[str, str]:
    """The series this rank no longer votes on (it runs their calls as traced), and why."""
    return control.local("fsmoe.left_series", dict)


class ScheduledGraph:
    """A boxed callable for aot_autograd that profiles, plans, then runs the planned graph."""

    _boxed_call = True

    def __init__(self, base: fx.GraphModule, ctx: PassContext, config: FSMoEConfig, report: records.GraphReport,
                 pipelines: Pipelines, dump: Callable[[str, fx.GraphModule], None] | None = None,
                 site: str = "", key: str | None = None, traced_only: str | None = None,
                 trace: "inductor_codegen.TraceState | None" = None) -> None:
        self.base, self.ctx, self.config, self.report, self.pipelines = base, ctx, config, report, pipelines
        self.dump = dump  # writes the scheduled graph where ``dump_dir`` asks
        self._notes: dict[str, str] = {}
        self.kind = ctx.graph_kind
        self.site = site or "graph"
        self.key = key or hashlib.sha1(f"{self.site}/{self.kind}".encode()).hexdigest()[:16]
        self.series = f"call/{self.key}"  # the calls of every graph with this key, numbered on each rank
        self.what = f"the {self.kind} graph at {self.site}"
        self.voting = distributed() and config.check_ranks
        self.cache = ProfileCache(config.cache_dir) if config.cache_dir else None
        self.static: GraphExecutor | None = None
        self.traced_only = traced_only  # why this graph never runs anything but its traced self
        self.trace = trace  # under codegen="inductor": what Inductor needs to compile the graph that runs
        self.restart(None)
        reason = self._nothing_to_schedule()
        if reason is not None:
            self.report.notes.append(f"not scheduled: {reason}")
            self.report.unscheduled = reason
            self.static = GraphExecutor(base, compiled=self._inductor(base, "this graph"))

    def restart(self, tag: str | None) -> None:
        """Planning from scratch: no variants, profiles or plan yet; ``tag`` names the planning agreements
        with the other ranks (the key and the call the epoch started at, so equal on every rank)."""
        self.tag = tag or f"plan/{self.key}/local"
        self.variants = Variants(self.base, self.ctx, self.config, self.pipelines.chunk, self.tag,
                                 notes=self.report.notes)
        self.profiles: dict[int, StepProfiler] = {}
        self.runner: GraphExecutor | None = None
        self.timed_left = self.config.measure_steps
        self.cache_checked = False
        self.plain_ms: list[float] = []  # the scheduled graph's timed calls (its plain code), for the calibration
        self.calibration_key: str | None = None

    def note(self, topic: str, text: str) -> None:
        """Put ``text`` in the report, replacing this graph's earlier note on ``topic``."""
        notes = self.report.notes
        old = self._notes.get(topic)
        if old is not None and old in notes:
            notes[notes.index(old)] = text
        elif text not in notes:
            notes.append(text)
        self._notes[topic] = text

    @property
    def slot(self) -> Slot:
        slots = _slots()
        ident = (self.site, self.key)
        if ident not in slots:
            slots[ident] = Slot(self.site, self.key)
        return slots[ident]

    # -- the call ---------------------------------------------------------
    def __call__(self, args: list[Any]) -> Any:
        if self.static is not None:
            return self.static(list(args))
        slot = self.slot
        calls = _calls()
        n = calls.get(self.series, 0)
        calls[self.series] = n + 1
        if slot.alone is not None or self.series in _left():
            with control.doing("call-alone", "", self.what):
                return self.base(*args)
        ballot = slot.ballot(self)
        if self.voting:
            verdict = self._vote(n, ballot)
        else:
            verdict = control.Verdict(True, [ballot])
        mode = slot.settle(self, verdict, ballot, n)
        if mode[0] == "alone":
            with control.doing("call-alone", "", self.what):
                return self.base(*args)
        with control.doing("call", f"{self.series}/{n}", f"call {n} of {self.what}"):
            return self._run(mode, list(args))

    def _vote(self, n: int, ballot: tuple) -> control.Verdict:
        """The vote on call ``n``; it also carries each rank's wall time of call ``n - 1`` where that was a
        scheduled call, and the least of them (the rank that entered last, :class:`LastCall`) is recorded."""
        last = _last_calls().pop(self.series, None)
        mine = last.ms if last is not None and last.n == n - 1 else None
        verdict = control.vote(self.series, n, (ballot, mine), what=f"call {n} of {self.what}")
        if not verdict.agreed or verdict.ballots is None:
            return verdict
        times = [t for _, t in verdict.ballots]
        if mine is not None and all(t is not None for t in times):
            last.sched.aligned_calls_ms.append(min(times))
            del last.sched.aligned_calls_ms[:-_KEEP_CALLS]
        return control.Verdict(True, [b for b, _ in verdict.ballots])

    def _run(self, mode: tuple, args: list[Any]) -> Any:
        if mode[0] == "planned":
            return self._run_planned(args)
        if mode[0] == "warmup":  # allocations, first-use costs of the collectives; or a cache hit on every rank
            if self.cache is not None and not self.cache_checked:
                self.cache_checked = True
                costs = self._agreed(lambda: cached_costs(self.variants, self.cache), "cache")
                if costs is not None and self._plan(costs, cache_hit=True, profile_calls=0):
                    return self._run_planned(args)
            return self.base(*args)
        if mode[0] == "profile":
            return self._profile(mode[1], args)
        return self.base(*args)  # traced

    def _profile(self, step: int, args: list[Any]) -> Any:
        if not self.variants.built:
            self.variants.build()
        degree = self.variants.degrees[(step - 1) % len(self.variants.degrees)]
        profile = self.profiles.setdefault(degree, StepProfiler(self.variants.get(degree)[0]))
        out = profile(list(args))
        if step >= self.config.profile_steps:
            costs = self._agreed(lambda: measure_costs(self.profiles, self.variants.degrees, self.tag), "costs")
            if costs is None:
                return out
            if self.cache is not None:
                store_costs(self.variants, self.cache, costs)
            self._plan(costs, cache_hit=False, profile_calls=step + 1)  # with the warm-up
        return out

    def _agreed(self, fn: Callable[[], Any], phase: str) -> Any:
        """``fn()``, or None on every rank if it raised on any (then the slot runs as traced; strict raises)."""
        error, value = None, None
        try:
            value = fn()
        except control.ExchangeTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 - agreed below, so every rank takes the same path
            error = f"{type(exc).__name__}: {exc}"
        try:
            posted = control.meet(f"{self.tag}/{phase}-ok", error, what=f"{phase} of {self.what}")
        except control.ExchangeTimeout as exc:
            if error is None:
                raise
            # a peer that died mid-collective often fails this rank's own call too: keep both reasons
            raise type(exc)(f"{exc}\n(this rank's {phase} had failed first: {error})") from exc
        errors = {r: e for r, e in enumerate(posted) if e}
        if not errors:
            return value
        why = "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
        self._fall_back(PlanError(f"{phase} failed: {why}"))
        return None

    def _run_planned(self, args: list[Any]) -> Any:
        assert self.runner is not None
        sched = self.report.schedule
        if self.timed_left > 0 and sched is not None:
            self.timed_left -= 1
            out = self.runner.run(list(args), timed=True)
            timing = self.runner.last_timing
            for row in sched.tasks:
                if row.task in timing:
                    row.measured_start_ms, row.measured_end_ms = timing[row.task]
            if self.runner.last_total_ms is not None:
                self.plain_ms.append(self.runner.last_total_ms)
            return out
        t0 = time.perf_counter()
        out = self.runner(list(args))
        if sched is not None:
            ms = (time.perf_counter() - t0) * 1e3
            sched.measured_calls_ms.append(ms)
            del sched.measured_calls_ms[:-_KEEP_CALLS]
            if self.voting:
                _last_calls()[self.series] = LastCall(_calls()[self.series] - 1, ms, sched)
            if len(sched.measured_calls_ms) == CALIBRATION_CALLS:
                self._calibrate(sched)
        return out

    def _calibrate(self, sched: records.ScheduleReport) -> None:
        """Learn how the compiled code's time compares with the plain graph's, once: the median of the first
        scheduled calls over the timed (plain) call's, stored in the profile cache for later plans of this graph."""
        if sched.codegen == "eager" or sched.calibration_from == "cache" or not self.plain_ms:
            return
        sched.calibration = sched.own_ms / max(statistics.median(self.plain_ms), 1e-9)  # both this rank's wall
        sched.calibration_from = "this run"
        if self.cache is not None and self.calibration_key is not None:
            self.cache.store_factor(self.calibration_key, sched.calibration)

    # -- transitions ------------------------------------------------------
    def _nothing_to_schedule(self) -> str | None:
        if self.config.scheduler == "none":
            return "scheduler='none'"
        if not any(is_collective(n) for n in self.base.graph.nodes):
            return "no collective in this graph, nothing to overlap"
        return None

    def _fall_back(self, exc: Exception) -> None:
        """Every rank alike: the slot runs as traced from now on (``strict=True`` raises)."""
        if self.config.strict:
            raise PlanError(f"fsmoe could not schedule the {self.kind} graph: {exc}") from exc
        warnings.warn(f"fsmoe: {self.kind} graph runs as traced, scheduling failed ({exc})", stacklevel=3)
        self.report.fallback = f"scheduling failed, graph runs as traced: {exc}"
        self.slot.demoted = f"scheduling failed: {exc}"
        self.runner = None

    @gc_paused()
    def _plan(self, costs: dict[int, CostModel], cache_hit: bool, profile_calls: int) -> bool:
        """Plan on ``costs`` and swap the plan's graph in, or (every rank alike) fall back to the graph as traced."""
        try:
            plan = make_plan(self.variants, costs, self.pipelines)
        except PlanError as exc:
            self._fall_back(exc)
            return False
        else:
            self._swap_in(plan, cache_hit, profile_calls)
            return True
        finally:
            self.variants.clear()  # the chosen graph lives in the runner; drop the other variants

    def _inductor(self, gm: fx.GraphModule, what: str) -> Callable[[list], Any] | None:
        """``gm`` compiled by Inductor under ``codegen="inductor"`` (None otherwise, or with a note when Inductor
        cannot: the graph runs as Python code; ``strict=True`` raises). Only this rank's code changes, never
        which collectives it issues or in what order, so the ranks need not agree on it."""
        if self.trace is None:
            return None
        try:
            with control.doing("inductor", "", f"Inductor compiling {what} ({self.what})"):
                built = inductor_codegen.compile_graph(gm, self.trace, pin=True)
        except Exception as exc:  # noqa: BLE001 - the graph still runs, as its ATen calls
            if self.config.strict:
                raise PlanError(f"fsmoe: Inductor could not compile {what} ({self.what}): {exc}") from exc
            self.note("codegen", f"codegen: {what} runs as Python code; Inductor could not compile it "
                      f"({type(exc).__name__}: {str(exc)[:300]})")
            return None
        self.report.codegen, self.report.codegen_s = "inductor", self.report.codegen_s + built.compile_s
        self.note("codegen", f"codegen: {what} compiled by Inductor in {built.compile_s:.1f} s"
                  + (f", order pinned with {built.pins} control dependencies and checked in its code"
                     if built.pins else ""))
        return built.fn

    def _swap_in(self, plan: Plan, cache_hit: bool, profile_calls: int) -> None:
        compiled = self._inductor(plan.gm, "the scheduled graph")
        self.runner = GraphExecutor(plan.gm, plan.ctx.taskmap.task_of, compiled=compiled)
        if self.dump is not None:
            self.dump("scheduled", plan.gm)
        report = records.schedule_report(self.config.scheduler, plan, profile_calls=profile_calls,
                                         cache_hit=cache_hit)
        report.notes[:0] = [n for n in self.variants.chunk_notes if n not in report.notes]
        report.codegen = "inductor" if compiled is not None else "eager"
        if compiled is not None and self.cache is not None:  # a factor learned by an earlier run of this graph
            self.calibration_key = calibration_key(self.variants, report.codegen)
            factor = self.cache.load_factor(self.calibration_key)
            if factor is not None:
                report.calibration, report.calibration_from = factor, "cache"
        self.report.schedule = report
        self.report.num_nodes = len(plan.gm.graph.nodes)

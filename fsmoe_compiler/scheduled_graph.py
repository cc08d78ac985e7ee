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
will do the same. The state that decides what a call runs lives in a
:class:`Slot`, one per program point (the Dynamo frame the graph came from,
its kind) and agreement key (a digest of that program point, the graph's
collectives and its MoE regions; see ``backend.agreement_key``), shared by
every graph Dynamo compiles there with that key. Each call of a program
point is numbered on each rank (its n-th call pairs with the other ranks'
n-th call: they run the same program) and starts with a vote
(``runtime.control.vote``) on (key, planning epoch, step, mode):

* all ballots equal: every rank runs that mode and the slot steps on;
* keys differ (Dynamo compiled a graph with other collectives or regions here
  on some rank: a graph break, a recompile): every rank runs as traced;
* some rank's slot now holds another graph of the same key (a recompile on
  that rank): every rank runs as traced and the slot starts a new epoch,
  profiling again from the graphs each rank has now (at most ``MAX_EPOCHS``);
* some rank stopped planning this slot (its planning failed): all do;
* the vote was abandoned (some rank is not coming: it runs something else):
  this call runs as traced; after ``ABANDON_LIMIT`` such calls in a row, this
  rank stops asking and runs the graph as traced from then on.

Running as traced is always safe: it issues the collectives in program order,
as every other rank's traced graph or eager code does. Alone (one rank, or
``check_ranks=False``) the vote is this rank's own ballot.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from fsmoe_compiler import records
from fsmoe_compiler.config import FSMoEConfig
from fsmoe_compiler.gc_pause import gc_paused
from fsmoe_compiler.ops import is_collective
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.planner import (Pipelines, Plan, PlanError, Variants, cached_costs, distributed, make_plan,
                                    measure_costs, store_costs)
from fsmoe_compiler.profiler import CostModel, ProfileCache, StepProfiler
from fsmoe_compiler.runtime import control
from fsmoe_compiler.runtime.executor import GraphExecutor

#: Keep at most this many wall times of scheduled calls for the report's median.
_KEEP_CALLS = 64
#: Planning epochs of one program point (a first plan and restarts after recompiles) before it stays as traced.
MAX_EPOCHS = 3
#: Calls in a row some rank did not join before this rank stops asking for that program point.
ABANDON_LIMIT = 3


@dataclass
class Slot:
    """The agreed state of one program point and agreement key on this rank (see the module docstring).

    ``step`` counts the agreed calls of this ``epoch`` (0: warm-up next, then
    the profiling steps, then planned calls); ``current`` is the graph whose
    planning state the slot's steps belong to; ``demoted`` is why every rank
    runs this slot as traced from now on; ``alone`` why this rank stopped
    asking the others (it runs as traced without a vote).
    """

    site: str
    kind: str
    key: str
    epoch: int = 0
    step: int = 0
    current: "ScheduledGraph | None" = None
    demoted: str | None = None
    alone: str | None = None
    streak: int = 0
    notes: list[str] = field(default_factory=list)

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

    def settle(self, graph: "ScheduledGraph", verdict: control.Verdict, ballot: tuple) -> tuple:
        """The mode this call runs, from the verdict; steps the slot on as every rank does."""
        if not verdict.agreed:
            self.streak += 1
            graph.note(f"a call ran as traced: {verdict.reason}")
            if self.streak >= ABANDON_LIMIT:
                self.alone = (f"{self.streak} calls in a row without every rank ({verdict.reason}); "
                              "this rank runs the graph as traced from now on")
                graph.note(self.alone)
            return ("alone",)
        self.streak = 0
        ballots = verdict.ballots or [ballot]
        other = [r for r, b in enumerate(ballots) if b[0] != self.key]
        if other:
            graph.note(f"rank(s) {other} compiled a different graph here (other collectives or MoE regions: "
                       "a graph break or a recompile): those calls run as traced on every rank")
            return ("traced",)
        modes = [b[3] for b in ballots]
        demoted = [m[1] for m in modes if m[0] == "demoted"]
        if demoted:
            if self.demoted is None:
                self.demoted = demoted[0]
                graph.note(f"runs as traced on every rank: {demoted[0]}")
            return ("traced",)
        restarted = [r for r, m in enumerate(modes) if m[0] == "restart"]
        if restarted:
            self.epoch += 1
            self.step = 1  # this call, as traced, is the new epoch's warm-up
            self.current = graph
            graph.restart(self.epoch)
            graph.note(f"rank(s) {restarted} compiled this graph again (a recompile): planning restarts "
                       f"(epoch {self.epoch}) from the graphs every rank has now")
            if self.epoch >= MAX_EPOCHS:
                self.demoted = f"recompiled {self.epoch} times on some rank; planning given up"
                graph.note(f"runs as traced on every rank: {self.demoted}")
            return ("traced",)
        if any(b != ballot for b in ballots):
            self.demoted = f"the ranks' planning states differ ({ballots})"
            graph.note(f"runs as traced on every rank: {self.demoted}")
            return ("traced",)
        self.step += 1
        return ballot[3]


def _slots() -> dict[tuple[str, str, str], Slot]:
    return control.local("fsmoe.slots", dict)


def _calls() -> dict[tuple[str, str], int]:
    return control.local("fsmoe.site_calls", dict)


class ScheduledGraph:
    """A boxed callable for aot_autograd that profiles, plans, then runs the planned graph."""

    _boxed_call = True

    def __init__(self, base: fx.GraphModule, ctx: PassContext, config: FSMoEConfig, report: records.GraphReport,
                 pipelines: Pipelines, dump: Callable[[str, fx.GraphModule], None] | None = None,
                 site: str = "", key: str | None = None, traced_only: str | None = None) -> None:
        self.base, self.ctx, self.config, self.report, self.pipelines = base, ctx, config, report, pipelines
        self.dump = dump  # writes the scheduled graph where ``dump_dir`` asks
        self.kind = ctx.graph_kind
        self.site = site or "graph"
        self.key = key or hashlib.sha1(f"{self.site}/{self.kind}".encode()).hexdigest()[:16]
        self.series = f"call/{hashlib.sha1(self.site.encode()).hexdigest()[:12]}/{self.kind}"
        self.what = f"the {self.kind} graph at {self.site}"
        self.voting = distributed() and config.check_ranks
        self.cache = ProfileCache(config.cache_dir) if config.cache_dir else None
        self.static: GraphExecutor | None = None
        self.traced_only = traced_only  # why this graph never runs anything but its traced self
        self.restart(0)
        reason = self._nothing_to_schedule()
        if reason is not None:
            self.report.notes.append(f"not scheduled: {reason}")
            self.static = GraphExecutor(base)

    def restart(self, epoch: int) -> None:
        """Planning from scratch (epoch ``epoch``): no variants, profiles or plan yet."""
        self.epoch = epoch
        self.tag = f"plan/{self.key}/e{epoch}"  # names this graph's planning agreements with the other ranks
        self.variants = Variants(self.base, self.ctx, self.config, self.pipelines.chunk, self.tag,
                                 notes=self.report.notes)
        self.profiles: dict[int, StepProfiler] = {}
        self.runner: GraphExecutor | None = None
        self.timed_left = self.config.measure_steps
        self.cache_checked = False

    def note(self, text: str) -> None:
        """Add ``text`` to the report once."""
        if text not in self.report.notes:
            self.report.notes.append(text)

    @property
    def slot(self) -> Slot:
        slots = _slots()
        ident = (self.site, self.kind, self.key)
        if ident not in slots:
            slots[ident] = Slot(self.site, self.kind, self.key)
        return slots[ident]

    # -- the call ---------------------------------------------------------
    def __call__(self, args: list[Any]) -> Any:
        if self.static is not None:
            return self.static(list(args))
        slot = self.slot
        calls = _calls()
        n = calls.get((self.site, self.kind), 0)
        calls[(self.site, self.kind)] = n + 1
        if slot.alone is not None:
            with control.doing("call-alone", "", self.what):
                return self.base(*args)
        ballot = (self.key, slot.epoch, slot.step, slot.intended(self))
        if self.voting:
            verdict = control.vote(self.series, n, ballot, what=f"call {n} of {self.what}")
        else:
            verdict = control.Verdict(True, [ballot])
        mode = slot.settle(self, verdict, ballot)
        if mode[0] == "alone":
            with control.doing("call-alone", "", self.what):
                return self.base(*args)
        with control.doing("call", f"{self.series}/{n}", f"call {n} of {self.what}"):
            return self._run(mode, list(args))

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
        errors = {r: e for r, e in enumerate(control.meet(f"{self.tag}/{phase}-ok", error,
                                                          what=f"{phase} of {self.what}")) if e}
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
            return out
        t0 = time.perf_counter()
        out = self.runner(list(args))
        if sched is not None:
            sched.measured_calls_ms.append((time.perf_counter() - t0) * 1e3)
            del sched.measured_calls_ms[:-_KEEP_CALLS]
        return out

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

    def _swap_in(self, plan: Plan, cache_hit: bool, profile_calls: int) -> None:
        self.runner = GraphExecutor(plan.gm, plan.ctx.taskmap.task_of)
        if self.dump is not None:
            self.dump("scheduled", plan.gm)
        report = records.schedule_report(self.config.scheduler, plan, profile_calls=profile_calls,
                                         cache_hit=cache_hit)
        report.notes[:0] = [n for n in self.variants.chunk_notes if n not in report.notes]
        self.report.schedule = report
        self.report.num_nodes = len(plan.gm.graph.nodes)

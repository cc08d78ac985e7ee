"""Run a Dynamo graph whole or split into token ranges, whichever the measurements say is faster.

Splitting a layer's tokens before routing (``passes.split_tokens``) pays off
when its all-to-alls take real time on the link, and costs per-op overhead
when they do not (on loopback eight ranges ran 0.78x eager). Whether the link
is slow is only known by running, so with ``split_tokens="auto"`` the backend
compiles the graph as Dynamo traced it and split, each with its own forward
and backward ``ScheduledGraph`` (a split graph for each range count to try),
and keeps Dynamo's graph itself too, run by PyTorch as eager would ("as
traced": where nothing can overlap, compiling only adds per-call costs).
:class:`SplitOrWhole` runs them in turn, ``BLOCK`` calls each, until each has
``MEASURED_CALLS`` timed calls (a compiled one's count once its schedules are
in), then keeps the one whose forward + backward took least (the slowest
rank's mean of the faster half of its calls), for good, and lets the others
go. Every variant is timed alike from outside (``call_timer.CallTimer``:
wrappers, votes and PyTorch's autograd included), so the graph as traced is
not billed for costs the compiled ones hide. Round-robin turns make a machine
whose speed drifts during warm-up slow each alike; the first call after a
switch pays for the other variant's buffers and caches, which the steady
state never does, and two calls in a row and the faster-half mean leave such
calls out. A variant must beat the ones before it (as traced, whole, then
fewer ranges) by more than ``MARGIN`` to be kept: on a fast link they differ
by less than the machine's noise, and the ones before have fewer ops.

Which variant runs a call must be the same on every rank (their collectives
differ), so until the choice is made every call starts with a vote
(``runtime.control.vote``) whose ballots carry what each rank wants to run and
what it has measured; an abandoned or split vote runs the whole compiled graph
(its collectives are the traced graph's, so any rank may run either), and the
choice is made from the ballots of one vote, so every rank makes it at the
same call.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from fsmoe_compiler import records
from fsmoe_compiler.call_timer import CallTimer
from fsmoe_compiler.runtime import control

WHOLE = "whole"
AS_TRACED = "as traced"
#: Timed calls (``CallTimer.calls_ms``; a compiled variant's once it is planned) a variant needs before it is compared.
MEASURED_CALLS = 4
#: Calls a variant runs in a row per turn while the variants are measured.
BLOCK = 2
#: The kept variant is the first (as traced, whole, then fewer ranges) whose time is within this share of the fastest.
MARGIN = 0.03


_LIVE: "weakref.WeakSet[SplitOrWhole]" = weakref.WeakSet()


def unsettled() -> int:
    """How many whole-or-split graphs of this process still measure (a benchmark warms up until none does;
    the choice is made at the same call on every rank, so the count is the same on every rank)."""
    return sum(1 for c in list(_LIVE) if c.chosen is None)


def _calls() -> dict[str, int]:
    return control.local("fsmoe.split_choice_calls", dict)


def fast_half_ms(calls: list[float]) -> float:
    """Mean of the faster half of ``calls`` (at least one): what a graph costs once the calls slowed by a
    switch between variants or by the other rank's noise are left out."""
    fast = sorted(calls)[: max(1, len(calls) // 2)]
    return sum(fast) / len(fast)


def planned(record: records.CompileRecord) -> bool:
    """Whether ``record``'s forward and backward graphs run what they will keep running (their schedules
    are in, or they run as traced for good), so their calls can be timed."""
    for kind in ("forward", "backward"):
        g = record.latest(kind)
        if g is None:
            return False
        if g.schedule is None and g.fallback is None and g.unscheduled is None:
            return False
    return True


@dataclass(eq=False)
class Variant:
    """One way to run a Dynamo graph: ``name`` ("as traced", "whole", or "N ranges"), the callable (aot_autograd's,
    or Dynamo's graph itself for "as traced"), and the compile record the report shows for it (the whole graph's
    for "as traced"). Its calls are timed alike (``CallTimer``): a compiled one's once its graphs are planned."""

    name: str
    fn: Callable[..., Any]
    record: records.CompileRecord

    def __post_init__(self) -> None:
        self.run = CallTimer(self.fn, ready=lambda: self.name == AS_TRACED or planned(self.record))

    def measured_ms(self) -> float | None:
        """Forward + backward ms on this rank (``fast_half_ms`` of the last ``MEASURED_CALLS`` timed calls), None
        while it has fewer; ``inf`` for a compiled graph that fell back (it would run as traced: never preferred)."""
        if self.name != AS_TRACED and any(g.fallback is not None for g in self.record.graphs):
            return float("inf")
        calls = self.run.calls_ms
        return fast_half_ms(calls[-MEASURED_CALLS:]) if len(calls) >= MEASURED_CALLS else None


@dataclass(eq=False)
class SplitOrWhole:
    """A compiled Dynamo graph that runs one of ``variants`` per call (in order of preference: as traced, if
    given, the whole graph, then the token splits) until it has measured each, then settles on the fastest. The
    losers' records are dropped from the report registry; the winner's notes say why it won."""

    variants: list[Variant]
    key: str
    chosen: str | None = None
    voting: bool = True
    runs: dict[str, int] = field(default_factory=dict)
    _run: Callable[..., Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if WHOLE not in names or names[: names.index(WHOLE)] not in ([], [AS_TRACED]):
            raise ValueError(f"SplitOrWhole needs the whole graph first (after 'as traced', if given), got {names}")
        self._whole = self.variants[names.index(WHOLE)]
        self.series = f"split/{self.key}"
        _LIVE.add(self)

    def _measured(self) -> tuple[float | None, ...]:
        """Each variant's forward + backward ms on this rank (``Variant.measured_ms``; None: not timed yet)."""
        return tuple(v.measured_ms() for v in self.variants)

    def __call__(self, *args: Any) -> Any:
        if self._run is not None:  # chosen: every later call
            return self._run(*args)
        calls = _calls()
        n = calls.get(self.series, 0)
        calls[self.series] = n + 1
        measured = self._measured()
        # round-robin over the variants that can still win (a fallen-back one is infinitely slow), BLOCK calls in a
        # row each, so the machine's drift during warm-up hits each alike; the count of agreed runs is the same on
        # every rank
        live = [i for i, ms in enumerate(measured) if ms != float("inf")] or [0]
        wish = live[(sum(self.runs.values()) // BLOCK) % len(live)]
        ballot = (wish, measured)
        verdict = (control.vote(self.series, n, ballot, what=f"call {n} of the whole-or-split graph {self.key}")
                   if self.voting else control.Verdict(True, [ballot]))
        if not verdict.agreed or verdict.ballots is None:
            return self._whole.run(*args)
        ballots = verdict.ballots
        if all(ms is not None for b in ballots for ms in b[1]):
            if not self.voting:  # every rank got here at the same call (same calls, same counts): pool the timings
                ballots = control.meet(f"{self.series}/settle", ballot, what=f"the choice of {self.key}")
            self._settle([max(b[1][i] for b in ballots) for i in range(len(self.variants))])
            return self(*args)
        wishes = {b[0] for b in ballots}
        variant = self.variants[wishes.pop()] if len(wishes) == 1 else self._whole
        self.runs[variant.name] = self.runs.get(variant.name, 0) + 1
        return variant.run(*args)

    def _settle(self, ms: list[float]) -> None:
        # the first variant (as traced, whole, then fewer ranges) within MARGIN of the fastest: the later ones must
        # pay for their ops
        best = next(i for i in range(len(ms)) if ms[i] <= min(ms) * (1 + MARGIN))
        won = self.variants[best]
        self.chosen = won.name
        for v in self.variants:
            v.run.release()  # no more timing hooks: the winner runs bare
        self._run = won.fn
        others = ", ".join(f"{v.name} {t:.1f} ms" for v, t in zip(self.variants, ms) if v.name != self.chosen)
        note = (f"{records.SPLIT_CHOICE} {self.chosen} chosen, forward + backward measured {ms[best]:.1f} ms (slowest rank, "
                f"faster half of calls) against {others}")
        winner = won.record
        winner.token_split = [*(winner.token_split or []), note]
        if won.name == AS_TRACED:  # the compiled graphs the report shows for it never run
            for g in winner.graphs:
                g.fallback = f"{records.FASTEST_AS_TRACED} ({note})"
        for v in self.variants:
            if v.record is not winner:
                records.drop(v.record)
        self.variants, self._whole = [won], won  # the losers' graphs and buffers go


def choice_key(*parts: str) -> str:
    """A key for one whole-or-split choice, the same on every rank that compiled the same graphs."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:16]

"""Run a Dynamo graph whole or split into token ranges, whichever the measurements say is faster.

Splitting a layer's tokens before routing (``passes.split_tokens``) pays off
when its all-to-alls take real time on the link, and costs per-op overhead
when they do not (on loopback eight ranges ran 0.78x eager). Whether the link
is slow is only known by running, so with ``split_tokens="auto"`` the backend
compiles both: the graph as Dynamo traced it and the split one, each with its
own forward and backward ``ScheduledGraph``. :class:`SplitOrWhole` runs the
whole graph until its schedules are planned and have timed calls, then the
split one likewise, then keeps the one whose forward + backward calls took
less (the slowest rank's median), for good.

Which variant runs a call must be the same on every rank (their collectives
differ), so until the choice is made every call starts with a vote
(``runtime.control.vote``) whose ballots carry what each rank wants to run and
what it has measured; an abandoned or split vote runs the whole graph, and the
choice is made from the ballots of one vote, so every rank makes it at the
same call.
"""

from __future__ import annotations

import hashlib
import statistics
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from fsmoe_compiler import records
from fsmoe_compiler.runtime import control

WHOLE, SPLIT = "whole", "split"
#: Timed calls of a planned graph (``ScheduleReport.measured_calls_ms``) a variant needs before it is compared.
MEASURED_CALLS = 2


_LIVE: "weakref.WeakSet[SplitOrWhole]" = weakref.WeakSet()


def unsettled() -> int:
    """How many whole-or-split graphs of this process still measure (a benchmark warms up until none does;
    the choice is made at the same call on every rank, so the count is the same on every rank)."""
    return sum(1 for c in list(_LIVE) if c.chosen is None)


def _calls() -> dict[str, int]:
    return control.local("fsmoe.split_choice_calls", dict)


def variant_ms(record: records.CompileRecord) -> float | None:
    """Median forward + backward call time of ``record``'s planned graphs, or None while a graph has too few
    timed calls. A graph that runs as traced (fell back, or has nothing to schedule) has no timed calls:
    ``inf``, so a variant that cannot be measured is never preferred."""
    total = 0.0
    for kind in ("forward", "backward"):
        g = record.latest(kind)
        if g is None:
            return None
        sched = g.schedule
        if g.fallback is not None or sched is None:
            return float("inf") if g.fallback is not None else None
        if len(sched.measured_calls_ms) < MEASURED_CALLS:
            return None
        total += statistics.median(sched.measured_calls_ms)
    return total


@dataclass(eq=False)
class SplitOrWhole:
    """A compiled Dynamo graph that runs ``whole`` or ``split`` (both aot_autograd-compiled callables) per call,
    until it has measured both and settles on the faster. ``records`` are their compile records; the loser's
    is dropped from the report registry, the winner's notes say why it won."""

    whole: Callable[..., Any]
    split: Callable[..., Any]
    whole_record: records.CompileRecord
    split_record: records.CompileRecord
    key: str
    chosen: str | None = None
    runs: dict[str, int] = field(default_factory=lambda: {WHOLE: 0, SPLIT: 0})
    voting: bool = True

    def __post_init__(self) -> None:
        self.series = f"split/{self.key}"
        _LIVE.add(self)

    def __hash__(self) -> int:
        return id(self)

    def _measured(self) -> dict[str, float | None]:
        return {WHOLE: variant_ms(self.whole_record), SPLIT: variant_ms(self.split_record)}

    def _wish(self, measured: dict[str, float | None]) -> str:
        return WHOLE if measured[WHOLE] is None else SPLIT

    def __call__(self, *args: Any) -> Any:
        if self.chosen is not None:
            return (self.split if self.chosen == SPLIT else self.whole)(*args)
        calls = _calls()
        n = calls.get(self.series, 0)
        calls[self.series] = n + 1
        measured = self._measured()
        ballot = (self._wish(measured), measured[WHOLE], measured[SPLIT])
        verdict = (control.vote(self.series, n, ballot, what=f"call {n} of the whole-or-split graph {self.key}")
                   if self.voting else control.Verdict(True, [ballot]))
        if not verdict.agreed or verdict.ballots is None:
            return self.whole(*args)
        ballots = verdict.ballots
        if all(b[1] is not None and b[2] is not None for b in ballots):
            self._settle(max(b[1] for b in ballots), max(b[2] for b in ballots))
            return self(*args)
        wishes = {b[0] for b in ballots}
        run = wishes.pop() if len(wishes) == 1 else WHOLE
        self.runs[run] += 1
        return (self.split if run == SPLIT else self.whole)(*args)

    def _settle(self, whole_ms: float, split_ms: float) -> None:
        self.chosen = SPLIT if split_ms < whole_ms else WHOLE
        winner, loser = ((self.split_record, self.whole_record) if self.chosen == SPLIT
                         else (self.whole_record, self.split_record))
        note = (f"token split: {'split' if self.chosen == SPLIT else 'whole'} graph chosen, forward + backward "
                f"measured {min(whole_ms, split_ms):.1f} ms against {max(whole_ms, split_ms):.1f} ms for the "
                f"{'whole' if self.chosen == SPLIT else 'split'} graph (slowest rank, median calls)")
        winner.token_split = [*(winner.token_split or []), note]
        records.drop(loser)


def choice_key(*parts: str) -> str:
    """A key for one whole-or-split choice, the same on every rank that compiled the same graphs."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:16]

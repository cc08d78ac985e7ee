"""Per-point simulation records and the per-preset summary ``fsmoe simulate`` prints.

Kept apart from the simulation itself so that the statistics are plain
functions of makespans, testable without running a scheduler.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from fsmoe_compiler.sim.methods import BASELINES, LOWER_BOUND, OURS


@dataclass
class PointResult:
    """One grid point under one preset: each method's makespan (ms) and our solver's effort."""

    preset: str
    config: dict[str, Any]  # the LayerSpec's fields
    makespan_ms: dict[str, float]  # method (as reported: methods.REPORTED_METHODS) -> makespan of forward + backward
    solver_s: float  # wall time of our search and solves for this point
    optimal: bool  # CP-SAT proved every solve of ours optimal
    detail: dict[str, Any] = field(default_factory=dict)  # chosen degrees etc.

    def speedup(self, baseline: str) -> float:
        """``baseline`` makespan / ours (> 1: ours is faster)."""
        return self.makespan_ms[baseline] / self.makespan_ms[OURS]

    def at_bound(self, rel: float = 1e-6) -> bool:
        """Ours equals the lower bound (within ``rel``): optimal, proved by the bound."""
        return self.makespan_ms[OURS] <= self.makespan_ms[LOWER_BOUND] * (1 + rel)

    def gap(self) -> float:
        """How far ours is above the lower bound, as a fraction (0.05 = 5 %)."""
        return self.makespan_ms[OURS] / self.makespan_ms[LOWER_BOUND] - 1.0


def geomean(xs: Sequence[float]) -> float:
    """Geometric mean of positive numbers."""
    if not xs:
        return float("nan")
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


@dataclass
class Stats:
    """geomean / min / max of a ratio over the grid."""

    geomean: float
    min: float
    max: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> "Stats":
        return cls(geomean(xs), min(xs), max(xs))


@dataclass
class PresetSummary:
    """What ``fsmoe simulate --grid`` reports for one preset (also its ``--json`` record)."""

    preset: str
    n: int
    speedup: dict[str, Stats]  # baseline -> ours' speedup over it
    best_possible_speedup: dict[str, float]  # baseline -> geomean(baseline / lower_bound): the ceiling
    gap_median: float  # median (ours / lower_bound - 1)
    gap_max: float
    solver_ms_mean: float  # per grid point
    solver_ms_median: float
    solver_ms_max: float
    optimal_fraction: float  # share of points where CP-SAT proved every solve optimal
    proved_fraction: float  # share where optimality is proved: by CP-SAT or ours == lower bound
    bound_violations: int  # points where ours < lower bound (must be 0: a bug if not)
    wins: dict[str, float]  # baseline -> share of points where ours is strictly faster (> 0.1 %)
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict; the keys are the documented ``--json`` schema."""
        d = asdict(self)
        d["gap_to_lower_bound"] = {"median": d.pop("gap_median"), "max": d.pop("gap_max")}
        d["solver_ms_per_point"] = {
            "mean": d.pop("solver_ms_mean"),
            "median": d.pop("solver_ms_median"),
            "max": d.pop("solver_ms_max"),
        }
        return d


def summarize(results: Sequence[PointResult], preset: str | None = None, wall_s: float = 0.0) -> PresetSummary:
    """Aggregate one preset's points into a :class:`PresetSummary`."""
    if not results:
        raise ValueError("summarize needs at least one PointResult")
    preset = preset or results[0].preset
    solver_ms = [r.solver_s * 1e3 for r in results]
    gaps = [r.gap() for r in results]
    return PresetSummary(
        preset=preset,
        n=len(results),
        speedup={b: Stats.of([r.speedup(b) for r in results]) for b in BASELINES},
        best_possible_speedup={
            b: geomean([r.makespan_ms[b] / r.makespan_ms[LOWER_BOUND] for r in results]) for b in BASELINES
        },
        gap_median=statistics.median(gaps),
        gap_max=max(gaps),
        solver_ms_mean=statistics.fmean(solver_ms),
        solver_ms_median=statistics.median(solver_ms),
        solver_ms_max=max(solver_ms),
        optimal_fraction=sum(r.optimal for r in results) / len(results),
        proved_fraction=sum(r.optimal or r.at_bound() for r in results) / len(results),
        bound_violations=sum(r.makespan_ms[OURS] < r.makespan_ms[LOWER_BOUND] * (1 - 1e-6) for r in results),
        wins={b: sum(r.speedup(b) > 1.001 for r in results) / len(results) for b in BASELINES},
        wall_s=wall_s,
    )


def _pct(x: float) -> str:
    """A gap as a percentage; float noise just below 0 prints as 0.00%."""
    return f"{100 * (0.0 if -1e-6 < x < 0 else x):.2f}%"


def summary_rows(summaries: Sequence[PresetSummary]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows (one per preset x baseline) for tabulate."""
    headers = [
        "preset",
        "vs",
        "geomean",
        "min",
        "max",
        "ceiling (vs/LB)",
        "wins",
        "gap LB med",
        "gap LB max",
        "solver ms/pt",
        "opt CP-SAT",
        "opt CP-SAT|=LB",
        "n",
    ]
    rows: list[list[Any]] = []
    for s in summaries:
        for i, b in enumerate(BASELINES):
            st = s.speedup[b]
            first = i == 0
            rows.append(
                [
                    s.preset if first else "",
                    b,
                    f"{st.geomean:.3f}x",
                    f"{st.min:.3f}x",
                    f"{st.max:.3f}x",
                    f"{s.best_possible_speedup[b]:.3f}x",
                    f"{100 * s.wins[b]:.0f}%",
                    _pct(s.gap_median) if first else "",
                    _pct(s.gap_max) if first else "",
                    f"{s.solver_ms_mean:.1f}" if first else "",
                    f"{100 * s.optimal_fraction:.0f}%" if first else "",
                    f"{100 * s.proved_fraction:.0f}%" if first else "",
                    s.n if first else "",
                ]
            )
    return headers, rows

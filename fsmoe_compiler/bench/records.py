"""Dataclasses of ``fsmoe bench``: the run's configuration, each rank's raw timings, the aggregated result.

Kept JSON-friendly (plain fields, ``to_json``/``from_json``) because the
configuration goes to the rank processes as a file and the result comes back
the same way, and ``--json`` writes the result for the README and tests.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from typing import Any

from . import allocator

# Communication-heavy default: with 1 thread per rank, one eager step has 8 all-to-alls taking
# ~165 ms on a 500 Mbit/s link alone (~320 ms at 300 Mbit/s) against ~225 ms of expert GEMMs on
# the 2-core Xeon of one dev machine and ~360 ms on the AMD EPYC of another; the bucketed
# gradient all-reduce of the dense weights ~40-65 ms (measured with the bench's eager step split).
DEFAULT_MODEL = "gpt2"
#: How the bench averages gradients over ranks (``--grad-sync``).
GRAD_SYNC = ("bucket", "graph")
#: How the example models send tokens to experts (``--dispatch``): the ``MoELayer`` dispatchers.
DISPATCH = ("capacity", "dropless")
#: Example models whose MoE layer is always dropless (their default ``--dispatch``).
DROPLESS_ONLY = ("torchtitan", "torchtitan_dsv3")
DEFAULT_SIZES: dict[str, Any] = {
    "layers": 2,
    "d_model": 256,
    "d_ff": 1536,
    "experts": 4,
    "top_k": 2,
    "capacity_factor": 1.25,
    "batch": 16,
    "seq": 64,
}


@dataclass
class BenchConfig:
    """Everything a rank needs to run its share of the benchmark."""

    methods: list[str]
    ranks: int = 2
    model: str = DEFAULT_MODEL
    layers: int = DEFAULT_SIZES["layers"]
    d_model: int = DEFAULT_SIZES["d_model"]
    d_ff: int = DEFAULT_SIZES["d_ff"]
    experts: int = DEFAULT_SIZES["experts"]
    top_k: int = DEFAULT_SIZES["top_k"]
    capacity_factor: float = DEFAULT_SIZES["capacity_factor"]
    shared_expert: bool = False
    dispatch: str = "capacity"  # "capacity" (fixed-size all-to-alls) or "dropless" (every token, data-dependent sizes)
    batch: int = DEFAULT_SIZES["batch"]
    seq: int = DEFAULT_SIZES["seq"]
    steps: int = 10
    warmup: int = 2
    threads: int = 1
    seed: int = 0
    lr: float = 0.01
    emulate_link: str | None = None  # suggested for the default model: "300mbit" to "500mbit"; or inter=R,intra=R
    ranks_per_node: int = 1  # with emulate_link: ranks sharing one node namespace (and its loopback)
    timeout_s: float = 600.0
    pg_timeout_s: float = 120.0
    breakdown: bool = True
    fsmoe_options: dict[str, Any] = field(default_factory=dict)
    grad_sync: str = "bucket"  # "bucket": after backward, one flat all-reduce; "graph": inside backward
    trace_dir: str | None = None  # each rank writes a Chrome trace per fsmoe method here
    malloc: str = "auto"  # the ranks' malloc, one of allocator.MALLOCS ("auto": jemalloc where installed)

    def validate(self) -> None:
        """ValueError naming the bad field and what would be valid."""
        for name in ("ranks", "layers", "d_model", "d_ff", "experts", "top_k", "batch", "seq", "steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 1:
            raise ValueError(f"--warmup must be >= 1 (the first step compiles), got {self.warmup}")
        allocator.resolve(self.malloc)  # an unknown choice, or jemalloc where it is not installed
        if self.experts % self.ranks:
            raise ValueError(f"--experts ({self.experts}) must be a multiple of --ranks ({self.ranks})")
        if self.top_k > self.experts:
            raise ValueError(f"--top-k ({self.top_k}) must be <= --experts ({self.experts})")
        if self.capacity_factor <= 0:
            raise ValueError(f"--capacity-factor must be > 0, got {self.capacity_factor}")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"--dispatch must be one of {', '.join(DISPATCH)}, got {self.dispatch!r}")
        if self.model in DROPLESS_ONLY and self.dispatch != "dropless":
            raise ValueError(f"--model {self.model} is dropless only (its MoE layer has no capacity); "
                             "use --dispatch dropless")
        groups = self.presets.get("num_expert_groups")  # group-limited routing
        if groups and (self.experts % groups or self.experts // groups < 2):
            raise ValueError(f"--model {self.model} routes over {groups} expert groups of at least 2 experts: "
                             f"--experts must be a multiple of {groups} and >= {2 * groups}, got {self.experts}")
        if self.grad_sync not in GRAD_SYNC:
            raise ValueError(f"--grad-sync must be one of {', '.join(GRAD_SYNC)}, got {self.grad_sync!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.ranks_per_node < 1 or self.ranks % self.ranks_per_node:
            raise ValueError(f"--ranks-per-node must divide --ranks ({self.ranks}), got {self.ranks_per_node}")
        if self.ranks_per_node > 1 and not self.emulate_link:
            raise ValueError(f"--ranks-per-node {self.ranks_per_node} places ranks in node namespaces: it needs "
                             "--emulate-link (e.g. inter=300mbit,intra=2gbit)")

    @property
    def presets(self) -> dict[str, Any]:
        """The fixed ``build_model`` options of ``--model`` (``demo.MODEL_PRESETS``; none for most models)."""
        from fsmoe_compiler.demo import MODEL_PRESETS

        return MODEL_PRESETS.get(self.model, {})

    def model_overrides(self) -> dict[str, Any]:
        """Keyword overrides for the example's ``build_model``."""
        return {
            **self.presets,
            "n_layers": self.layers,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "num_experts": self.experts,
            "top_k": self.top_k,
            "capacity_factor": self.capacity_factor,
            "shared_expert": self.shared_expert or self.presets.get("shared_expert", False),
            "dispatch": self.dispatch,
            "seq_len": self.seq,
        }

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchConfig":
        return cls(**json.loads(text))


def graphs_total(summary: dict, *keys: str) -> float:
    """The sum of ``keys`` over every graph row of an fsmoe summary (``methods.fsmoe_summary``).

    ``graphs_total(s, "compile_s", "plan_s")`` is the seconds the backend itself spent on one rank's
    graphs; ``graphs_total(s, "wait_s")`` the time that rank waited for the others at control exchanges.
    """
    return sum(g.get(k) or 0.0 for g in summary.values() if isinstance(g, dict) for k in keys)


@dataclass
class RankMethodRaw:
    """One rank's raw observations of one method."""

    times_ms: list[float] = field(default_factory=list)
    first_loss: float | None = None
    compile_s: float | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodResult:
    """One method aggregated over ranks: per repeat the slowest rank's step, then statistics over repeats."""

    name: str
    ok: bool
    error: str | None = None
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    speedup_vs_eager: float | None = None
    first_loss: float | None = None
    compile_s: float | None = None
    times_ms: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def aggregate(cls, name: str, per_rank: list[RankMethodRaw]) -> "MethodResult":
        errors = [f"rank {r}: {raw.error}" for r, raw in enumerate(per_rank) if raw.error]
        if errors:
            return cls(name, ok=False, error=errors[0].splitlines()[0] if len(errors) == 1 else "; ".join(
                e.splitlines()[0] for e in errors), info={"errors": errors})
        n = min(len(raw.times_ms) for raw in per_rank)
        times = [max(raw.times_ms[i] for raw in per_rank) for i in range(n)]
        losses = [raw.first_loss for raw in per_rank if raw.first_loss is not None]
        res = cls(
            name,
            ok=True,
            times_ms=times,
            first_loss=sum(losses) / len(losses) if losses else None,
            compile_s=max((raw.compile_s or 0.0) for raw in per_rank),
            info=dict(per_rank[0].info),
        )
        summaries = [raw.info.get("fsmoe") for raw in per_rank]
        if all(isinstance(s, dict) and "error" not in s for s in summaries):
            res.info["overhead_s_by_rank"] = [graphs_total(s, "compile_s", "plan_s") for s in summaries]
            res.info["wait_s_by_rank"] = [graphs_total(s, "wait_s") for s in summaries]
            res.info["codegen_s_by_rank"] = [graphs_total(s, "codegen_s") for s in summaries]
        if times:
            res.median_ms = statistics.median(times)
            qs = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
            res.q1_ms, res.q3_ms = qs[0], qs[2]
            res.min_ms, res.max_ms = min(times), max(times)
        return res


@dataclass
class BenchResult:
    """The whole run: configuration, link, per-method results, eager step split, warnings."""

    config: dict[str, Any]
    link: dict[str, Any]
    methods: list[MethodResult]
    breakdown: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    # speedups[a][b]: median step of b / median step of a (how much faster a is than b), ok methods only
    speedups: dict[str, dict[str, float]] = field(default_factory=dict)

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

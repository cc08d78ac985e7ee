"""Online profiling: per-node compute times, fitted collective link models, agreement over ranks, a JSON cache.

``profile_call`` runs a graph under ``TimingInterpreter`` (one real training
step); ``fit_collectives`` / ``microbenchmark_collectives`` give
``t = alpha + beta * bytes`` per collective kind and group size; ``CostModel``
prices nodes for the scheduler; ``agree`` makes all ranks hold the same model;
``ProfileCache`` / ``profile_key`` / ``plan_key`` skip profiling next time;
``StepProfiler`` is one graph's profiling calls (a node costs the median of its calls).
"""

from fsmoe_compiler.profiler.cache import ProfileCache, plan_key, profile_key
from fsmoe_compiler.profiler.comm import (cpu_shares, fit_collectives, last_arrivals, microbenchmark_collectives,
                                          microbenchmark_contention, typical_ms)
from fsmoe_compiler.profiler.costs import CostModel, agree, median_per_node, steady_calls
from fsmoe_compiler.profiler.session import StepProfiler
from fsmoe_compiler.profiler.timing import CollectiveSample, TimingInterpreter, profile_call

__all__ = [
    "CollectiveSample",
    "CostModel",
    "ProfileCache",
    "StepProfiler",
    "TimingInterpreter",
    "agree",
    "cpu_shares",
    "fit_collectives",
    "last_arrivals",
    "median_per_node",
    "microbenchmark_collectives",
    "microbenchmark_contention",
    "plan_key",
    "profile_call",
    "profile_key",
    "steady_calls",
    "typical_ms",
]

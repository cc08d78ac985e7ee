"""Online profiling: per-node compute times, fitted collective link models, agreement over ranks, a JSON cache.

``profile_call`` runs a graph under ``TimingInterpreter`` (one real training
step); ``fit_collectives`` / ``microbenchmark_collectives`` give
``t = alpha + beta * bytes`` per collective kind and group size; ``CostModel``
prices nodes for the scheduler; ``agree`` makes all ranks hold the same model;
``ProfileCache`` / ``profile_key`` skip profiling next time; ``StepProfiler``
is the profiling phase as a boxed compiled function.
"""

from fsmoe_compiler.profiler.cache import ProfileCache, profile_key
from fsmoe_compiler.profiler.comm import fit_collectives, microbenchmark_collectives
from fsmoe_compiler.profiler.costs import CostModel, agree
from fsmoe_compiler.profiler.session import StepProfiler
from fsmoe_compiler.profiler.timing import CollectiveSample, TimingInterpreter, profile_call

__all__ = [
    "CollectiveSample",
    "CostModel",
    "ProfileCache",
    "StepProfiler",
    "TimingInterpreter",
    "agree",
    "fit_collectives",
    "microbenchmark_collectives",
    "profile_call",
    "profile_key",
]

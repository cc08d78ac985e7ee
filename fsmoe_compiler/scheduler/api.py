"""Entry points for the simulator and the compiler: one method on a layer stack, or all methods on one layer."""

from __future__ import annotations

from typing import Sequence

from fsmoe_compiler.scheduler.baselines import fsmoe_paper, sequential, step_lower_bound, tutel
from fsmoe_compiler.scheduler.costs import ClusterCosts, LayerSpec
from fsmoe_compiler.scheduler.search import SearchOptions, SolveCache, fsmoe_step
from fsmoe_compiler.scheduler.step import StepSchedule

#: Methods :func:`schedule_step` knows; "cpsat" is another name for "fsmoe" (ours).
METHODS: tuple[str, ...] = ("sequential", "tutel", "fsmoe_paper", "fsmoe", "lower_bound")
_ALIASES = {"cpsat": "fsmoe", "ours": "fsmoe", "deepspeed": "sequential"}
#: Layers in the stack :func:`evaluate_layer` schedules by default (so that one layer's
#: gradient all-reduce can overlap the next layer's backward).
DEFAULT_NUM_LAYERS = 2


def _method(m: str) -> str:
    m2 = _ALIASES.get(m, m)
    if m2 not in METHODS:
        raise ValueError(f"unknown method {m!r}; valid methods: {', '.join(METHODS)} (aliases: {', '.join(_ALIASES)})")
    return m2


def schedule_step(specs: Sequence[LayerSpec], costs: ClusterCosts, method: str = "fsmoe", max_degree: int = 8,
                  time_limit_s: float = 0.02, cache: SolveCache | None = None,
                  seeds: Sequence[StepSchedule] | None = None, split_weight_grads: bool = False) -> StepSchedule:
    """Schedule one training step (forward + backward) of the layer stack ``specs`` with ``method``.

    ``max_degree`` bounds the pipeline degrees our method and the lower bound
    consider (the baselines use {1, 2, 4, 8} as those systems do);
    ``time_limit_s`` is CP-SAT's deterministic time per solve.
    ``split_weight_grads`` lets our method schedule weight gradients apart
    from input gradients (see :class:`SearchOptions`); the lower bound is then
    the one valid for that relaxation too.
    """
    m = _method(method)
    specs = list(specs)
    if not specs:
        raise ValueError("schedule_step needs at least one LayerSpec")
    if not isinstance(max_degree, int) or max_degree < 1:
        raise ValueError(f"max_degree must be an integer >= 1, got {max_degree!r}")
    if m == "sequential":
        return sequential(specs, costs)
    if m == "tutel":
        return tutel(specs, costs)
    if m == "fsmoe_paper":
        return fsmoe_paper(specs, costs)
    if m == "lower_bound":
        return step_lower_bound(specs, costs, max_degree, split_weight_grads)
    return fsmoe_step(specs, costs, SearchOptions(max_degree=max_degree, time_limit_s=time_limit_s,
                                                  split_weight_grads=split_weight_grads), cache, seeds)


def evaluate_layer(spec: LayerSpec, costs: ClusterCosts, methods: Sequence[str] = METHODS,
                   num_layers: int = DEFAULT_NUM_LAYERS, max_degree: int = 8, time_limit_s: float = 0.02,
                   cache: SolveCache | None = None, split_weight_grads: bool = False) -> dict[str, StepSchedule]:
    """Every requested method on a stack of ``num_layers`` copies of ``spec``: ``{method: StepSchedule}``.

    The baselines are computed once and also seed our method (so it is never
    worse than any of them). ``StepSchedule.makespan`` is the step time in ms.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    ms = [_method(m) for m in methods]
    specs = [spec] * num_layers
    out: dict[str, StepSchedule] = {}
    base = {"sequential": sequential, "tutel": tutel, "fsmoe_paper": fsmoe_paper}
    need_seeds = "fsmoe" in ms
    for name, fn in base.items():
        if name in ms or need_seeds:
            out[name] = fn(specs, costs)
    if "lower_bound" in ms:
        out["lower_bound"] = step_lower_bound(specs, costs, max_degree, split_weight_grads)
    if need_seeds:
        opts = SearchOptions(max_degree=max_degree, time_limit_s=time_limit_s, split_weight_grads=split_weight_grads)
        out["fsmoe"] = fsmoe_step(specs, costs, opts, cache, seeds=[out[k] for k in base])
    keep = {_method(m) for m in methods}
    return {k: v for k, v in out.items() if k in keep} | {m: out[_method(m)] for m in methods if m not in out}

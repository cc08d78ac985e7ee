"""Shared, memoised per-layer evaluations: one layer's graph, heuristic schedule and lower bound at degree r.

The lower bound, the degree search and the baselines all look at the same
single-layer graphs; building and scheduling each once per (layer signature,
costs, r, phase) keeps a 1458-layer sweep fast. The cached graphs are shared:
callers must not modify them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from fsmoe_compiler.scheduler.bounds import lower_bound
from fsmoe_compiler.scheduler.heuristic import heuristic_starts, schedule_from_starts
from fsmoe_compiler.scheduler.schedule import Schedule
from fsmoe_compiler.scheduler.taskgraph import TaskGraph
from fsmoe_compiler.sim.builders import build_layer_backward, build_layer_forward
from fsmoe_compiler.sim.costs import ClusterCosts, LayerSpec

_COSTS_KEYS: dict[int, tuple] = {}


def costs_key(costs: ClusterCosts) -> tuple:
    """A hashable key of a ClusterCosts (its gemm dict makes it unhashable)."""
    k = _COSTS_KEYS.get(id(costs))
    if k is None or k[0] is not costs:
        key = (costs.name, costs.all_to_all, costs.all_gather, costs.reduce_scatter, costs.all_reduce,
               tuple(sorted(costs.gemm.items())), costs.dense, costs.gpus, costs.gpus_per_node)
        k = (costs, key)
        if len(_COSTS_KEYS) > 1024:
            _COSTS_KEYS.clear()
        _COSTS_KEYS[id(costs)] = k
    return k[1]


@dataclass
class LayerEval:
    """One layer at one degree: its graph (layer 0 ids; backward without gradient slices), heuristic, bound."""

    graph: TaskGraph
    starts: list[float]
    makespan: float
    lb: float
    _sched: Schedule | None = None

    @property
    def schedule(self) -> Schedule:
        if self._sched is None:
            self._sched = schedule_from_starts(self.graph, self.starts)
        return self._sched


_EVALS: "OrderedDict[tuple, LayerEval]" = OrderedDict()
#: Least-recently-used entries beyond this are dropped (each holds a graph; a sweep touches ~16 per layer).
MAX_ENTRIES = 4096


def layer_eval(spec: LayerSpec, costs: ClusterCosts, r: int, phase: str) -> LayerEval:
    """Memoised :class:`LayerEval` of ``spec`` at degree ``r`` in ``phase`` ("forward" / "backward")."""
    key = (spec.signature(), costs_key(costs), r, phase)
    ev = _EVALS.get(key)
    if ev is None:
        g = build_layer_forward(spec, costs, r) if phase == "forward" else build_layer_backward(spec, costs, r, [])
        starts, ms = heuristic_starts(g)
        ev = LayerEval(g, starts, ms, lower_bound(g))
        _EVALS[key] = ev
        while len(_EVALS) > MAX_ENTRIES:
            _EVALS.popitem(last=False)
    else:
        _EVALS.move_to_end(key)
    return ev


def clear() -> None:
    """Forget every memoised layer evaluation."""
    _EVALS.clear()

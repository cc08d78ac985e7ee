"""The profiling phase of one graph: run calls under the timing interpreter and keep what they measured.

``StepProfiler(gm)`` is a drop-in compiled function (boxed: it takes
aot_autograd's argument list) that runs each call under the
``TimingInterpreter`` and keeps its numbers. A node costs the median of its
steady calls (``steady_calls``: the faster half, by the call's summed time;
``median_per_node``: the steady state is not the undisturbed best). The
planner keeps one per candidate degree; ``cost_model()`` turns the calls
into a ``CostModel``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from fsmoe_compiler.profiler.costs import CostModel, median_per_node, steady_calls
from fsmoe_compiler.profiler.timing import TimingInterpreter


class StepProfiler:
    """Runs ``gm`` under a timing interpreter on every call and accumulates the measurements."""

    def __init__(self, gm: fx.GraphModule, *, sync_collectives: bool = True) -> None:
        # aot_autograd passes one argument list; an instance attribute survives the functools.wraps
        # of dynamo's disable() wrapper (a class attribute would not)
        self._boxed_call = True
        self.gm = gm
        self.sync_collectives = sync_collectives
        self.node_ms_runs: list[dict[str, float]] = []
        self.sample_runs: list[list[dict]] = []

    @property
    def calls(self) -> int:
        return len(self.node_ms_runs)

    def __call__(self, args: Sequence[Any]) -> Any:
        interpreter = TimingInterpreter(self.gm, sync_collectives=self.sync_collectives)
        out = interpreter.run(*args)
        self.node_ms_runs.append(dict(interpreter.node_ms))
        self.sample_runs.append(list(interpreter.samples))
        return out

    @property
    def samples(self) -> list[dict]:
        """Every collective sample of every call, in call order."""
        return [s for run in self.sample_runs for s in run]

    def node_ms(self) -> dict[str, float]:
        """Per node, the median of the steady calls so far (``steady_calls``)."""
        return median_per_node(steady_calls(self.node_ms_runs))

    def cost_model(self, extra_samples: Sequence[dict] = ()) -> CostModel:
        """The calls so far as a ``CostModel`` (link models also fitted from ``extra_samples``, e.g. microbenchmarks)."""
        if not self.node_ms_runs:
            raise RuntimeError("StepProfiler.cost_model: no call has been profiled yet")
        samples = self.samples + [dict(s) for s in extra_samples]
        return CostModel.from_profiles(steady_calls(self.node_ms_runs), samples)

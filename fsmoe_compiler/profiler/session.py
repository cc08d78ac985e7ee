"""Profile the first calls of a compiled graph, then hand over one cost model: the backend's profiling phase.

``StepProfiler(gm)`` is a drop-in compiled function (boxed: it takes
aot_autograd's argument list) that runs each call under the
``TimingInterpreter`` and keeps its numbers; ``cost_model()`` turns the calls
into a ``CostModel`` (median per node; the first call is dropped when there
are more, since it pays one-time costs such as allocator growth and
connection setup). The backend swaps in the scheduled graph afterwards.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from fsmoe_compiler.profiler.costs import CostModel
from fsmoe_compiler.profiler.timing import TimingInterpreter


class StepProfiler:
    """Runs ``gm`` under a timing interpreter on every call and accumulates the measurements."""

    def __init__(self, gm: fx.GraphModule, *, sync_collectives: bool = True) -> None:
        # aot_autograd passes one argument list; an instance attribute survives the functools.wraps
        # of dynamo's disable() wrapper (a class attribute would not)
        self._boxed_call = True
        self.interpreter = TimingInterpreter(gm, sync_collectives=sync_collectives)
        self.node_ms_runs: list[dict[str, float]] = []
        self.sample_runs: list[list[dict]] = []

    @property
    def calls(self) -> int:
        return len(self.node_ms_runs)

    def __call__(self, args: Sequence[Any]) -> Any:
        out = self.interpreter.run(*args)
        self.node_ms_runs.append(dict(self.interpreter.node_ms))
        self.sample_runs.append(list(self.interpreter.samples))
        return out

    def cost_model(self, extra_samples: Sequence[dict] = ()) -> CostModel:
        """The calls so far as a ``CostModel`` (link models also fitted from ``extra_samples``, e.g. microbenchmarks)."""
        if not self.node_ms_runs:
            raise RuntimeError("StepProfiler.cost_model: no call has been profiled yet")
        skip = 1 if self.calls > 1 else 0
        samples = [s for run in self.sample_runs[skip:] for s in run] + [dict(s) for s in extra_samples]
        return CostModel.from_profiles(self.node_ms_runs[skip:], samples)

"""Run a (scheduled) ATen graph, fast or with per-task timing, for the report's predicted-vs-measured view.

``GraphExecutor(gm, task_of)`` is what the backend swaps in after profiling.
``executor(args)`` runs the graph's generated code (``gm.forward``, or the
same graph compiled, e.g. by Inductor, when one is given); it takes
aot_autograd's boxed argument list (``_boxed_call``), so it can be returned to
aot_autograd as a compiled function directly.

``executor.run(args, timed=True)`` notes, per task (``task_of``: node name ->
task id; without it each call node is its own task), when its first node
started and its last node ended, relative to the start of the call (always the graph's own code: a compiled
graph's fused kernels have no task boundaries to stamp). It runs a
copy of the graph with a clock stamp inserted before each task's first node
and after its last one: still generated code, so the overhead is two clock
reads per task rather than an interpreter's per-node cost (which on small
ops is several times the ops themselves), and it adds no synchronisation:
every ``wait_tensor`` stays where the schedule put it, so the overlap being
measured still happens. On CPU the stamps are ``perf_counter`` wall times;
when the inputs live on CUDA they are CUDA events recorded on the current
stream, read after the call returns. Only torch and the standard library are
used here (the runtime never imports passes or the scheduler).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

_CALL_OPS = ("call_function", "call_method", "call_module")


def any_cuda(values: Sequence[Any]) -> bool:
    """Whether any tensor in ``values`` (nested lists/tuples included) lives on a CUDA device."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_cuda:
            return True
        if isinstance(v, (list, tuple)) and any_cuda(v):
            return True
    return False


def _generate_code(gm: fx.GraphModule) -> None:
    """Generate ``gm``'s Python code now if it is a lazy graph module (the planner's copies are): else the first
    call pays for it, about 10 ms on the demo's graphs, and the report's first measured call is that cost."""
    if getattr(gm, "_needs_recompile", None) is not None and gm._needs_recompile():
        gm.real_recompile()


class GraphExecutor:
    """Runs ``gm``: plainly through ``__call__``, or timed per task through ``run(args, timed=True)``.

    After a timed run, ``last_timing`` maps each task id to ``(start_ms, end_ms)``
    relative to the call start (every interval lies in ``[0, last_total_ms]``),
    and ``last_total_ms`` is the whole call.
    """

    def __init__(self, gm: fx.GraphModule, task_of: dict[str, str] | None = None,
                 compiled: Callable[[list], Any] | None = None) -> None:
        # aot_autograd passes one argument list; an instance attribute survives the functools.wraps
        # of dynamo's disable() wrapper (a class attribute would not)
        self._boxed_call = True
        self.gm = gm
        self.compiled = compiled  # the same graph compiled (Inductor's code; takes the boxed list): plain calls run it
        _generate_code(gm)
        self.task_of = dict(task_of) if task_of is not None else None
        self.last_timing: dict[str, tuple[float, float]] = {}
        self.last_total_ms: float | None = None
        self._timed_gm: fx.GraphModule | None = None
        self._tasks: list[str] = []
        self._stamps: list[Any] = []
        self._cuda = False

    def __call__(self, args: Sequence[Any]) -> Any:
        if self.compiled is not None:
            return self.compiled(list(args))
        return self.gm.forward(*args)

    def run(self, args: Sequence[Any], timed: bool = False) -> Any:
        """Run the graph on ``args``; with ``timed`` record ``last_timing`` / ``last_total_ms``."""
        if not timed:
            return self(args)
        if self._timed_gm is None:
            self._timed_gm = self._stamped_copy()
        self._cuda = torch.cuda.is_available() and any_cuda(args)
        self._stamps = [None] * (2 * len(self._tasks) + 2)
        self._stamp(0)
        out = self._timed_gm.forward(*args)
        self._stamp(1)
        if self._cuda:
            torch.cuda.synchronize()  # after the call: reading the events, not ordering the graph
            rel = [self._stamps[0].elapsed_time(ev) for ev in self._stamps]
        else:
            rel = [(t - self._stamps[0]) * 1e3 for t in self._stamps]
        self.last_total_ms = rel[1]
        self.last_timing = {task: (rel[2 + 2 * i], rel[3 + 2 * i]) for i, task in enumerate(self._tasks)}
        return out

    def _stamp(self, slot: int) -> None:
        """Called from the stamped graph: note the time (or record a CUDA event) in ``slot``."""
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._stamps[slot] = ev
        else:
            self._stamps[slot] = time.perf_counter()

    def _task(self, n: fx.Node) -> str | None:
        if n.op not in _CALL_OPS:
            return None
        return self.task_of.get(n.name) if self.task_of is not None else n.name

    def _stamped_copy(self) -> fx.GraphModule:
        """A copy of ``gm`` with ``self._stamp(slot)`` calls around each task's first and last node."""
        nodes = list(self.gm.graph.nodes)
        first: dict[str, fx.Node] = {}
        last: dict[str, fx.Node] = {}
        for n in nodes:
            task = self._task(n)
            if task is not None:
                first.setdefault(task, n)
                last[task] = n
        self._tasks = list(first)
        slot = {task: 2 + 2 * i for i, task in enumerate(self._tasks)}
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            task = self._task(n)
            if task is not None and first[task] is n:
                graph.call_function(self._stamp, (slot[task],))
            env[n] = graph.node_copy(n, lambda a: env[a])
            if task is not None and last[task] is n:
                graph.call_function(self._stamp, (slot[task] + 1,))
        graph._codegen = self.gm.graph._codegen
        return fx.GraphModule(self.gm, graph)

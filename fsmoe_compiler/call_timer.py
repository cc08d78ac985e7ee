"""Time a compiled graph's forward and PyTorch's backward of it, call by call, from outside the graph.

The whole-or-split choice (``split_choice``) compares ways of running one
Dynamo graph: aot_autograd-compiled (whole, or split into token ranges) and
the graph as Dynamo traced it, run by PyTorch's autograd as eager would
(where nothing can overlap, the compiled graphs only add per-call costs: on
loopback they ran 0.92x eager). To compare them fairly each is timed alike,
wrappers, votes and autograd included: the forward is the call's wall time,
the backward the span from the first gradient that reaches the graph's
outputs to the last one that leaves through its inputs and parameters, read
off autograd hooks.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.autograd.graph import register_multi_grad_hook

_KEEP_CALLS = 16
_now = time.perf_counter  # the clock (tests replace it)


class CallTimer:
    """Calls ``fn`` and, for calls made while ``ready()`` holds (a compiled graph: once its schedules are in),
    records forward + backward milliseconds in ``calls_ms`` once the call's backward has run (a call with no
    backward through it: its forward)."""

    def __init__(self, fn: Callable[..., Any], ready: Callable[[], bool] = lambda: True) -> None:
        self.fn = fn
        self.ready = ready
        self.calls_ms: list[float] = []
        self._handles: list[Any] = []
        self._hooked: list[torch.Tensor] = []

    def __call__(self, *args: Any) -> Any:
        self.release()
        timed = self.ready()
        t0 = _now()
        out = self.fn(*args)
        forward_s = _now() - t0
        if not timed:
            return out
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        params = self.fn.parameters() if isinstance(self.fn, torch.nn.Module) else ()
        inputs = [t for t in (*args, *params) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not outputs or not inputs:  # no backward through this call: the forward is all it costs
            self._record(forward_s)
            return out
        began: list[float] = []
        self._hooked = inputs
        self._handles = [
            register_multi_grad_hook(outputs, lambda _: began.append(_now()), mode="any"),
            register_multi_grad_hook(inputs, self._on_last_grad(forward_s, began), mode="all"),
        ]
        return out

    def _on_last_grad(self, forward_s: float, began: list[float]) -> Callable[[Any], None]:
        """The hook that ends one call's timing: once, for the backward of that call (a parameter's hook stays
        until the next call removes it, and would fire again in another graph's backward)."""
        done: list[bool] = []

        def last_grad(_: Any) -> None:
            if began and not done:
                done.append(True)
                self._record(forward_s + _now() - began[0])
        return last_grad

    def _record(self, seconds: float) -> None:
        self.calls_ms.append(seconds * 1e3)
        del self.calls_ms[:-_KEEP_CALLS]

    def release(self) -> None:
        """Remove the last call's hooks (hooks on parameters outlive the backward they were set for), and the
        empty hook tables they leave on the parameters: autograd calls into Python for a table even when it is
        empty, for every gradient of every later backward."""
        for handle in self._handles:
            handle.remove()
        for t in self._hooked:
            if t.grad_fn is None and t._backward_hooks is not None and not t._backward_hooks:
                t._backward_hooks = None  # also unregisters the table's hook in autograd
        self._handles, self._hooked = [], []

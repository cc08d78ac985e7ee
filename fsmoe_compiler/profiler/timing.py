"""Run an ATen graph on real tensors and time every node: the profiling half of a training step.

``TimingInterpreter`` is an ``fx.Interpreter`` that records, per node, the wall
time of executing it (``time.perf_counter``; on CUDA the device is
synchronised before and after each node so the time is the kernel's, not the
launch's). Compute nodes go to ``node_ms``; a collective is timed from its
issue until it completes and becomes a *sample* for fitting the link model
(``profiler.comm.fit_collectives``).

By default (``sync_collectives=True``) the interpreter waits for each
collective right after issuing it, so the sample measures the collective
alone rather than the collective plus whatever compute the graph put between
issue and ``wait_tensor`` (and that compute is timed without a collective
stealing cores behind it). The graph's own ``wait_tensor`` then finds the work
done and returns at once. The outputs are those of ``gm(*args)``: profiling
*is* a training step. With ``sync_collectives=False`` the collective is timed
from issue until the graph's own wait returns (what the schedule exposes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from fsmoe_compiler.ops import collective_group, collective_group_size, collective_kind, is_collective, is_wait, value_bytes
from fsmoe_compiler.runtime.executor import any_cuda


@dataclass
class CollectiveSample:
    """One observed collective: which node, its kind and group, bytes this rank sent, wall ms, and the chunk
    degree of the graph it ran in (``meta["fsmoe"]["degree"]``; node names repeat across degrees)."""

    node: str | None
    kind: str
    group: str | None
    group_size: int | None
    bytes: int
    ms: float
    degree: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _wait_all(value: Any) -> None:
    """``wait_tensor`` on every tensor of a collective's result (a no-op where the work is done)."""
    if isinstance(value, torch.Tensor):
        torch.ops._c10d_functional.wait_tensor(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _wait_all(v)


class TimingInterpreter(fx.Interpreter):
    """Execute ``gm`` node by node, recording ``node_ms`` (compute) and ``samples`` (collectives).

    ``cuda_sync``: synchronise CUDA around every node; ``None`` decides per
    run from whether any input tensor lives on CUDA. One instance can run
    several calls; ``node_ms`` and ``samples`` hold the latest call only.
    """

    def __init__(self, gm: fx.GraphModule, *, sync_collectives: bool = True, cuda_sync: bool | None = None) -> None:
        super().__init__(gm)
        self.sync_collectives = sync_collectives
        self.cuda_sync = cuda_sync
        self.node_ms: dict[str, float] = {}
        self.samples: list[dict] = []
        self._sync = False
        self._pending: dict[fx.Node, tuple[float, CollectiveSample]] = {}
        self._timing: fx.Node | None = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.node_ms = {}
        self.samples = []
        self._pending = {}
        self._sync = self.cuda_sync if self.cuda_sync is not None else (torch.cuda.is_available() and any_cuda(args))
        out = super().run(*args, **kwargs)
        for start, sample in self._pending.values():  # collectives the graph never waited for
            sample.ms = self._now() - start
            self.samples.append(sample.as_dict())
        self._pending = {}
        return out

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter() * 1e3

    def _collective_of(self, node: fx.Node) -> fx.Node | None:
        """The pending collective a wait completes (through a ``getitem`` of a coalesced result)."""
        arg = node.args[0] if node.args else None
        while isinstance(arg, fx.Node):
            if arg in self._pending:
                return arg
            if arg.op == "call_function" and arg.args and isinstance(arg.args[0], fx.Node) and not is_collective(arg):
                arg = arg.args[0]  # getitem / view of the collective's result
                continue
            return None
        return None

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        if is_collective(n):
            sent = value_bytes(map_arg(n.args[0], lambda a: self.env[a])) if n.args else 0
            sample = CollectiveSample(n.name, collective_kind(n), collective_group(n), collective_group_size(n), sent, 0.0,
                                      (n.meta.get("fsmoe") or {}).get("degree"))
            start = self._now()
            result = super().run_node(n)
            if self.sync_collectives:
                _wait_all(result)
                sample.ms = self._now() - start
                self.samples.append(sample.as_dict())
            else:
                self._pending[n] = (start, sample)
            return result
        if is_wait(n):
            coll = self._collective_of(n)
            result = super().run_node(n)
            if coll is not None:
                start, sample = self._pending.pop(coll)
                sample.ms = self._now() - start
                self.samples.append(sample.as_dict())
            return result
        self._timing = n  # the op call itself is timed in _timed, not the interpreter's argument fetching
        try:
            return super().run_node(n)
        finally:
            self._timing = None

    def _timed(self, call: Any, target: Any, args: tuple, kwargs: dict) -> Any:
        node = self._timing
        if node is None:
            return call(target, args, kwargs)
        start = self._now()
        result = call(target, args, kwargs)
        self.node_ms[node.name] = self._now() - start
        return result

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._timed(super().call_function, target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._timed(super().call_method, target, args, kwargs)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._timed(super().call_module, target, args, kwargs)


def profile_call(
    gm: fx.GraphModule, args: Sequence[Any], *, sync_collectives: bool = True
) -> tuple[Any, dict[str, float], list[dict]]:
    """Run ``gm(*args)`` under a :class:`TimingInterpreter`; return ``(outputs, node_ms, samples)``.

    ``node_ms`` maps every compute node's name to its wall ms (collectives and
    waits excluded: they are priced by the link model); ``samples`` are
    ``{"node","kind","group","group_size","bytes","ms"}`` dicts, one per
    collective, in issue order. Every rank must call it on the same graph
    (its collectives are real).
    """
    interp = TimingInterpreter(gm, sync_collectives=sync_collectives)
    out = interp.run(*args)
    return out, interp.node_ms, interp.samples

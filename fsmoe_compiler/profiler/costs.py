"""The measured cost model the scheduler prices an ATen graph with, and how ranks agree on it.

``CostModel`` holds what profiling measured: compute ms per node name (the
median of the steady profiled calls, :func:`steady_calls` and :func:`median_per_node`), one link model per
``f"{kind}/{group_size}"`` (``LinearCost`` in ms with ``n`` = bytes sent, see ``profiler.comm``) and the
raw collective samples it was fitted from. ``node_cost(node)`` prices any
node of the profiled graph *or of a rewritten copy of it*: a chunk copy made
by ``passes/chunk.py`` that was never run costs its origin's time divided by
the chunk degree (``meta["fsmoe"]["origin"]``/``["degree"]``), a collective is
priced from the bytes in its input's ``meta["val"]``, or, where those are
data-dependent (dropless dispatch), from the median bytes it sent in the
profiled calls of its degree (a chunk copy never run: its origin's, divided by
the degree).

``agree`` makes every rank hold identical numbers (the MAX over ranks, over the
control plane), so a deterministic solve gives every rank the same schedule: ranks that order
their collectives differently deadlock.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx

from fsmoe_compiler.profiler.comm import fit_collectives
from fsmoe_compiler.names import comm_key
from fsmoe_compiler.ops import (collective_bytes, collective_group_size, collective_kind, is_collective,
                                is_communication, is_wait)
from fsmoe_compiler.scheduler.costs import LinearCost

#: Version of the JSON layout written by ``CostModel.to_json``.
SCHEMA = 1
#: No single op or collective of a training step takes an hour: a cost above this (ms) is corrupt, not slow.
ABSURD_MS = 3_600_000.0


def steady_calls(node_ms_runs: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """The faster half (at least one; of an odd count, the larger half) of one graph's profiled calls, by the sum
    of their node times: the calls a steady state repeats.

    The first call of a variant after another one ran (another chunk degree,
    or another whole-or-split variant, which take turns two calls each while
    profiling) touches its buffers afresh: in torchtitan's layer an ``add``
    of 6 MiB took 10.8 ms in such calls and 1.0 ms in the next, and the
    median of a degree's two calls priced the backward 30-70 % slow. A call's
    own nodes are kept together, so the dropped calls are whole disturbed
    calls, not each node's slowest times (each node's fastest priced the
    demo 25-40 % fast).
    """
    ranked = sorted(node_ms_runs, key=lambda run: sum(run.values()))
    return ranked[: max(1, (len(ranked) + 1) // 2)]


def median_per_node(node_ms_runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per node name, the median of the calls that ran it (of an even count, the mean of the middle two).

    The prediction is for a typical steady-state call. The fastest call is an
    undisturbed one: on a host whose cores the other ranks and the
    communication library share, the steady state rarely sees it (with
    minima, the demo's backward was predicted 25-40 % fast, each small task
    running 30-100 % over its fastest profiled time; with medians, within
    about 15 %).
    """
    by_name: dict[str, list[float]] = {}
    for run in node_ms_runs:
        for name, ms in run.items():
            by_name.setdefault(name, []).append(float(ms))
    return {name: statistics.median(times) for name, times in by_name.items()}


@dataclass
class CostModel:
    """Measured costs: ``node_ms`` (compute, ms per node name), ``comm`` (link models), ``samples`` (raw).

    Node names are those of one graph; profile the forward and the backward
    graph into separate models (their names overlap) and share link models
    with ``merge(other, nodes=False)``.
    """

    node_ms: dict[str, float] = field(default_factory=dict)
    comm: dict[str, LinearCost] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    # per link key, the share of a collective's time it takes from compute running beside it (profiler.comm's
    # cpu_shares: 0 where the communication library needs no host CPU, 1 where it needs a core the whole time)
    cpu_share: dict[str, float] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_profiles(cls, node_ms_runs: Sequence[dict[str, float]], samples: Sequence[dict] = ()) -> "CostModel":
        """The median time per node over several profiled calls; link models fitted from ``samples``."""
        samples = [dict(s) for s in samples]
        return cls(node_ms=median_per_node(node_ms_runs), comm=fit_collectives(samples), samples=samples)

    def merge(self, other: "CostModel", *, nodes: bool = True) -> "CostModel":
        """A new model with both models' data: ``other`` wins on equal node names; link models refitted.

        Link models are refitted over the union of samples (keys seen only in
        a model without samples, e.g. injected ones, are kept). ``nodes=False``
        keeps this model's ``node_ms`` and takes only the link data of ``other``.
        """
        node_ms = {**self.node_ms, **other.node_ms} if nodes else dict(self.node_ms)
        samples = [dict(s) for s in self.samples] + [dict(s) for s in other.samples]
        comm = {**self.comm, **other.comm}
        comm.update(fit_collectives(samples))
        return CostModel(node_ms=node_ms, comm=comm, samples=samples, cpu_share={**self.cpu_share, **other.cpu_share})

    # -- pricing ------------------------------------------------------------------------------------
    def collective_ms(self, kind: str, group_size: int | None, nbytes: int) -> float:
        """Predicted ms of a ``kind`` collective sending ``nbytes`` on a group of ``group_size`` ranks.

        Uses the model of the nearest measured group size of that kind when the
        exact one is missing (or the size is unknown); ``KeyError`` naming the
        available models when the kind was never measured.
        """
        if group_size is not None and comm_key(kind, group_size) in self.comm:
            return self.comm[comm_key(kind, group_size)](nbytes)
        same = sorted(k for k in self.comm if k.split("/")[0] == kind)
        if not same:
            raise KeyError(
                f"no link model for collective {kind!r} (group size {group_size}); "
                f"measured: {', '.join(sorted(self.comm)) or 'none'}"
            )
        target = group_size if group_size is not None else 0
        best = min(same, key=lambda k: (abs(int(k.split("/")[1]) - target), k))
        return self.comm[best](nbytes)

    def node_cost(self, node: fx.Node) -> float:
        """Predicted ms of one node (see the module docstring); 0.0 for waits, inputs, outputs, unknown nodes."""
        if node.op not in ("call_function", "call_method", "call_module"):
            return 0.0
        if is_wait(node):
            return 0.0
        if is_collective(node):
            nbytes = collective_bytes(node) or self.observed_bytes(node)
            return self.collective_ms(collective_kind(node), collective_group_size(node), nbytes)
        if node.name in self.node_ms:
            return self.node_ms[node.name]
        info = node.meta.get("fsmoe") or {}
        origin = info.get("origin")
        if origin is not None and origin in self.node_ms:
            return self.node_ms[origin] / max(int(info.get("degree") or 1), 1)
        return 0.0

    def cpu_ms(self, node: fx.Node) -> float:
        """Compute time a collective node takes from the host while in flight: its ``node_cost`` times the
        ``cpu_share`` of its link (the nearest group size of its kind); 0.0 for any other node."""
        if not is_collective(node) or not self.cpu_share:
            return 0.0
        kind, size = collective_kind(node), collective_group_size(node)
        same = sorted(k for k in self.cpu_share if k.split("/")[0] == kind)
        if not same:
            return 0.0
        best = min(same, key=lambda k: (abs(int(k.split("/")[1]) - (size or 0)), k))
        return self.cpu_share[best] * self.node_cost(node)

    def observed_bytes(self, node: fx.Node) -> int:
        """The median bytes ``node`` sent in the profiled calls of its chunk degree (every rank's, after
        ``agree``); a chunk copy never profiled: its origin's divided by the degree; 0 when never seen."""
        info = node.meta.get("fsmoe") or {}
        degree = info.get("degree")

        def median(name: str, deg: Any) -> int | None:
            seen = sorted(int(s["bytes"]) for s in self.samples
                          if s.get("node") == name and s.get("degree", deg) == deg and s.get("bytes"))
            return seen[len(seen) // 2] if seen else None

        own = median(node.name, degree)
        if own is not None:
            return own
        origin = info.get("origin")
        whole = median(origin, 1) if origin is not None else None
        if whole is None and origin is not None:
            whole = median(origin, None)
        return whole // max(int(degree or 1), 1) if whole is not None else 0

    # -- checks -------------------------------------------------------------------------------------
    def problems(self, graph: fx.Graph | None = None) -> list[str]:
        """Why this model cannot price ``graph`` (or any graph): NaN, infinite, negative or absurd (over
        ``ABSURD_MS``) costs, and compute nodes of ``graph`` it has no time for (they would cost 0); empty when
        it is usable. A profile cache checks what it loads with this."""
        found = []

        def bad(x: Any) -> bool:
            return not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 or x > ABSURD_MS

        odd = sorted(name for name, ms in self.node_ms.items() if bad(ms))
        if odd:
            found.append(f"node costs not a time in [0, {ABSURD_MS:.0f}] ms: "
                         + ", ".join(f"{n}={self.node_ms[n]!r}" for n in odd[:5]))
        odd = sorted(k for k, c in self.comm.items()
                     if bad(c.alpha) or bad(c.beta) or bad(c.beta * (1 << 20)) or bad(c.floor))
        if odd:
            found.append("link models not a time: " + ", ".join(
                f"{k} (alpha {self.comm[k].alpha!r}, beta {self.comm[k].beta!r})" for k in odd[:5]))
        odd = sorted(k for k, v in self.cpu_share.items() if not isinstance(v, (int, float)) or not 0 <= v <= 1)
        if odd:
            found.append("CPU shares not in [0, 1]: " + ", ".join(f"{k}={self.cpu_share[k]!r}" for k in odd[:5]))
        odd = [s.get("node") for s in self.samples if bad(s.get("ms"))]
        if odd:
            found.append(f"collective samples without a time: {odd[:5]}")
        if graph is not None:
            missing = [n.name for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")
                       and not is_communication(n) and n.name not in self.node_ms]
            if missing:
                found.append(f"no time for {len(missing)} node(s) of the graph: {missing[:5]}")
        return found

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "node_ms": dict(self.node_ms),
            "comm": {k: [c.alpha, c.beta, c.floor] for k, c in sorted(self.comm.items())},
            "samples": [dict(s) for s in self.samples],
            "cpu_share": dict(sorted(self.cpu_share.items())),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"cost model schema {data.get('schema')!r}, expected {SCHEMA}")
        return cls(
            node_ms={str(k): float(v) for k, v in data["node_ms"].items()},
            comm={str(k): LinearCost(*(float(x) for x in v)) for k, v in data["comm"].items()},
            samples=[dict(s) for s in data["samples"]],
            cpu_share={str(k): float(v) for k, v in data.get("cpu_share", {}).items()},  # absent before it existed
        )

    def to_json(self) -> str:
        """JSON text (``{"schema", "node_ms", "comm": {key: [alpha, beta]}, "samples", "cpu_share"}``)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> "CostModel":
        """Inverse of :meth:`to_json` (also accepts the parsed dict); ``ValueError`` on a schema mismatch."""
        return cls.from_dict(json.loads(text) if isinstance(text, (str, bytes)) else text)


def _first_difference(a: list[str], b: list[str]) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return f"only in the first: {only_a[:5]}, only in the second: {only_b[:5]}"


def agree(costs: CostModel, key: str) -> CostModel:
    """Every rank gets the same model: node times, each link model's alpha and beta and the CPU shares are the
    MAX over ranks (deterministic, and pessimistic: the slowest rank sets the pace of a synchronous step), ``samples`` every
    rank's in rank order. ``key`` names the agreement (unique to the graph, planning epoch and degree).

    It goes over the control plane (``runtime.control.meet``), the one channel the ranks agree on everything
    through: a rank that never comes fails the others within seconds, naming it and what it is doing, and no
    process-group collective is issued from inside a compiled graph's call. ``costs`` unchanged without
    torch.distributed or with one rank. The node and link lists must be identical (ranks run the same
    graph): a mismatch raises ``ValueError`` naming both ranks on every rank.
    """
    from fsmoe_compiler.runtime import control

    names, keys = sorted(costs.node_ms), sorted(costs.comm)
    mine = (names, keys, [costs.node_ms[n] for n in names],
            [(costs.comm[k].alpha, costs.comm[k].beta, costs.comm[k].floor) for k in keys],
            [dict(s) for s in costs.samples],
            dict(costs.cpu_share))
    everyone = control.meet(key, mine, what="the cost model")
    if len(everyone) == 1:
        return costs
    for r, (their_names, their_keys, *_rest) in enumerate(everyone):
        if (their_names, their_keys) != (names, keys):
            raise ValueError(
                f"ranks profiled different graphs: rank {r} and rank {control.rank()} disagree on the cost keys "
                f"(nodes {_first_difference(their_names, names)}; links {_first_difference(their_keys, keys)})")
    node_ms = {n: max(e[2][i] for e in everyone) for i, n in enumerate(names)}
    comm = {k: LinearCost(*(max(max(e[3][i][j] for e in everyone), 0.0) for j in range(3)))
            for i, k in enumerate(keys)}
    samples = [dict(s) for e in everyone for s in e[4]]
    share = {k: max(e[5].get(k, 0.0) for e in everyone) for k in sorted({k for e in everyone for k in e[5]})}
    return CostModel(node_ms=node_ms, comm=comm, samples=samples, cpu_share=share)

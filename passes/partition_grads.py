"""``partition_grads``: the backward graph's gradient all-reduces merged into partitions the schedule chooses.

Averaging gradients inside backward (``moe.parallel.sync_gradients_in_graph``)
puts one all-reduce per parameter in the backward graph: each can start as
soon as its gradient exists, but each pays the link's fixed cost ``alpha``,
and a model with many small dense parameters (norms, biases) pays it many
times. One bucket after backward pays it once but cannot start before the
last gradient. FSMoE partitions the gradients in between; here the partitions
are consecutive runs, in the order the gradients appear in the graph, of
all-reduces of one process group, reduce op and dtype, filled up to a byte
cap. Each partition becomes one all-reduce of a flat buffer (``cat`` of the
flattened gradients), issued where its last gradient exists, whose result is
sliced and viewed back into each gradient: the same sums, element by element.

``cap="auto"`` prices each candidate cap (``CANDIDATE_CAPS``) with the measured
costs (``ctx.costs``: the group's ``alpha + beta * bytes``, the compute around
it) by building its task graph and list-scheduling it, and keeps the fastest
(per-parameter wins ties). Every rank holds the same graph and the same
agreed costs, so every rank picks the same partitions. All-reduces of a MoE
region, of unknown size, or whose result is used in place are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from fsmoe_compiler.names import ALL_REDUCE
from fsmoe_compiler.ops import collective_group, collective_kind, is_collective, is_wait
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.graph_utils import apply_order, copy_graph_module, numel

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

#: Byte caps ``"auto"`` compares (besides per-parameter, cap 0): 256 KiB, 1 MiB, 4 MiB and one bucket per group.
CANDIDATE_CAPS: tuple[float, ...] = (256 * 1024, 1 << 20, 4 << 20, float("inf"))


@dataclass
class GradReduce:
    """One gradient all-reduce of the graph: its start and wait nodes, what it reduces, and how big it is."""

    start: fx.Node
    wait: fx.Node
    group: str | None
    op: str
    dtype: torch.dtype
    numel: int
    nbytes: int

    def key(self) -> tuple:
        """What a partition's members share: process group, reduce op, dtype."""
        return (self.group, self.op, self.dtype)


def gradient_reduces(gm: fx.GraphModule, region_nodes: set[str] = frozenset()) -> list[GradReduce]:
    """The all-reduces ``partition_grads`` may merge, in graph order: outside ``region_nodes``, of a static size,
    with exactly one wait whose value is read, never written."""
    out = []
    for n in gm.graph.nodes:
        if not is_collective(n) or collective_kind(n) != ALL_REDUCE or n.name in region_nodes:
            continue
        waits = [u for u in n.users if is_wait(u)]
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        count = numel(src) if src is not None else None
        val = src.meta.get("val") if src is not None else None
        if len(waits) != 1 or len(n.users) != 1 or not count or not isinstance(val, torch.Tensor):
            continue
        if any(getattr(u.target, "_schema", None) is not None and u.target._schema.is_mutable
               for u in waits[0].users):
            continue
        out.append(GradReduce(n, waits[0], collective_group(n), str(n.args[1]), val.dtype, int(count),
                              int(count) * val.element_size()))
    return out


def partitions(reduces: list[GradReduce], cap: float) -> list[list[GradReduce]]:
    """Consecutive runs of ``reduces`` with the same key, each filled while its bytes stay within ``cap`` (a
    gradient over the cap is a partition of its own); cap 0: one partition per all-reduce."""
    parts: list[list[GradReduce]] = []
    filled = 0  # bytes in parts[-1]
    for r in reduces:
        if parts and parts[-1][0].key() == r.key() and filled + r.nbytes <= cap:
            parts[-1].append(r)
            filled += r.nbytes
        else:
            parts.append([r])
            filled = r.nbytes
    return parts


def merge(gm: fx.GraphModule, part: list[GradReduce], index: int) -> fx.Node:
    """Rewrite one partition of several all-reduces into one over a flat buffer; returns its new all-reduce.

    The new nodes go after the partition's last all-reduce (where its last
    gradient exists); each member's wait is replaced by a view of a slice of
    the new wait. Users of an earlier member now come before their input:
    :func:`apply_partitions` puts the graph back in topological order.
    """
    graph = gm.graph
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    fake = detect_fake_mode(vals) or FakeTensorMode(allow_non_fake_inputs=True)
    last = part[-1].start

    def call(target: Any, args: tuple, name: str) -> fx.Node:
        real = fx.node.map_aggregate(args, lambda a: a.meta["val"] if isinstance(a, fx.Node) else a)
        node = graph.call_function(target, args, name=name)
        with fake:
            node.meta["val"] = target(*real)
        return node

    members = [m.start.name for m in part]
    with graph.inserting_after(last):
        flats = []
        for m in part:
            flats.append(call(aten.view.default, (m.start.args[0], [-1]), f"{m.start.name}_flat"))
    with graph.inserting_after(flats[-1]):
        flat = call(aten.cat.default, (flats,), f"grad_partition{index}")
    with graph.inserting_after(flat):
        start = call(c10d.all_reduce.default, (flat, part[0].op, part[0].group), f"all_reduce_partition{index}")
    start.meta["fsmoe"] = {"merged": members}  # verify counts it as its members
    with graph.inserting_after(start):
        wait = call(c10d.wait_tensor.default, (start,), f"wait_partition{index}")
    offset, cursor = 0, wait
    for m in part:
        with graph.inserting_after(cursor):
            piece = call(aten.slice.Tensor, (wait, 0, offset, offset + m.numel), f"{m.start.name}_part")
        with graph.inserting_after(piece):
            view = call(aten.view.default, (piece, list(m.wait.meta["val"].shape)), f"{m.wait.name}_part")
        m.wait.replace_all_uses_with(view)
        offset, cursor = offset + m.numel, view
    for m in part:
        graph.erase_node(m.wait)
        graph.erase_node(m.start)
    return start


def apply_partitions(gm: fx.GraphModule, parts: list[list[GradReduce]]) -> int:
    """Merge every partition of more than one all-reduce; how many all-reduces there are left of them."""
    for i, part in enumerate(p for p in parts if len(p) > 1):
        merge(gm, part, i)
    apply_order(gm, _stable_topological(gm.graph))
    return len(parts)


def _stable_topological(graph: fx.Graph) -> list[fx.Node]:
    """A topological order of ``graph``'s nodes that keeps every node where it was unless an input now comes
    later (the first such order by position, placeholders first): the rest keeps the order it was traced in."""
    pos = {n: i for i, n in enumerate(graph.nodes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((a, n) for n in graph.nodes for a in n.all_input_nodes)
    first = {"placeholder": 0, "output": 2}
    return list(nx.lexicographical_topological_sort(dag, key=lambda n: (first.get(n.op, 1), pos[n])))


def _region_nodes(ctx: PassContext) -> set[str]:
    return {name for r in ctx.regions.get(ctx.graph_kind, []) for names in r.nodes.values() for name in names}


def _priced(gm: fx.GraphModule, ctx: PassContext, cap: float) -> float:
    """The makespan of the list schedule of ``gm`` with ``cap``'s partitions applied to a copy."""
    from fsmoe_compiler.passes.taskgraph import build_taskgraph
    from fsmoe_compiler.scheduler import heuristic_schedule

    trial = copy_graph_module(gm)
    apply_partitions(trial, partitions(gradient_reduces(trial, _region_nodes(ctx)), cap))
    costs = ctx.costs
    tg, _ = build_taskgraph(trial, costs.node_cost, ctx.graph_kind, getattr(costs, "cpu_ms", None))
    return heuristic_schedule(tg).makespan


@graph_pass(uses=("costs", "regions"))
def partition_grads(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Merge the backward graph's gradient all-reduces into partitions (``config.grad_partition``: "off", a
    byte cap, or "auto": the cap whose schedule the measured costs price fastest); a note says what was done."""
    setting = ctx.config.grad_partition
    if setting == "off" or ctx.graph_kind != "backward":
        return gm
    reduces = gradient_reduces(gm, _region_nodes(ctx))
    if len(reduces) < 2:
        return gm
    if setting == "auto":
        if ctx.costs is None:
            ctx.notes.append("gradient partitioning: no cost model to choose a cap; per parameter")
            return gm
        priced = {cap: _priced(gm, ctx, cap) for cap in (0.0, *CANDIDATE_CAPS)}
        cap = min(priced, key=lambda c: (priced[c], c))
        detail = ", ".join(f"{_cap_words(c)} {ms:.3f} ms" for c, ms in priced.items())
    else:
        cap, detail = float(setting), "fixed by the option"
    parts = partitions(reduces, cap)
    if len(parts) == len(reduces):
        ctx.notes.append(f"gradient partitioning: {len(reduces)} all-reduces kept per parameter ({detail})")
        return gm
    apply_partitions(gm, parts)
    ctx.notes.append(f"gradient partitioning: {len(reduces)} gradient all-reduces merged into {len(parts)} "
                     f"partitions of at most {_cap_words(cap)} ({detail})")
    return gm


def _cap_words(cap: float) -> str:
    if cap == 0:
        return "per parameter"
    if cap == float("inf"):
        return "one bucket per group"
    return f"{cap / 1024:.0f} KiB"

"""Apply a ``Schedule`` to an FX graph: reorder the nodes and tag each with its task and stream.

The new order is a topological order of ALL nodes built from three rules:

* compute tasks run in the schedule's compute order, each task's nodes in their
  original (topological) order;
* each collective start is issued as early as its inputs allow, but never before the
  collective that precedes it on its link or in its process group in the schedule's
  order: the issue order per group follows the schedule and is a pure function of the
  graph and the schedule, hence identical on every rank (ranks that issue collectives
  in different orders deadlock);
* each ``wait_tensor`` is placed as late as possible: right before its first user in
  the new order (or at a barrier, or before the output). A collective that would put
  more than ``max_in_flight_bytes`` of collective buffers in flight is issued once an
  outstanding wait has been placed (or, when something needs it first, right after the
  oldest waits). The same rule keeps an all-gather on gloo alone in flight
  (``ops.GLOO_ALONE_OPS``: PyTorch's gloo all-gather corrupts memory beside another collective).

Barriers (``passes.taskgraph.classify_nodes``: ops with communication or other side
effects the scheduler does not model) keep their place: nothing moves across one; a
collective after a barrier is not issued before it and every outstanding wait is
placed before it.

The schedule's per-resource orders are first made consistent with the task
dependencies (a lexicographic topological sort of the tasks keyed by the schedule's
start times), so that a valid schedule is applied exactly and even an inconsistent one
yields a valid graph.

On CUDA nothing more is needed for overlap: functional collectives run on the
communicator's stream and ``wait_tensor`` makes the compute stream wait on their event
(see ``passes/streams.py``). On CPU (gloo) collectives run on gloo's threads and
``wait_tensor`` blocks: the deferred waits are the overlap.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import networkx as nx
import torch.fx as fx

from fsmoe_compiler.names import COMM_STREAM, COMPUTE_STREAM, SEQUENTIAL
from fsmoe_compiler.ops import collective_bytes, flies_alone, is_communication
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.graph_utils import apply_order
from fsmoe_compiler.passes.taskgraph import TaskMap
from fsmoe_compiler.scheduler import Schedule


class AnnotateError(ValueError):
    """The schedule or task map does not fit the graph."""


def task_order(schedule: Schedule, taskmap: TaskMap) -> list[str]:
    """All tasks in one topological order that follows the schedule (start time, then per-resource order)."""
    rank = {t: i for ts in schedule.order.values() for i, t in enumerate(ts)}
    first = taskmap.first_pos()
    missing = [t for t in taskmap.nodes_of if t not in schedule.start]
    if missing:
        raise AnnotateError(f"schedule has no start for task(s) {missing[:3]}; was it solved for this task graph?")
    dag = nx.DiGraph()
    dag.add_nodes_from(taskmap.nodes_of)
    dag.add_edges_from(taskmap.deps)
    inf = float("inf")

    def key(t: str) -> tuple:
        return (schedule.start.get(t, inf), rank.get(t, len(rank)), first.get(t, 0), t)

    return list(nx.lexicographical_topological_sort(dag, key=key))


def footprint_bytes(start: fx.Node, costs: Any = None) -> int:
    """Bytes a collective keeps alive from its issue to its wait: its inputs and outputs (PyTorch's own
    estimate, halved for an in-place all-reduce). Where the sizes are only known at run time (dropless),
    twice the median bytes the profile saw it send (``costs.observed_bytes``), else 0: PyTorch's fallback
    size for an unknown one (64 MiB a tensor) would hold back exchanges of a few MiB."""
    from torch._inductor.comm_analysis import estimate_fx_collective_memory_footprint

    if collective_bytes(start):
        return int(estimate_fx_collective_memory_footprint(start))
    observed = getattr(costs, "observed_bytes", None)
    return 2 * int(observed(start)) if observed is not None else 0


def order_nodes(gm: fx.GraphModule, schedule: Schedule, taskmap: TaskMap, *, sync_collectives: bool = False,
                max_in_flight_bytes: int | None = None, held: list[str] | None = None, costs: Any = None,
                alone: set[str] | None = None, held_alone: list[str] | None = None) -> list[fx.Node]:
    """The new node order of ``gm`` under ``schedule`` (placeholders first, output last); pure.

    ``sync_collectives`` places each wait right after its start (no overlap at all: the
    ``sequential`` baseline, DeepSpeed-MoE style). ``max_in_flight_bytes`` bounds the
    ``footprint_bytes`` of the collectives issued and not yet waited on: one that would go over it is
    issued once an outstanding wait is placed, or, when something needs it first, after the oldest
    waits; their names are appended to ``held``. A collective task in ``alone`` is issued only with nothing
    else in flight, and nothing is issued while it is (the same rule; names appended to ``held_alone``).
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    by_name = {n.name: n for n in nodes}
    for n in nodes:
        if n.op not in ("placeholder", "get_attr", "output") and n.name not in taskmap.task_of:
            raise AnnotateError(f"node {n.name} is in no task; the task map was built for another graph")
    unknown = [name for name in taskmap.task_of if name not in by_name]
    if unknown:
        raise AnnotateError(f"task map names node(s) {unknown[:3]} that are not in the graph")

    torder = task_order(schedule, taskmap)
    barriers = set(taskmap.barriers)
    compute_tasks = [t for t in torder if taskmap.resource[t] == "compute"]
    coll_tasks = [t for t in torder if t in taskmap.collective]
    start_of = {t: by_name[taskmap.collective[t][0]] for t in coll_tasks}
    wait_of = {t: by_name[taskmap.collective[t][1]] for t in coll_tasks}
    start_of_wait = {wait_of[t]: start_of[t] for t in coll_tasks}
    # issue queues: per link resource and per process group, both restrictions of one task order
    res_q: dict[str, deque] = {}
    grp_q: dict[object, deque] = {}
    for t in coll_tasks:
        res_q.setdefault(taskmap.resource[t], deque()).append(t)
        grp_q.setdefault(taskmap.group.get(t), deque()).append(t)
    segment = {by_name[k]: v for k, v in taskmap.segment.items() if k in by_name}

    out: list[fx.Node] = []
    emitted: set[fx.Node] = set()
    outstanding: list[fx.Node] = []  # waits of issued collectives not yet placed, in issue order
    cur_seg = 0
    alone = {t for t in (alone or ()) if t in wait_of}
    alone_waits = {wait_of[t] for t in alone}
    # a synchronous wait leaves nothing in flight
    bounded = (bool(max_in_flight_bytes) or bool(alone)) and not sync_collectives
    size = {wait_of[t]: footprint_bytes(start_of[t], costs) for t in coll_tasks} if max_in_flight_bytes else {}
    starts = set(start_of.values())

    def emit(n: fx.Node) -> None:
        out.append(n)
        emitted.add(n)

    for n in nodes:
        if n.op in ("placeholder", "get_attr"):
            emit(n)

    def available(a: fx.Node) -> bool:
        return a in emitted or (a in start_of_wait and start_of_wait[a] in emitted)

    def pull_inputs(n: fx.Node) -> None:
        for a in n.all_input_nodes:
            start = start_of_wait.get(a, a)  # a wait's collective, or the node itself
            if bounded and start in starts and start not in emitted:
                flush(need=start)  # a collective the bound held back is needed now (its wait, or a size read off it)
            if a in emitted:
                continue
            if a in start_of_wait and start_of_wait[a] in emitted:
                emit(a)
                outstanding.remove(a)
                continue
            raise AnnotateError(f"node {n.name} needs {a.name}, which the schedule places later")

    def blocked(t: str) -> str | None:
        """Why ``t`` cannot be issued now ("alone", "bytes"), or None."""
        if not outstanding:
            return None
        if t in alone or alone_waits.intersection(outstanding):
            return "alone"
        if max_in_flight_bytes and sum(size[w] for w in outstanding) + size[wait_of[t]] > max_in_flight_bytes:
            return "bytes"
        return None

    def flush(need: fx.Node | None = None, force: bool = False) -> None:
        """Issue every collective whose turn has come; one over the in-flight bound waits until an outstanding
        wait is placed, unless ``force`` or ``need`` (until that start is issued): then the oldest waits go first."""
        progress = True
        while progress:
            progress = False
            for r in sorted(res_q):
                q = res_q[r]
                while q:
                    t = q[0]
                    s = start_of[t]
                    g = grp_q[taskmap.group.get(t)]
                    if g[0] != t or segment.get(s, 0) > cur_seg or not all(available(a) for a in s.all_input_nodes):
                        break
                    why = blocked(t) if bounded else None
                    if why is not None:
                        note = held_alone if why == "alone" else held
                        if note is not None and s.name not in note:
                            note.append(s.name)
                        if not (force or (need is not None and need not in emitted)):
                            break
                        while blocked(t) is not None:
                            emit(outstanding.pop(0))
                    pull_inputs(s)
                    emit(s)
                    if sync_collectives:
                        emit(wait_of[t])
                    else:
                        outstanding.append(wait_of[t])
                    q.popleft()
                    g.popleft()
                    progress = True

    flush()
    for t in compute_tasks:
        flush()
        if t in barriers:
            flush(force=True)
            late = [t2 for q in res_q.values() for t2 in q if segment.get(start_of[t2], 0) <= cur_seg]
            if late:
                raise AnnotateError(f"collective(s) {late[:3]} before barrier {t} could not be issued before it")
            for w in list(outstanding):
                emit(w)
            outstanding.clear()
        for name in taskmap.nodes_of[t]:
            n = by_name[name]
            pull_inputs(n)
            emit(n)
            flush()
        if t in barriers:
            cur_seg += 1
            flush()
    flush(force=True)
    left = [t for q in res_q.values() for t in q]
    if left:
        raise AnnotateError(f"collective(s) {left[:3]} could never be issued")
    for w in outstanding:
        emit(w)
    out.append(graph.output_node())
    if len(out) != len(nodes):  # pragma: no cover - every node is a placeholder, in a task, or the output
        raise AnnotateError(f"ordered {len(out)} of {len(nodes)} nodes")
    return out


def write_meta(gm: fx.GraphModule, taskmap: TaskMap) -> None:
    """``meta["fsmoe"]["task"]`` and ``["stream"]`` (``comm`` for collectives and their waits, barriers that
    communicate included) on every task node."""
    comm = {name for t, pair in taskmap.collective.items() for name in pair}
    comm |= {n.name for n in gm.graph.nodes if is_communication(n)}  # unmodelled ones (barriers) too
    for n in gm.graph.nodes:
        t = taskmap.task_of.get(n.name)
        if t is None:
            continue
        old = n.meta.get("fsmoe")
        meta = dict(old) if isinstance(old, dict) else {}  # a copy: the chunk pass may share meta dicts
        meta["task"] = t
        meta["stream"] = COMM_STREAM if n.name in comm else COMPUTE_STREAM
        n.meta["fsmoe"] = meta


@graph_pass(uses=("schedule", "taskmap", "costs"))
def annotate(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Pass: reorder ``gm`` by ``ctx.schedule`` / ``ctx.taskmap`` and write task/stream metadata.

    With the ``sequential`` scheduler option the graph is left as traced (the
    baseline runs as written). Otherwise a schedule
    whose ``method`` is ``"sequential"`` (or whose ``meta["sync_collectives"]`` is
    true) gets every wait right after its collective: the no-overlap baseline.
    Without a schedule or task map the graph is left alone and the report says why
    (``ctx.strict`` makes that an error).
    """
    if ctx.config.scheduler == SEQUENTIAL:
        return gm
    schedule, taskmap = ctx.schedule, ctx.taskmap
    if schedule is None or taskmap is None:
        why = f"{ctx.graph_kind}: annotate skipped (no {'schedule' if schedule is None else 'task map'})"
        if ctx.strict:
            raise AnnotateError(why)
        ctx.notes.append(why)
        return gm
    sync = schedule.method == "sequential" or bool(schedule.meta.get("sync_collectives", False))
    bound_mb = ctx.config.max_in_flight_mb
    held: list[str] = []
    held_alone: list[str] = []
    by_name = {n.name: n for n in gm.graph.nodes}
    alone = {t for t, (start, _) in taskmap.collective.items() if start in by_name and flies_alone(by_name[start])}
    order = order_nodes(gm, schedule, taskmap, sync_collectives=sync, held=held, costs=ctx.costs,
                        max_in_flight_bytes=None if bound_mb is None else int(bound_mb * 2**20),
                        alone=alone, held_alone=held_alone)
    apply_order(gm, order)
    write_meta(gm, taskmap)
    ctx.notes.append(f"{ctx.graph_kind}: nodes ordered by the {schedule.method or 'given'} schedule "
                     f"({len(taskmap.nodes_of)} tasks, makespan {schedule.makespan:.3f} ms predicted)")
    if held:
        ctx.notes.append(f"{ctx.graph_kind}: {len(held)} collective(s) issued later than the schedule asks, to keep "
                         f"at most {bound_mb:g} MB of collective buffers in flight (max_in_flight_mb): "
                         + ", ".join(held[:4]) + (" ..." if len(held) > 4 else ""))
    if held_alone:
        ctx.notes.append(f"{ctx.graph_kind}: {len(held_alone)} collective(s) issued later than the schedule asks, so "
                         f"that no all-gather on gloo shares the link with another collective (gloo's "
                         f"all_gather_into_tensor corrupts memory then): "
                         + ", ".join(held_alone[:4]) + (" ..." if len(held_alone) > 4 else ""))
    return gm

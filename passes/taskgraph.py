"""FX graph -> the scheduler's ``TaskGraph``, with the map from tasks back to nodes.

What becomes a task
    * Every functional collective (``_c10d_functional.all_to_all_single``,
      ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_reduce``) together
      with its ``wait_tensor`` is ONE task on a link resource; its duration is
      ``cost(start)`` (the wait is the synchronisation, not work).
    * Compute nodes are grouped. Nodes of an MoE region (``meta["fsmoe"]["layer"]``
      set by recognize / chunk) are keyed by ``(layer, chunk, nearest upstream
      collective, nearest downstream collective)``: in the backward the expert
      weight gradients (no downstream collective) form a task separate from the
      input-gradient chain that feeds the next all-to-all, which is what lets the
      scheduler run dW after dX. Other compute nodes form maximal runs in the
      original order between region nodes, collectives and barriers; in the
      backward a run is split further by its nodes' nearest downstream
      collective (dense weight gradients apart from the input-gradient chain).
    * Free nodes (views, ``getitem``) cost nothing and join the task of their compute
      users in the same segment when those are all in one task (so tasks are not
      littered with zero-length views); so do nodes outside every region whose users
      all belong to one layer's region (an ``arange`` or ``full_like`` the recogniser
      left unlabelled). One used by several tasks joins the task of what it views, or
      else one zero-work task per viewed node (a view of a wait read by both dX and
      dW must not make dX wait for dW). Placeholders, ``get_attr`` and the output
      belong to no task.
    * Any op whose effects the scheduler does not model is a BARRIER task: other
      ``c10d`` / ``_c10d_functional`` ops (in-place collectives, coalesced ops, a
      collective without exactly one ``wait_tensor``), ops in other distributed
      namespaces, side-effectful ops other than asserts, ``call_module``, and ops that
      mutate an argument (aot_autograd's ``copy_`` epilogue). Every task before a
      barrier precedes it and every task after it follows it, so nothing moves across.
    * Random ops keep their relative order (chain dependencies), so a reordered graph
      draws the same random numbers as the original.

Resources
    A link resource runs one transfer at a time, as one process group does (one NCCL
    stream / one gloo queue per group). Collectives of a process group used by an
    all-to-all or an all-reduce run on ``inter``; a group used only by all-gather /
    reduce-scatter (expert sharding) runs on ``intra``. When every collective uses one
    group (one link, e.g. gloo on one host), everything lands on ``inter``.

Grouping must give a DAG of tasks: each group is first made *convex* (no path leaves
the group and comes back), and if the contracted graph still has a cycle the largest
group on it is halved in graph order (down to single nodes if need be); networkx checks.

Task ids are readable and stable (they depend on the graph, never on the costs):
``F.L0.c1.a2a0`` (collective 0 of kind a2a of layer 0, chunk 1), ``B.L1.c0.compute2``,
``F.L0.compute0`` (region node outside any chunk), ``F.dense3``, ``B.ar0``, ``F.barrier0``.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import torch.fx as fx

from fsmoe_compiler.names import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, SHORT
from fsmoe_compiler.ops import (ALIAS_OPS, ASSERT_OPS, DISTRIBUTED_NAMESPACES, MATMUL_OPS, SIZE_QUERY_OPS,
                                collective_group, collective_kind, is_collective, is_modeled_collective, is_mutating,
                                is_random, is_redundant_wait, is_wait, namespace)
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.graph_utils import nbytes
from fsmoe_compiler.scheduler import TaskGraph

# Node kinds (see classify_nodes).
INPUT, OUTPUT, COLLECTIVE, WAIT, BARRIER, COMPUTE = "input", "output", "collective", "wait", "barrier", "compute"

Cost = Callable[[fx.Node], float]


@dataclass
class TaskMap:
    """How tasks map back to FX nodes (and what ``passes.annotate`` needs to apply a schedule).

    ``task_of``: node name -> task id (every node except placeholders, ``get_attr`` and
    the output); ``nodes_of``: task id -> node names in graph order. ``resource``: task
    -> resource; ``collective``: collective task -> (start node, wait node) names;
    ``group``: collective task -> process-group name; ``barriers``: barrier task ids in
    graph order; ``segment``: node name -> number of barriers before it; ``position``:
    node name -> index in the graph as built from; ``deps``: the
    task dependencies (those of the TaskGraph).
    """

    task_of: dict[str, str]
    nodes_of: dict[str, list[str]]
    phase: str = "forward"
    resource: dict[str, str] = field(default_factory=dict)
    collective: dict[str, tuple[str, str]] = field(default_factory=dict)
    group: dict[str, str | None] = field(default_factory=dict)
    barriers: list[str] = field(default_factory=list)
    segment: dict[str, int] = field(default_factory=dict)
    position: dict[str, int] = field(default_factory=dict)
    deps: list[tuple[str, str]] = field(default_factory=list)
    # host-CPU task -> its collective's task: compute time the collective takes from the host while in flight
    # (``CostModel.cpu_ms``); such tasks have no nodes and no deps here, only in the TaskGraph
    cpu_of: dict[str, str] = field(default_factory=dict)

    def first_pos(self) -> dict[str, int]:
        """Position (in the graph as built from) of each task's first node."""
        return {t: self.position[names[0]] for t, names in self.nodes_of.items()}


# ---------------------------------------------------------------------------
# node classification
# ---------------------------------------------------------------------------

def is_free(node: fx.Node) -> bool:
    """A node that does no work (a view, ``getitem`` or a wait on a completed tensor): it joins its user's task."""
    return node.op == "call_function" and (node.target in ALIAS_OPS or node.target is operator.getitem
                                           or is_redundant_wait(node))


def classify_nodes(graph: fx.Graph) -> dict[fx.Node, str]:
    """Each node's kind: input, output, collective (modelled start), wait (its wait), barrier or compute."""
    kinds: dict[fx.Node, str] = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            kinds[n] = INPUT
        elif n.op == "output":
            kinds[n] = OUTPUT
        elif is_collective(n):
            users = [u for u in n.users if u.target not in SIZE_QUERY_OPS]  # reading the output's size is fine
            ok = (is_modeled_collective(n) and len(users) == 1 and is_wait(users[0]) and users[0].args[0] is n)
            kinds[n] = COLLECTIVE if ok else BARRIER
        elif is_redundant_wait(n):
            kinds[n] = COMPUTE  # the identity: no communication left to order
        elif is_wait(n):
            src = n.args[0] if n.args else None
            kinds[n] = WAIT if isinstance(src, fx.Node) and kinds.get(src) == COLLECTIVE else BARRIER
        elif n.op == "call_module" or namespace(n) in DISTRIBUTED_NAMESPACES:
            kinds[n] = BARRIER
        elif n.op == "call_function" and n.target not in ASSERT_OPS and (
                n.target in fx.node._side_effectful_functions or is_mutating(n)):
            kinds[n] = BARRIER
        else:
            kinds[n] = COMPUTE
    return kinds


def _meta(node: fx.Node) -> dict:
    m = node.meta.get("fsmoe")
    return m if isinstance(m, dict) else {}


def _layer(node: fx.Node) -> int | None:
    v = _meta(node).get("layer")
    return v if isinstance(v, int) else None


def _chunk(node: fx.Node) -> int | None:
    v = _meta(node).get("chunk")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# ---------------------------------------------------------------------------
# grouping
# ---------------------------------------------------------------------------

def _nearest_collectives(nodes: list[fx.Node], kinds: dict[fx.Node, str], pos: dict[fx.Node, int]
                         ) -> tuple[dict[fx.Node, fx.Node | None], dict[fx.Node, fx.Node | None]]:
    """For each node: the latest collective upstream of it and the earliest one downstream."""
    up: dict[fx.Node, fx.Node | None] = {}
    for n in nodes:
        best = None
        for a in n.all_input_nodes:
            c = a.args[0] if kinds[a] == WAIT else up.get(a)
            if c is not None and (best is None or pos[c] > pos[best]):
                best = c
        up[n] = best
    down: dict[fx.Node, fx.Node | None] = {}
    for n in reversed(nodes):
        best = None
        for u in n.users:
            c = u if kinds[u] == COLLECTIVE else down.get(u)
            if c is not None and (best is None or pos[c] < pos[best]):
                best = c
        down[n] = best
    return up, down


def _group_keys(nodes: list[fx.Node], kinds: dict[fx.Node, str], seg: dict[fx.Node, int],
                pos: dict[fx.Node, int], split_runs: bool = False) -> dict[fx.Node, tuple]:
    """A grouping key for every compute node (see the module docstring).

    ``split_runs`` (the backward) also splits each run outside the regions by
    the nearest downstream collective, so weight gradients that feed only a
    gradient all-reduce or the output are tasks apart from the chain that
    feeds the next all-to-all, and can be run while it waits.
    """
    up, down = _nearest_collectives(nodes, kinds, pos)
    follows = {n for n in nodes if kinds[n] == COMPUTE and is_free(n)
               and any(kinds[u] == COMPUTE and seg[u] == seg[n] for u in n.users)}
    # nodes outside every region that only feed one layer's region (an ``arange``, a ``full_like`` of a
    # routing tensor, the recogniser's unlabelled helpers) join that layer instead of splitting its tasks
    into_layer: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        if _layer(n) is not None:
            into_layer[n] = _layer(n)
            continue
        if kinds[n] != COMPUTE or not n.users:
            continue
        layers = {into_layer.get(u) if kinds[u] == COMPUTE and seg[u] == seg[n] else None for u in n.users}
        if len(layers) == 1 and None not in layers:
            into_layer[n] = layers.pop()
            follows.add(n)
    key: dict[fx.Node, tuple] = {}
    run = -1
    open_run = False
    for n in nodes:
        k = kinds[n]
        if k == INPUT or n in follows:
            continue
        if k != COMPUTE:
            open_run = False
            continue
        layer = _layer(n)
        if layer is not None:
            open_run = False
            key[n] = ("region", seg[n], layer, _chunk(n), up[n].name if up[n] is not None else None,
                      down[n].name if down[n] is not None else None)
        else:
            if not open_run:
                run += 1
                open_run = True
            key[n] = ("run", seg[n], run, (down[n].name if down[n] is not None else None) if split_runs else None)
    # followers join their users' task when all users are in one; else the task of what they view (a view is
    # an alias: its users depend on its producer anyway, so that adds no dependency), or one zero-work task
    # per producer (views of a wait that both dX and dW read must not tie dX to dW)
    user_keys: dict[fx.Node, set] = {}
    for n in reversed(nodes):
        if n in follows:
            ks: set = set()
            for u in n.users:
                if kinds[u] == COMPUTE and seg[u] == seg[n]:
                    ks |= user_keys[u] if u in follows else {key[u]}
            user_keys[n] = ks
    for n in nodes:
        if n in follows:
            if len(user_keys[n]) == 1:
                key[n] = next(iter(user_keys[n]))
                continue
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else (
                n.all_input_nodes[0] if n.all_input_nodes else None)
            if src is not None and src in key and seg[src] == seg[n]:
                key[n] = key[src]
            else:
                key[n] = ("shared", seg[n], src.name if src is not None else n.name, _layer(n), _chunk(n))
    return key


def _successors(nodes: list[fx.Node], kinds: dict[fx.Node, str]) -> dict[fx.Node, list[fx.Node]]:
    """Node-level edges: data flow plus the chain that keeps random ops in order."""
    succ = {n: list(n.users) for n in nodes}
    rng = [n for n in nodes if kinds[n] == COMPUTE and is_random(n)]
    for a, b in zip(rng, rng[1:]):
        succ[a].append(b)
    return succ


def _convex_parts(members: list[fx.Node], succ: dict[fx.Node, list[fx.Node]], pos: dict[fx.Node, int]
                  ) -> list[list[fx.Node]]:
    """Split ``members`` (graph order) into parts no path leaves and re-enters.

    X = members reachable from outside nodes that are reachable from the group; the
    rest has no re-entry and no edge comes back to it from X, so it is one part;
    repeat on X.
    """
    parts = []
    rest = members
    while rest:
        inside = set(rest)
        hi = pos[rest[-1]]
        stack = [v for u in rest for v in succ[u] if v not in inside and pos[v] < hi]
        seen: set[fx.Node] = set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            stack.extend(w for w in succ[v] if w not in seen and pos[w] <= hi)
        again = [n for n in rest if n in seen]
        parts.append([n for n in rest if n not in seen])
        rest = again
    return parts


def _contract(groups: list[list[fx.Node]], succ: dict[fx.Node, list[fx.Node]]) -> nx.DiGraph:
    gid = {n: i for i, g in enumerate(groups) for n in g}
    d = nx.DiGraph()
    d.add_nodes_from(range(len(groups)))
    for i, g in enumerate(groups):
        for n in g:
            for v in succ[n]:
                j = gid.get(v)
                if j is not None and j != i:
                    d.add_edge(i, j)
    return d


def acyclic_groups(groups: list[list[fx.Node]], succ: dict[fx.Node, list[fx.Node]], pos: dict[fx.Node, int]
                   ) -> list[list[fx.Node]]:
    """Split groups until contracting each to one task leaves a DAG (groups in graph order)."""
    out = [p for g in groups for p in _convex_parts(g, succ, pos)]
    while True:
        d = _contract(out, succ)
        try:
            cycle = nx.find_cycle(d)
        except nx.NetworkXNoCycle:
            break
        on = {u for u, _ in cycle}
        big = max(on, key=lambda i: (len(out[i]), -i))
        g = out[big]
        if len(g) < 2:  # pragma: no cover - a cycle of single nodes means the FX graph has one
            raise ValueError("the FX graph has a dependency cycle")
        half = len(g) // 2
        out[big:big + 1] = _convex_parts(g[:half], succ, pos) + _convex_parts(g[half:], succ, pos)
    return sorted(out, key=lambda g: pos[g[0]])


# ---------------------------------------------------------------------------
# resources and ids
# ---------------------------------------------------------------------------

def link_resources(starts: list[fx.Node]) -> dict[str | None, str]:
    """Process group -> link resource: ``intra`` for groups that only all-gather / reduce-scatter, else ``inter``."""
    kinds_by_group: dict[str | None, set[str]] = defaultdict(set)
    for s in starts:
        kinds_by_group[collective_group(s)].add(collective_kind(s))
    return {g: ("intra" if ks <= {ALL_GATHER, REDUCE_SCATTER} and len(kinds_by_group) > 1 else "inter")
            for g, ks in kinds_by_group.items()}


def _prefix(phase: str, layer: int | None, chunk: int | None) -> str:
    p = "F" if phase == "forward" else "B"
    if layer is None:
        return p
    return f"{p}.L{layer}" + (f".c{chunk}" if chunk is not None else "")


def _duration(cost: Cost, node: fx.Node) -> float:
    d = cost(node)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 <= d < float("inf")):
        raise ValueError(f"cost of node {node.name} must be a finite number >= 0 (ms), got {d!r}")
    return float(d)


# ---------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------

def build_taskgraph(gm: fx.GraphModule, cost: Cost, phase: str, cpu_cost: Cost | None = None
                    ) -> tuple[TaskGraph, TaskMap]:
    """Turn ``gm`` into a scheduler ``TaskGraph`` plus the ``TaskMap`` back to its nodes.

    ``cost(node)`` gives ms for one node (``CostModel.node_cost`` in production, a
    fixed table in tests); a compute task lasts the sum over its nodes, a collective
    task ``cost(start)``. ``phase`` is ``"forward"`` or ``"backward"``. Where
    ``cpu_cost(start)`` (``CostModel.cpu_ms``) is positive, the collective also
    takes that long of the ``compute`` resource somewhere between its inputs and
    its users (task ``<id>.cpu``): gloo's threads share the host's cores with
    the compute it overlaps.
    """
    if phase not in ("forward", "backward"):
        raise ValueError(f"phase must be 'forward' or 'backward', got {phase!r}")
    graph = gm.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    kinds = classify_nodes(graph)
    seg: dict[fx.Node, int] = {}
    s = 0
    for n in nodes:
        seg[n] = s
        if kinds[n] == BARRIER:
            s += 1
    key = _group_keys(nodes, kinds, seg, pos, split_runs=phase == "backward")
    succ = _successors(nodes, kinds)

    by_key: dict[tuple, list[fx.Node]] = {}
    for n in nodes:
        if n in key:
            by_key.setdefault(key[n], []).append(n)
    compute_groups = acyclic_groups(list(by_key.values()), succ, pos)

    starts = [n for n in nodes if kinds[n] == COLLECTIVE]
    link = link_resources(starts)

    # units in graph order of their first node: ("compute", nodes) / ("collective", [start, wait]) / ("barrier", [n])
    units: list[tuple[str, list[fx.Node]]] = [("compute", g) for g in compute_groups]
    units += [("collective", [n, next(u for u in n.users if kinds[u] == WAIT)]) for n in starts]
    units += [("barrier", [n]) for n in nodes if kinds[n] == BARRIER]
    units.sort(key=lambda u: pos[u[1][0]])

    tg = TaskGraph(name=f"{phase} {len(nodes)} nodes")
    tm = TaskMap(task_of={}, nodes_of={}, phase=phase)
    counters: Counter = Counter()
    for unit_kind, members in units:
        head = members[0]
        if unit_kind == "collective":
            start, wait = members
            kind = collective_kind(start)
            layer = _layer(start) if _layer(start) is not None else _layer(wait)
            chunk = _chunk(start) if _chunk(start) is not None else _chunk(wait)
            pre = _prefix(phase, layer, chunk if layer is not None else None)
            tid = f"{pre}.{SHORT[kind]}{counters[(pre, kind)]}"
            counters[(pre, kind)] += 1
            role = _meta(start).get("role") or _meta(wait).get("role") or (
                "grad_sync" if kind == ALL_REDUCE and phase == "backward" else kind)
            group = collective_group(start)
            res = link[group]
            b = nbytes(start.args[0]) if isinstance(start.args[0], fx.Node) else None
            tg.add(tid, kind, res, _duration(cost, start), size=float(b or 0), layer=-1 if layer is None else layer,
                   chunk=-1 if chunk is None else chunk, role=role, phase=phase)
            tm.collective[tid] = (start.name, wait.name)
            tm.group[tid] = group
        elif unit_kind == "barrier":
            tid = f"{_prefix(phase, None, None)}.barrier{counters['barrier']}"
            counters["barrier"] += 1
            tg.add(tid, "barrier", "compute", _duration(cost, head), layer=-1, role="barrier", phase=phase)
            tm.barriers.append(tid)
            res = "compute"
        else:
            layers = {_layer(n) for n in members} - {None}
            layer = min(layers) if len(layers) == 1 else None
            chunks = {_chunk(n) for n in members if _layer(n) is not None}
            chunk = next(iter(chunks)) if len(chunks) == 1 and layer is not None else None
            if layer is None:
                pre, name = _prefix(phase, None, None), "dense"
            else:
                pre, name = _prefix(phase, layer, chunk), "compute"
            tid = f"{pre}.{name}{counters[(pre, name)]}"
            counters[(pre, name)] += 1
            role = _compute_role(members, phase, layer, kinds)
            dur = sum(_duration(cost, n) for n in members)
            tg.add(tid, "compute", "compute", dur, layer=-1 if layer is None else layer,
                   chunk=-1 if chunk is None else chunk, role=role, phase=phase)
            res = "compute"
        tm.resource[tid] = res
        tm.nodes_of[tid] = [n.name for n in members]
        for n in members:
            tm.task_of[n.name] = tid
    tm.segment = {n.name: seg[n] for n in nodes}
    tm.position = {n.name: pos[n] for n in nodes}

    deps: dict[tuple[str, str], None] = {}
    for n in nodes:
        tu = tm.task_of.get(n.name)
        if tu is None:
            continue
        for v in succ[n]:
            tv = tm.task_of.get(v.name)
            if tv is not None and tv != tu:
                deps[(tu, tv)] = None
    # barriers: every task of the segment before precedes it, every task of the segment after follows it
    by_seg: dict[int, list[str]] = defaultdict(list)
    for tid, names in tm.nodes_of.items():
        if tid not in tm.barriers:
            by_seg[tm.segment[names[0]]].append(tid)
    for k, b in enumerate(tm.barriers):
        for t in by_seg.get(k, []):
            deps[(t, b)] = None
        for t in by_seg.get(k + 1, []):
            deps[(b, t)] = None
        if k + 1 < len(tm.barriers):
            deps[(b, tm.barriers[k + 1])] = None
    for u, v in deps:
        tg.add_dep(u, v)
    tm.deps = list(deps)
    if cpu_cost is not None:
        _add_cpu_tasks(tg, tm, cpu_cost, {n.name: n for n in starts})
    tg.validate()
    return tg, tm


def _add_cpu_tasks(tg: TaskGraph, tm: TaskMap, cpu_cost: Cost, starts: dict[str, fx.Node]) -> None:
    """One compute task per collective with host CPU time, between the collective's predecessors and users."""
    for tid, (start, _) in list(tm.collective.items()):
        ms = _duration(cpu_cost, starts[start])
        if ms <= 0:
            continue
        t = tg[tid]
        cpu = f"{tid}.cpu"
        tg.add(cpu, "host_cpu", "compute", ms, size=t.size, layer=t.layer, chunk=t.chunk, role=t.role, phase=t.phase)
        for u in tg.preds(tid):
            tg.add_dep(u, cpu)
        for v in tg.succs(tid):
            tg.add_dep(cpu, v)
        tm.cpu_of[cpu] = tid


def _compute_role(members: list[fx.Node], phase: str, layer: int | None, kinds: dict[fx.Node, str]) -> str:
    """The task's role: the most common region role; ``expert_wgrad`` for backward expert work that feeds
    no collective (weight gradients: the scheduler's filler rule puts them in compute gaps); ``dense`` outside
    regions."""
    if layer is None:
        return "dense"
    roles = Counter(_meta(n).get("role") for n in members if not is_free(n) and _meta(n).get("role"))
    if not roles:
        roles = Counter(_meta(n).get("role") for n in members if _meta(n).get("role"))
    role = roles.most_common(1)[0][0] if roles else "region"
    if phase == "backward" and role == "expert" and any(n.target in MATMUL_OPS for n in members):
        feeds_collective = _reaches_collective(members, kinds)
        if not feeds_collective:
            return "expert_wgrad"
    return role


def _reaches_collective(members: list[fx.Node], kinds: dict[fx.Node, str]) -> bool:
    seen: set[fx.Node] = set()
    stack = list(members)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if kinds.get(n) == COLLECTIVE:
            return True
        stack.extend(n.users)
    return False


# ---------------------------------------------------------------------------
# baseline orders
# ---------------------------------------------------------------------------

def _graph_order(taskgraph: TaskGraph, first: dict[str, int]) -> list[str]:
    """A topological order of the tasks that follows the graph as written (first node position)."""
    return list(nx.lexicographical_topological_sort(taskgraph.g, key=lambda t: (first.get(t, 0), t)))


def _first_positions(taskgraph: TaskGraph, taskmap: TaskMap) -> dict[str, int]:
    first = {t: p for t, p in taskmap.first_pos().items() if t in taskgraph}
    first.update({cpu: first[coll] for cpu, coll in taskmap.cpu_of.items() if cpu in taskgraph and coll in first})
    return first


def sequential_order(taskgraph: TaskGraph, taskmap: TaskMap) -> dict[str, list[str]]:
    """Per-resource order of the graph as written (the ``sequential`` baseline; for ``fixed_order_schedule``)."""
    order: dict[str, list[str]] = {"compute": [], "inter": [], "intra": []}
    for t in _graph_order(taskgraph, _first_positions(taskgraph, taskmap)):
        order[taskgraph[t].resource].append(t)
    return order


#: Tutel's stage of a region task, by role, in each phase (the data-flow order of the stages).
TUTEL_STAGE = {
    "forward": {"router": 0, "shared_expert": 0, "dispatch": 1, "expert": 2, "combine": 3},
    "backward": {"combine": 1, "expert": 2, "expert_wgrad": 2, "dispatch": 3, "router": 4, "shared_expert": 4},
}


def tutel_order(taskgraph: TaskGraph, taskmap: TaskMap) -> dict[str, list[str]]:
    """Tutel-style pipeline order (the ``tutel`` baseline; for ``fixed_order_schedule``).

    Compute runs stage by stage within each layer, chunk by chunk within a stage
    (every chunk's dispatch work, then expert 0, expert 1, ..., then the combines),
    layers and dense work in graph order; each link issues its collectives as early
    as possible: a collective is ready once the last compute task it (transitively)
    depends on is done, and each link runs its collectives by readiness, then graph
    order. Both are restrictions of topological orders, so a FIFO replay never
    deadlocks.
    """
    first = _first_positions(taskgraph, taskmap)
    stages = TUTEL_STAGE[taskmap.phase]
    layer_start: dict[int, int] = {}
    for t in taskgraph:
        if t.layer >= 0:
            layer_start[t.layer] = min(layer_start.get(t.layer, first[t.id]), first[t.id])

    def key(tid: str) -> tuple:
        t = taskgraph[tid]
        if t.resource != "compute":  # links are not in the compute order: take them as soon as they are free
            return (-1, 0, 0, first[tid], tid)
        if t.layer < 0:
            return (first[tid], 0, 0, first[tid], tid)
        return (layer_start[t.layer], stages.get(t.role, 0), t.chunk, first[tid], tid)

    topo = list(nx.lexicographical_topological_sort(taskgraph.g, key=key))
    idx = {t: i for i, t in enumerate(topo)}
    compute = [t for t in topo if taskgraph[t].resource == "compute"]
    cidx = {t: i for i, t in enumerate(compute)}
    ready: dict[str, int] = {}
    for t in topo:  # ready[t] = 1 + index of the latest compute task t depends on (0 if none)
        r = 0
        for p in taskgraph.preds(t):
            r = max(r, cidx[p] + 1 if p in cidx else ready[p])
        ready[t] = r
    order: dict[str, list[str]] = {"compute": compute, "inter": [], "intra": []}
    for res in ("inter", "intra"):
        order[res] = sorted((t for t in topo if taskgraph[t].resource == res), key=lambda t: (ready[t], idx[t]))
    return order


# ---------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------

def _zero_cost(node: fx.Node) -> float:
    return 0.0


@graph_pass(uses=("costs",), writes=("taskgraph", "taskmap"))
def taskgraph(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Pass form: build ``gm``'s task graph with ``ctx.costs.node_cost``; store ``ctx.taskgraph`` / ``ctx.taskmap``.

    Without costs (``ctx.costs`` None) every node costs 0 and the report says so; the
    graph itself is not changed.
    """
    costs = ctx.costs
    if costs is None:
        ctx.notes.append(f"{ctx.graph_kind}: no cost model; task durations are 0")
    ctx.taskgraph, ctx.taskmap = build_taskgraph(gm, costs.node_cost if costs is not None else _zero_cost,
                                                 ctx.graph_kind, getattr(costs, "cpu_ms", None))
    return gm

"""Tasks and task graphs: what the scheduler orders.

A ``Task`` runs on one resource (``compute``, the ``inter``-node link or the
``intra``-node link) for a known duration; a ``TaskGraph`` holds tasks and the
dependencies between them (a networkx DiGraph underneath). Graphs are checked
eagerly (``add_task`` / ``add_dep``) and fully (``validate``) so that a solver
never sees a malformed problem: every error names the bad value and the valid
choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import networkx as nx

#: The resources tasks run on. Each runs one task at a time.
RESOURCES: tuple[str, ...] = ("compute", "inter", "intra")
#: Training phases a task belongs to.
PHASES: tuple[str, ...] = ("forward", "backward")


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work: ``duration`` ms on ``resource``.

    ``size`` is what the duration was priced from (elements for a collective,
    MACs for a GEMM); ``layer`` / ``chunk`` / ``role`` / ``phase`` say where the
    task comes from (chunk is -1 for unchunked work).
    """

    id: str
    kind: str
    resource: str
    duration: float
    size: float = 0.0
    layer: int = 0
    chunk: int = -1
    role: str = ""
    phase: str = "forward"

    def __post_init__(self) -> None:
        _check_task(self)


_INF = float("inf")


def _check_task(t: Task) -> None:
    if type(t.id) is not str or not t.id:
        raise ValueError(f"Task id must be a non-empty string, got {t.id!r}")
    if t.resource not in RESOURCES:
        raise ValueError(f"Task {t.id!r}: unknown resource {t.resource!r}; valid resources: {', '.join(RESOURCES)}")
    d = t.duration
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 <= d < _INF):  # NaN fails the comparison
        raise ValueError(f"Task {t.id!r}: duration must be a finite number >= 0 (ms), got {d!r}")
    if t.phase not in PHASES:
        raise ValueError(f"Task {t.id!r}: unknown phase {t.phase!r}; valid phases: {', '.join(PHASES)}")


@dataclass(slots=True)
class GraphArrays:
    """Index-based view of a TaskGraph for fast solvers (built once, cached)."""

    ids: list[str]
    index: dict[str, int]
    dur: list[float]
    res: list[int]  # index into RESOURCES
    preds: list[list[int]]
    succs: list[list[int]]
    topo: list[int]  # a topological order of task indices


class TaskGraph:
    """Tasks plus dependencies ``u -> v`` (v may start only after u ends).

    Adjacency is kept in plain dicts while building (fast); :attr:`g` is the
    networkx DiGraph view for graph algorithms, built on first use.
    """

    def __init__(self, tasks: Iterable[Task] = (), deps: Iterable[tuple[str, str]] = (), name: str = "") -> None:
        self.name = name
        self.tasks: dict[str, Task] = {}
        self._succ: dict[str, dict[str, None]] = {}
        self._pred: dict[str, dict[str, None]] = {}
        self._nx: nx.DiGraph | None = None
        self._arrays: GraphArrays | None = None
        for t in tasks:
            self.add_task(t)
        for u, v in deps:
            self.add_dep(u, v)

    # -- building ---------------------------------------------------------
    def add_task(self, task: Task) -> Task:
        """Add ``task``; ValueError on a duplicate id or an invalid task."""
        if not isinstance(task, Task):
            raise ValueError(f"add_task expects a Task, got {type(task).__name__}")
        if task.id in self.tasks:
            raise ValueError(f"duplicate task id {task.id!r}: each task id must be unique in a TaskGraph")
        self.tasks[task.id] = task
        self._succ[task.id] = {}
        self._pred[task.id] = {}
        self._nx = None
        self._arrays = None
        return task

    def add(self, id: str, kind: str, resource: str, duration: float, **kw) -> Task:
        """Shorthand for ``add_task(Task(id, kind, resource, duration, **kw))``."""
        return self.add_task(Task(id, kind, resource, duration, **kw))

    def add_dep(self, before: str, after: str) -> None:
        """``after`` starts only once ``before`` has ended; both must exist."""
        if before not in self.tasks or after not in self.tasks:
            x = before if before not in self.tasks else after
            raise ValueError(f"dependency {before!r} -> {after!r} names unknown task {x!r}; add the task first"
                             f" (known tasks: {_few(self.tasks)})")
        if before == after:
            raise ValueError(f"dependency cycle: task {before!r} depends on itself")
        self._succ[before][after] = None
        self._pred[after][before] = None
        self._nx = None
        self._arrays = None

    # -- queries ----------------------------------------------------------
    @property
    def g(self) -> nx.DiGraph:
        """The dependency graph as a networkx DiGraph (task ids as nodes)."""
        if self._nx is None:
            d = nx.DiGraph()
            d.add_nodes_from(self.tasks)
            d.add_edges_from((u, v) for u, vs in self._succ.items() for v in vs)
            self._nx = d
        return self._nx

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks.values())

    def __contains__(self, tid: object) -> bool:
        return tid in self.tasks

    def __getitem__(self, tid: str) -> Task:
        return self.tasks[tid]

    @property
    def deps(self) -> list[tuple[str, str]]:
        return [(u, v) for u, vs in self._succ.items() for v in vs]

    def preds(self, tid: str) -> list[str]:
        return list(self._pred[tid])

    def succs(self, tid: str) -> list[str]:
        return list(self._succ[tid])

    def on(self, resource: str) -> list[Task]:
        """Tasks that run on ``resource``, in insertion order."""
        return [t for t in self.tasks.values() if t.resource == resource]

    def total(self, resource: str) -> float:
        """Busy time of ``resource`` if every task ran back to back."""
        return sum(t.duration for t in self.tasks.values() if t.resource == resource)

    def validate(self) -> "TaskGraph":
        """Check the whole graph; ValueError naming the first problem found."""
        for t in self.tasks.values():
            _check_task(t)
        self._kahn(check=True)
        return self

    def _kahn(self, check: bool = False) -> tuple[list[str], dict[str, int], list[list[int]], list[list[int]], list[int]]:
        ids = list(self.tasks)
        index = {tid: i for i, tid in enumerate(ids)}
        succs = [[index[v] for v in self._succ[t]] for t in ids]
        preds = [[index[u] for u in self._pred[t]] for t in ids]
        indeg = [len(p) for p in preds]
        order = [i for i in range(len(ids)) if indeg[i] == 0]
        k = 0
        while k < len(order):
            for j in succs[order[k]]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    order.append(j)
            k += 1
        if len(order) != len(ids):
            cyc = nx.find_cycle(self.g)
            raise ValueError("dependency cycle: " + " -> ".join([u for u, _ in cyc] + [cyc[0][0]]))
        return ids, index, preds, succs, order

    def arrays(self) -> GraphArrays:
        """Index view (checked on first use, cached until the graph changes)."""
        if self._arrays is None:
            ids, index, preds, succs, order = self._kahn()
            ridx = {r: i for i, r in enumerate(RESOURCES)}
            tasks = self.tasks
            self._arrays = GraphArrays(ids=ids, index=index, dur=[tasks[t].duration for t in ids],
                                       res=[ridx[tasks[t].resource] for t in ids], preds=preds, succs=succs, topo=order)
        return self._arrays

    def copy(self) -> "TaskGraph":
        return TaskGraph(self.tasks.values(), self.deps, name=self.name)

    def __repr__(self) -> str:
        by = {r: sum(1 for t in self.tasks.values() if t.resource == r) for r in RESOURCES}
        return f"TaskGraph({self.name!r}, {len(self.tasks)} tasks {by}, {len(self.deps)} deps)"


def _few(d: dict, n: int = 5) -> str:
    keys = list(d)
    s = ", ".join(repr(k) for k in keys[:n])
    return s + (f", ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"

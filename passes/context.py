"""The small state object that every graph pass receives beside the graph."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassContext:
    """What one run of the pass pipeline over one ATen graph shares between passes.

    ``graph_kind`` says which aot_autograd graph is being processed
    ("forward" or "backward"); ``regions`` maps a graph kind to the MoE regions
    found in it (filled by ``passes.recognize``); ``notes`` collects
    human-readable remarks for the report; ``strict`` turns "leave it alone and
    say why" into an error; ``config`` is the backend's configuration, if any;
    ``original`` is the signature of the graph before any pass ran, which
    ``passes.verify`` compares against.

    Scheduling state, filled as the pipeline goes: ``degrees`` is the chunk
    degree asked per layer (missing: 1); ``chunking`` what ``passes.chunk``
    did per layer; ``costs`` the profiler's cost model (``node_cost(node)`` in
    ms); ``taskgraph``/``taskmap`` the scheduler's task graph of this graph and
    its map back to nodes; ``schedule`` the solved schedule ``passes.annotate``
    applies.
    """

    graph_kind: str = "forward"
    regions: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    strict: bool = False
    config: object | None = None
    original: object | None = None  # passes.verify.GraphSignature of the graph before any pass
    degrees: dict[int, int] = field(default_factory=dict)
    chunking: dict[int, object] = field(default_factory=dict)  # layer -> passes.chunk.ChunkInfo
    costs: object | None = None  # profiler.CostModel
    taskgraph: object | None = None  # scheduler.TaskGraph
    taskmap: object | None = None  # passes.taskgraph.TaskMap
    schedule: object | None = None  # scheduler.Schedule

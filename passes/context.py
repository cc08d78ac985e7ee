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
    """

    graph_kind: str = "forward"
    regions: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    strict: bool = False
    config: object | None = None
    original: object | None = None  # passes.verify.GraphSignature of the graph before any pass

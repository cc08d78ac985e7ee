"""``MoERegion``: one MoE layer found in one ATen graph, with its nodes by role."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("router", "dispatch", "expert", "combine", "shared_expert")


@dataclass
class MoERegion:
    """One MoE layer as found in one ATen graph.

    ``nodes`` maps each role ("router", "dispatch", "expert", "combine",
    "shared_expert") to node names in graph order; ``all_to_all`` names the
    ``all_to_all_single`` nodes of the region and ``a2a_bytes`` sums the bytes
    this rank sends through them (None when a size is symbolic). Sizes are None
    when they cannot be read from the graph. ``capacity`` is None for dropless
    dispatch.
    """

    layer: int
    graph: str
    router: str
    num_experts: int | None = None
    top_k: int | None = None
    capacity: int | None = None
    dropless: bool = True
    tokens: int | None = None
    hidden: int | None = None
    ffn_hidden: int | None = None
    nodes: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in ROLES})
    all_to_all: list[str] = field(default_factory=list)
    a2a_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def role_of(self, name: str) -> str | None:
        """The role of node ``name`` in this region, or None."""
        for role, names in self.nodes.items():
            if name in names:
                return role
        return None

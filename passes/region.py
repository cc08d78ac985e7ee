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


#: The roles every MoE layer has (the shared expert is optional).
CORE_ROLES = ("router", "dispatch", "expert", "combine")


class LeftAlone(str):
    """A note on routing-like scores that formed no region; still a plain ``str`` wherever notes are text.

    ``anchor`` and ``gate`` name the topk (or soft anchor) and the gate matmul,
    ``module`` the module path Dynamo recorded for the anchor (``""`` if none);
    ``present`` the roles the walk below the anchor did find and ``missing``
    the others of ``CORE_ROLES``; ``leaves_graph`` is True when the routing
    result is an output of the graph (the layer may go on in a later graph,
    after a Dynamo graph break).
    """

    anchor: str
    gate: str
    module: str
    present: tuple[str, ...]
    missing: tuple[str, ...]
    leaves_graph: bool

    def __new__(cls, text: str, *, anchor: str, gate: str, module: str = "", present: tuple[str, ...] = (),
                leaves_graph: bool = False) -> "LeftAlone":
        self = super().__new__(cls, text)
        self.anchor, self.gate, self.module, self.leaves_graph = anchor, gate, module, leaves_graph
        self.present = tuple(r for r in CORE_ROLES if r in present)
        self.missing = tuple(r for r in CORE_ROLES if r not in present)
        return self

    def __reduce__(self):  # copies and pickles keep the attributes
        return (_left_alone, (str(self), self.anchor, self.gate, self.module, self.present, self.leaves_graph))


def _left_alone(text: str, anchor: str, gate: str, module: str, present: tuple[str, ...],
                leaves_graph: bool) -> LeftAlone:
    return LeftAlone(text, anchor=anchor, gate=gate, module=module, present=present, leaves_graph=leaves_graph)


def missing_roles(region: MoERegion) -> list[str]:
    """The roles of ``CORE_ROLES`` that have no node in ``region``."""
    return [r for r in CORE_ROLES if not region.nodes.get(r)]

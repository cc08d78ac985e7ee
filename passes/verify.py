"""The last pass: prove the rewritten graph still honours aot_autograd's contract.

Checks that the graph is well formed and topologically ordered, that its
inputs and outputs are exactly those of the graph before any pass ran (the
forward's saved tensors are the backward's inputs), that the collectives are
issued in the same order per process group, and that fsmoe node metadata is
consistent with the regions found. A violation raises ``VerificationError``;
the backend then falls back to the unmodified graph (or re-raises if strict).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx

from fsmoe_compiler.passes.collectives import collective_sequence
from fsmoe_compiler.passes.context import PassContext
from fsmoe_compiler.passes.region import ROLES


class VerificationError(RuntimeError):
    """A pass broke an invariant; the graph must not be used."""


@dataclass(frozen=True)
class GraphSignature:
    """What no pass may change: inputs, output arity and per-group collective order."""

    placeholders: tuple[str, ...]
    num_outputs: int
    collectives: tuple[tuple[str, str | None], ...]

    def per_group(self) -> dict[str | None, list[str]]:
        groups: dict[str | None, list[str]] = defaultdict(list)
        for kind, group in self.collectives:
            groups[group].append(kind)
        return dict(groups)


def graph_signature(gm: fx.GraphModule) -> GraphSignature:
    """Record ``gm``'s signature before any pass runs."""
    graph = gm.graph
    placeholders = tuple(n.target for n in graph.nodes if n.op == "placeholder")
    output = graph.output_node()
    out_args = output.args[0]
    num_outputs = len(out_args) if isinstance(out_args, (tuple, list)) else 1
    return GraphSignature(placeholders, num_outputs, tuple(collective_sequence(graph)))


def verify(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Raise ``VerificationError`` unless ``gm`` keeps the invariants; return it unchanged."""
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises RuntimeError / AssertionError variants
        raise VerificationError(f"{ctx.graph_kind} graph is malformed: {exc}") from exc

    now = graph_signature(gm)
    before = ctx.original if isinstance(ctx.original, GraphSignature) else None
    if before is not None:
        if now.placeholders != before.placeholders:
            raise VerificationError(
                f"{ctx.graph_kind} graph inputs changed: {list(before.placeholders)} -> {list(now.placeholders)}"
            )
        if now.num_outputs != before.num_outputs:
            raise VerificationError(
                f"{ctx.graph_kind} graph output count changed: {before.num_outputs} -> {now.num_outputs}"
            )
        if now.per_group() != before.per_group():
            raise VerificationError(
                f"{ctx.graph_kind} graph changed the collective issue order per process group: "
                f"{before.per_group()} -> {now.per_group()}"
            )

    names = {n.name for n in gm.graph.nodes}
    owner: dict[str, int] = {}
    for region in ctx.regions.get(ctx.graph_kind, []):
        for role, members in region.nodes.items():
            if role not in ROLES:
                raise VerificationError(f"region {region.layer} has unknown role {role!r}; valid roles: {sorted(ROLES)}")
            for name in members:
                if name not in names:
                    raise VerificationError(f"region {region.layer} names node {name!r}, which is not in the graph")
                if owner.setdefault(name, region.layer) != region.layer:
                    raise VerificationError(
                        f"node {name!r} belongs to regions {owner[name]} and {region.layer}"
                    )
    for node in gm.graph.nodes:
        meta = node.meta.get("fsmoe")
        if meta and meta.get("role") is not None and meta["role"] not in ROLES:
            raise VerificationError(
                f"node {node.name} has fsmoe role {meta['role']!r}; valid roles: {sorted(ROLES)}"
            )
    return gm

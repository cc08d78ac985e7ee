"""The last pass: prove the rewritten graph still honours aot_autograd's contract.

Checks that the graph is well formed and topologically ordered, that its
inputs and outputs are exactly those of the graph before any pass ran (the
forward's saved tensors are the backward's inputs), that the collectives are
issued in the same order per process group (a graph no fsmoe pass reordered or
chunked), or, once chunked/scheduled, that each group still carries the same
collectives up to chunking (kinds counted once per origin node, total bytes
unchanged), that stream annotations are valid and every use across streams has its
event first (``passes.streams.StreamRecorder``), and that fsmoe node metadata is
consistent with the regions found. ``collective_order(gm)`` is the per-group issue
order the backend compares across ranks (the order in which ranks must agree;
reordering backends hang exactly there). A violation raises ``VerificationError``;
the backend then falls back to the unmodified graph (or re-raises if strict).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch.fx as fx

from fsmoe_compiler.names import COMM_STREAM, COMPUTE_STREAM
from fsmoe_compiler.ops import collective_group, collective_op, collective_sequence, is_communication, is_collective
from fsmoe_compiler.passes.graph_utils import nbytes, shape
from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.region import ROLES
from fsmoe_compiler.passes.streams import StreamHazard, check_streams


class VerificationError(RuntimeError):
    """A pass broke an invariant; the graph must not be used."""


@dataclass(frozen=True)
class GraphSignature:
    """What no pass may change: inputs, output arity and per-group collective order."""

    placeholders: tuple[str, ...]
    num_outputs: int
    collectives: tuple[tuple[str, str | None], ...]
    #: per collective in graph order: (kind, group, origin, input bytes or None); origin is the node's
    #: ``meta["fsmoe"]["origin"]`` (chunk copies) or its own name
    details: tuple[tuple[str, str | None, str, int | None], ...] = ()

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
    return GraphSignature(placeholders, num_outputs, tuple(collective_sequence(graph)), _details(graph))


def _details(graph: fx.Graph) -> tuple[tuple[str, str | None, str, int | None], ...]:
    out = []
    for n in graph.nodes:
        if is_collective(n):
            meta = n.meta.get("fsmoe") if isinstance(n.meta.get("fsmoe"), dict) else {}
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            size = nbytes(src) if src is not None else None
            merged = meta.get("merged")  # passes.partition_grads: one all-reduce standing for several
            if merged:
                out.extend((collective_op(n), collective_group(n), str(name), size if i == 0 else 0)
                           for i, name in enumerate(merged))
                continue
            out.append((collective_op(n), collective_group(n), str(meta.get("origin") or n.name), size))
    return tuple(out)


def collective_order(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Per process-group name, each collective as ``"op[shape]"`` in issue (graph) order.

    What every rank must agree on: the backend gathers this from all ranks and compares.
    Shapes are the input's (``?`` for a symbolic size); the group key is ``str(group)``.
    """
    out: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if is_collective(n):
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            shp = shape(src) if src is not None else None
            dims = "?" if shp is None else ", ".join("?" if d is None else str(d) for d in shp)
            out.setdefault(str(collective_group(n)), []).append(f"{collective_op(n)}[{dims}]")
    return out


def check_topological(gm: fx.GraphModule) -> None:
    """Raise ``VerificationError`` unless every node's inputs come before it (and placeholders come first)."""
    seen: set[fx.Node] = set()
    body = False
    for n in gm.graph.nodes:
        if n.op == "placeholder" and body:
            raise VerificationError(f"placeholder {n.name} comes after other nodes")
        body = body or n.op != "placeholder"
        for a in n.all_input_nodes:
            if a not in seen:
                raise VerificationError(
                    f"node {n.name} uses {a.name} before it is computed (not topologically ordered)")
        seen.add(n)


def check_stream_tags(gm: fx.GraphModule) -> None:
    """Stream annotations, where present, are valid: collectives and waits on ``comm``, the rest on ``compute``."""
    for n in gm.graph.nodes:
        meta = n.meta.get("fsmoe")
        if not isinstance(meta, dict) or "stream" not in meta:
            continue
        want = COMM_STREAM if is_communication(n) else COMPUTE_STREAM
        if meta["stream"] != want:
            raise VerificationError(f"node {n.name} is annotated for stream {meta['stream']!r}, expected {want!r}")


def _reordered(gm: fx.GraphModule) -> bool:
    """A scheduling or chunking pass touched the graph (task or origin metadata present)."""
    for n in gm.graph.nodes:
        meta = n.meta.get("fsmoe")
        if isinstance(meta, dict) and ("task" in meta or "origin" in meta or "merged" in meta):
            return True
    return False


def compare_collectives(before: GraphSignature, now: GraphSignature) -> str | None:
    """Why the collectives of ``now`` are not those of ``before`` up to chunking and reordering, or None.

    Per process group: the multiset of collective kinds, counting the chunk copies of one
    origin once and a merged gradient all-reduce as each of its members, must be unchanged, and so must
    the total bytes sent (when all sizes are known).
    """
    if not before.details or not now.details:
        return None if Counter(before.collectives) == Counter(now.collectives) else (
            f"{dict(Counter(before.collectives))} -> {dict(Counter(now.collectives))}")

    def summary(details):
        kinds: dict[str | None, Counter] = defaultdict(Counter)
        total: dict[str | None, int | None] = defaultdict(int)
        seen: set[tuple] = set()
        for kind, group, origin, b in details:
            if (group, origin) not in seen:
                seen.add((group, origin))
                kinds[group][kind] += 1
            total[group] = None if b is None or total[group] is None else total[group] + b
        return kinds, total

    k0, b0 = summary(before.details)
    k1, b1 = summary(now.details)
    if {g: dict(c) for g, c in k0.items()} != {g: dict(c) for g, c in k1.items()}:
        return (f"kinds per group {dict((g, dict(c)) for g, c in k0.items())} -> "
                f"{dict((g, dict(c)) for g, c in k1.items())}")
    for g in b0:
        if b0[g] is not None and b1.get(g) is not None and b0[g] != b1[g]:
            return f"group {g}: {b0[g]} bytes -> {b1[g]} bytes"
    return None


@graph_pass(uses=("original", "regions"))
def verify(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Raise ``VerificationError`` unless ``gm`` keeps the invariants; return it unchanged.

    Against ``ctx.original`` when set (inputs, outputs, collectives); against
    the regions of this graph when recognised (roles, one region per node).
    """
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises RuntimeError / AssertionError variants
        raise VerificationError(f"{ctx.graph_kind} graph is malformed: {exc}") from exc
    check_topological(gm)
    check_stream_tags(gm)
    if _reordered(gm):  # every use across the compute and comm streams has its event first (passes.streams)
        try:
            check_streams(gm)
        except StreamHazard as exc:
            raise VerificationError(f"{ctx.graph_kind} graph: {exc}") from exc

    now = graph_signature(gm)
    before = ctx.original
    if before is not None:
        if now.placeholders != before.placeholders:
            raise VerificationError(
                f"{ctx.graph_kind} graph inputs changed: {list(before.placeholders)} -> {list(now.placeholders)}"
            )
        if now.num_outputs != before.num_outputs:
            raise VerificationError(
                f"{ctx.graph_kind} graph output count changed: {before.num_outputs} -> {now.num_outputs}"
            )
        if not _reordered(gm):
            if now.per_group() != before.per_group():
                raise VerificationError(
                    f"{ctx.graph_kind} graph changed the collective issue order per process group: "
                    f"{before.per_group()} -> {now.per_group()}"
                )
        else:  # chunked / scheduled: same collectives up to chunking; the order is compared across ranks
            why = compare_collectives(before, now)
            if why is not None:
                raise VerificationError(f"{ctx.graph_kind} graph changed the collectives per process group: {why}")

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

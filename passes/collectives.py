"""What counts as communication in an ATen graph, and which process group it uses.

Functional collectives (``_c10d_functional.*``) come with a ``wait_tensor``;
older in-place ``c10d.*`` ops and anything else in a collective namespace are
communication too. Passes treat every one of them as ordered per process
group: ranks must issue them in the same order or they deadlock.
"""

from __future__ import annotations

import torch.fx as fx

COLLECTIVE_NAMESPACES = frozenset(
    {"_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d", "_dtensor", "symm_mem"}
)
WAIT_OPS = frozenset({"wait_tensor"})


def _op_parts(node: fx.Node) -> tuple[str, str] | None:
    if node.op != "call_function":
        return None
    name = getattr(node.target, "name", None)
    if not callable(name):
        return None
    qualified = node.target.name()  # e.g. "_c10d_functional::all_to_all_single"
    if "::" not in qualified:
        return None
    namespace, op = qualified.split("::", 1)
    return namespace, op.split(".")[0]


def is_wait(node: fx.Node) -> bool:
    """A ``wait_tensor`` that completes an asynchronous collective."""
    parts = _op_parts(node)
    return parts is not None and parts[0] in COLLECTIVE_NAMESPACES and parts[1] in WAIT_OPS


def is_redundant_wait(node: fx.Node) -> bool:
    """A ``wait_tensor`` of what another ``wait_tensor`` returned: the tensor is already complete, so it is the
    identity (tracing ``wait_tensor(all_reduce(x))`` records two waits: funcol adds its own)."""
    src = node.args[0] if node.args else None
    return is_wait(node) and isinstance(src, fx.Node) and is_wait(src)


def is_collective(node: fx.Node) -> bool:
    """A node that communicates (issues a collective); waits are not collectives."""
    parts = _op_parts(node)
    return parts is not None and parts[0] in COLLECTIVE_NAMESPACES and parts[1] not in WAIT_OPS


def collective_kind(node: fx.Node) -> str:
    """The collective's op name without namespace or overload, e.g. ``all_to_all_single``."""
    parts = _op_parts(node)
    if parts is None:
        raise ValueError(f"node {node.name} is not an operator call")
    return parts[1]


def collective_group(node: fx.Node) -> str | None:
    """The process-group name a functional collective runs on (its ``group_name`` argument)."""
    if "group_name" in node.kwargs:
        return str(node.kwargs["group_name"])
    strings = [a for a in node.args if isinstance(a, str)]
    return strings[-1] if strings else None


def collective_sequence(graph: fx.Graph) -> list[tuple[str, str | None]]:
    """Collectives in issue order as ``(kind, group)``: what every rank must agree on."""
    return [(collective_kind(n), collective_group(n)) for n in graph.nodes if is_collective(n)]

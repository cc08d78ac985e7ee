"""Peak memory of an ATen graph run in its node order, from the tensors' sizes in ``meta["val"]``.

Scheduling issues collectives early and waits late, and moves compute
between them: buffers then live longer, and the peak can grow. This prices
an order without running it: tensors are counted by storage (a view shares
its base's), allocated where their storage is first made and freed after the
storage's last use; the graph's inputs stay alive throughout (the caller
holds them). Aliasing is PyTorch's own analysis (Inductor's
``GraphAliasTracker``, the one its overlap scheduler bounds memory with),
counted here on every device, CPU included.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx


def _bytes(n: Any) -> int:
    try:
        return int(n)
    except Exception:  # noqa: BLE001 - a symbolic size (dropless): its hint
        try:
            from torch.fx.experimental.symbolic_shapes import optimization_hint

            return int(optimization_hint(n))
        except Exception:  # noqa: BLE001
            return 0


def memory_profile(graph: fx.Graph) -> list[int] | None:
    """Bytes alive after each allocation and after each release, node by node in graph order (the inputs
    first); None where this torch has no alias analysis."""
    try:
        from torch._inductor.fx_passes.memory_estimator import GraphAliasTracker
    except ImportError:
        return None
    nodes = list(graph.nodes)
    aliases = GraphAliasTracker(nodes)
    inputs = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    alive = sum(_bytes(s.storage.nbytes()) for n in inputs for s in aliases.get_fresh_allocations(n))
    profile = [alive]
    for node in nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        alive += sum(_bytes(s.storage.nbytes()) for s in aliases.get_fresh_allocations(node))
        profile.append(alive)
        for s in aliases.get_storages_last_used(node):
            if aliases.storage_to_allocator[s].op not in ("placeholder", "get_attr"):
                alive -= _bytes(s.storage.nbytes())
        profile.append(alive)
    return profile


def peak_bytes(graph: fx.Graph) -> int | None:
    """The most bytes alive at once when ``graph`` runs in its node order (``memory_profile``)."""
    profile = memory_profile(graph)
    return None if profile is None else max(profile)

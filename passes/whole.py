"""Is every recognised MoE layer handled whole? The ``whole`` pass, and the check of chunking under ``"auto"``.

A layer is handled whole when one region of each graph holds all its core
roles (router, dispatch, experts, combine) and, when it is expert parallel,
the chunk pass has a rule for it. Otherwise the backend still runs the layer
(unchunked, unscheduled) and says why; with ``strict=True`` it raises
``NotWhole`` naming the layer, what is missing and the valid choices.

* ``whole`` (after ``recognize``): a forward region without one of the core
  roles; a backward region of an expert-parallel layer (one with all-to-alls)
  without its experts or combine; an expert-parallel forward layer with no
  backward region. A backward region without a dispatch role is whole: no
  gradient flows to the layer's input there, so there is nothing to
  un-permute.
* ``unchunkable_layers`` (the planner, under ``pipeline_degree="auto"``): an
  expert-parallel layer that no candidate degree could split for want of a
  rule (not because a degree is too large for it or does not divide it).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.fx as fx

from fsmoe_compiler.passes.context import PassContext, graph_pass
from fsmoe_compiler.passes.region import CORE_ROLES, MoERegion, missing_roles

__all__ = ["NotWhole", "not_whole", "unchunkable_layers", "whole"]

#: Refusal reasons of the chunk pass that say a degree does not fit a layer, not that the layer has no rule.
FIT_REASONS = ("is larger than", "does not divide", "not expert parallel")

_CHOICES_COMPILE = ("valid choices: strict=False (the layer runs as traced, unscheduled, and the report says why), "
                    "or a model whose layer Dynamo traces whole (fsmoe_compiler.explain shows each graph's roles)")


class NotWhole(ValueError):
    """A recognised MoE layer cannot be handled whole (raised only with ``strict=True``)."""


def _layer(region: MoERegion) -> str:
    return f"MoE layer {region.layer} ({region.router}, {region.num_experts} experts, top_k={region.top_k})"


def not_whole(kind: str, regions: list[MoERegion], forward: list[MoERegion] | None = None) -> list[str]:
    """Why each layer of a ``kind`` graph is not handled whole (empty when every layer is)."""
    out = []
    for r in regions:
        lacking = missing_roles(r)
        if kind == "backward":
            if not r.all_to_all:
                continue
            lacking = [role for role in lacking if role != "dispatch"]
        if lacking:
            out.append(f"{kind}: {_layer(r)} is a partial region: no {', '.join(lacking)} role "
                       f"(found: {', '.join(role for role in CORE_ROLES if role not in lacking)})")
    if kind == "backward" and forward:
        have = {r.layer for r in regions}
        for f in forward:
            if f.all_to_all and f.layer not in have:
                out.append(f"backward: {_layer(f)} is expert parallel in the forward graph but has no backward region "
                           "(its backward runs unchunked and unscheduled)")
    return out


@graph_pass(reads=("regions",))
def whole(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Note every layer of this graph that is not handled whole; raise ``NotWhole`` instead when strict."""
    problems = not_whole(ctx.graph_kind, ctx.regions_here, ctx.regions.get("forward"))
    if problems and ctx.strict:
        raise NotWhole("; ".join(problems) + "; " + _CHOICES_COMPILE)
    ctx.notes.extend(problems)
    return gm


def unchunkable_layers(chunked: Mapping[int, Mapping[int, Any]], regions: list[MoERegion]) -> list[str]:
    """Expert-parallel layers that no degree > 1 in ``chunked`` (degree -> layer -> ``ChunkInfo``) split for want of a rule.

    A layer refused at every degree only because the degree does not fit it
    (larger than its capacity or hidden size, not a divisor) is not one of them.
    """
    out = []
    for r in regions:
        if not r.all_to_all:
            continue
        infos = {d: by_layer[r.layer] for d, by_layer in chunked.items() if d > 1 and r.layer in by_layer}
        if not infos or any(info.degree > 1 for info in infos.values()):
            continue
        reasons = {d: info.reason or "" for d, info in infos.items()}
        if all(any(f in why for f in FIT_REASONS) for why in reasons.values()):
            continue
        d, why = next((d, why) for d, why in sorted(reasons.items()) if not any(f in why for f in FIT_REASONS))
        out.append(f"{r.graph}: {_layer(r)} cannot be chunked at any degree under pipeline_degree='auto' "
                   f"(degree {d}: {why}); valid choices: pipeline_degree=1 (no chunking: the layer is scheduled "
                   "whole), strict=False (\"auto\" keeps it at r = 1 and the report says why)")
    return out

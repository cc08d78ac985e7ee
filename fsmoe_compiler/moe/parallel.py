"""Gradient synchronisation for eager training of models built from ``MoELayer`` (data + expert parallel).

Each rank computes the loss of its own tokens. The gradient of the mean loss
over all ``W`` ranks is:

* dense parameters (attention, norms, routers, shared experts, and the experts
  of a layer that is not expert-parallel): replicated, so all-reduce (sum)
  over the world and divide by ``W``;
* experts of an expert-parallel layer: each rank's expert gradient already
  sums the contributions of every rank in its EP group (their tokens came by
  all-to-all), so sum over the ranks that hold the same experts (the DP
  group, absent when EP spans the world) and divide by ``W``.

A compiled model may leave this to the compiler (FSMoE's partitioned
gradient all-reduce); this helper is the plain, eager reference.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .layer import MoELayer


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(dense, expert_parallel)``: parameters replicated on every rank vs. experts sharded over an EP group."""
    sharded: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, MoELayer) and module.is_expert_parallel:
            for p in module.experts.parameters():
                sharded[id(p)] = p
    dense = [p for p in model.parameters() if id(p) not in sharded]
    return dense, list(sharded.values())


def sync_gradients(model: nn.Module, dp_group: dist.ProcessGroup | None = None) -> None:
    """Turn each rank's local gradients into the gradient of the mean loss over all ranks (collective).

    ``dp_group``: the ranks holding the same experts (``topology.dp_group``);
    needed only when the EP group is smaller than the world. A no-op without
    torch.distributed or with one rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    dense, experts = split_parameters(model)
    for p in dense:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
    if experts:
        ep_sizes = {m.ep_size for m in model.modules() if isinstance(m, MoELayer) and m.is_expert_parallel}
        if max(ep_sizes) < world and dp_group is None:
            raise ValueError(
                f"expert-parallel groups of size {sorted(ep_sizes)} are smaller than the world ({world}): "
                "pass dp_group (the ranks that hold the same experts)"
            )
        for p in experts:
            if p.grad is not None:
                if dp_group is not None and dist.get_world_size(dp_group) > 1:
                    dist.all_reduce(p.grad, group=dp_group)
                p.grad.div_(world)

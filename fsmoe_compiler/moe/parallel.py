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

``sync_gradients`` is the plain, eager reference, run after backward (one
all-reduce per parameter, or per bucket of flattened gradients);
``sync_gradients_in_graph`` puts the same all-reduces into the backward
itself, so that a compiled backward graph holds them and a scheduler can
overlap them with the rest of the step (FSMoE's gradient aggregation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.nn.utils import parametrize

from .layer import MoELayer


#: A parameter with this attribute set to True is an expert sharded over every rank (expert parallelism over the
#: world, as ``examples/titan_moe.py`` marks torchtitan's experts): its gradient is only averaged, never all-reduced.
EXPERT_PARALLEL = "fsmoe_expert_parallel"


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(dense, expert_parallel)``: parameters replicated on every rank vs. experts sharded over an EP group."""
    sharded: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, MoELayer) and module.is_expert_parallel:
            for p in module.experts.parameters():
                sharded[id(p)] = p
    for p in model.parameters():  # another library's experts, sharded over the world (EXPERT_PARALLEL)
        if getattr(p, EXPERT_PARALLEL, False):
            sharded[id(p)] = p
    dense = [p for p in model.parameters() if id(p) not in sharded]
    return dense, list(sharded.values())


def _check_dp_group(model: nn.Module, world: int, dp_group: dist.ProcessGroup | None) -> None:
    """ValueError when expert parallelism spans fewer ranks than the world and no ``dp_group`` says who shares experts."""
    ep_sizes = {m.ep_size for m in model.modules() if isinstance(m, MoELayer) and m.is_expert_parallel}
    if ep_sizes and max(ep_sizes) < world and dp_group is None:
        raise ValueError(
            f"expert-parallel groups of size {sorted(ep_sizes)} are smaller than the world ({world}): "
            "pass dp_group (the ranks that hold the same experts)"
        )


def sync_gradients(model: nn.Module, dp_group: dist.ProcessGroup | None = None, *,
                   bucket_mb: float | None = None) -> None:
    """Turn each rank's local gradients into the gradient of the mean loss over all ranks (collective).

    ``dp_group``: the ranks holding the same experts (``topology.dp_group``);
    needed only when the EP group is smaller than the world. ``bucket_mb``:
    all-reduce the dense gradients flattened into buckets of at most that many
    MiB each (as DDP buckets do; ``math.inf``: all in one bucket) instead of
    one all-reduce per parameter, whose per-call latency dominates a step on a
    slow link; the sums are the same. A no-op without torch.distributed or
    with one rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    dense, experts = split_parameters(model)
    grads = [p.grad for p in dense if p.grad is not None]
    if bucket_mb is None:
        for g in grads:
            dist.all_reduce(g)
            g.div_(world)
    else:
        for bucket in _buckets(grads, bucket_mb):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
    if experts:
        _check_dp_group(model, world, dp_group)
        for p in experts:
            if p.grad is not None:
                if dp_group is not None and dist.get_world_size(dp_group) > 1:
                    dist.all_reduce(p.grad, group=dp_group)
                p.grad.div_(world)


def _buckets(grads: list[torch.Tensor], bucket_mb: float) -> list[list[torch.Tensor]]:
    """``grads`` in order, cut into runs of one dtype and device of at most ``bucket_mb`` MiB (a larger one alone)."""
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0 (math.inf: one bucket), got {bucket_mb!r}")
    limit = bucket_mb * 2**20
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        last = out[-1] if out else None
        if last is None or (g.dtype, g.device) != (last[0].dtype, last[0].device) or size + nbytes > limit:
            out.append([g])
            size = nbytes
        else:
            last.append(g)
            size += nbytes
    return out


class _ReduceGradient(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ``group`` with a functional all-reduce, divided by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str | None, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.group_name, ctx.scale = group_name, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if ctx.group_name is not None:
            grad = funcol.wait_tensor(funcol.all_reduce(grad, "sum", ctx.group_name))
        return grad / ctx.scale, None, None


class ReduceGradient(nn.Module):
    """A parametrization: the parameter as is, its gradient all-reduced over a group (None: only scaled)."""

    def __init__(self, group_name: str | None, scale: float) -> None:
        super().__init__()
        self.group_name = group_name
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceGradient.apply(x, self.group_name, self.scale)


def sync_gradients_in_graph(model: nn.Module, dp_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make ``model``'s backward itself compute the gradient of the mean loss over ranks; returns ``model``.

    The same arithmetic as :func:`sync_gradients`, but done where each gradient
    is produced: every parameter gets a parametrization whose backward
    all-reduces its gradient with a functional collective (dense parameters over
    the world, expert-parallel ones over ``dp_group`` if any) and divides by the
    world size. Compiled, the all-reduces are nodes of the backward ATen graph,
    so a scheduler can overlap them with the rest of the backward (FSMoE's
    gradient aggregation); eagerly they run as each gradient is ready. Call it
    once, before compiling; parameter names gain ``parametrizations.<name>.original``.
    A parameter shared by several modules (tied embeddings) is all-reduced at
    each use; the reduced parts add up to the reduced sum.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    world = dist.get_world_size()
    dense, experts = split_parameters(model)
    if experts:
        _check_dp_group(model, world, dp_group)
    world_name = dist.group.WORLD.group_name
    dp_name = dp_group.group_name if dp_group is not None and dist.get_world_size(dp_group) > 1 else None
    group_of = {id(p): world_name for p in dense}
    group_of.update({id(p): dp_name for p in experts})
    targets = [(module, name, group_of[id(p)]) for module in model.modules()
               for name, p in list(module.named_parameters(recurse=False)) if id(p) in group_of]
    for module, name, group_name in targets:  # a tied parameter gets one per owner: the all-reduced parts add up
        parametrize.register_parametrization(module, name, ReduceGradient(group_name, world), unsafe=True)
    return model

"""Process-group topology for MoE training: expert-parallel (EP) and data-parallel (DP) groups, and agreement checks.

Layout: ``world_size = ep_size * dp_size``; EP groups are blocks of
consecutive ranks (``[0..ep-1], [ep..2ep-1], ...``) so that experts exchange
tokens among neighbours (on a cluster: inside a node first); DP groups take
the ranks with the same position in their EP group (``{i, i+ep, ...}``) and
all-reduce the replicated experts' gradients.

``torch.distributed.new_group`` must be called by every rank, in the same
order, for every group — even those it is not in — so the builders here
create all groups on all ranks and return the caller's.

``check_ranks_agree`` turns a configuration mismatch between ranks (which
would otherwise deadlock in the first collective, or silently compute
garbage) into a ``ValueError`` that names the field and the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class WorldLayout:
    """Where one rank sits: its EP group and DP group, as rank lists."""

    world_size: int
    ep_size: int
    rank: int
    ep_ranks: tuple[int, ...] = field(default=())
    dp_ranks: tuple[int, ...] = field(default=())

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        """This rank's index inside its EP group (which block of experts it owns)."""
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    def describe(self) -> str:
        """One line for logs and reports."""
        return (
            f"world={self.world_size} = ep {self.ep_size} x dp {self.dp_size}; rank {self.rank}: "
            f"ep_rank {self.ep_rank} of {list(self.ep_ranks)}, dp_rank {self.dp_rank} of {list(self.dp_ranks)}"
        )


def world_layout(world_size: int, ep_size: int, rank: int) -> WorldLayout:
    """The layout of ``rank`` in a world of ``world_size`` ranks with EP groups of ``ep_size`` (pure, no process group)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if ep_size < 1 or world_size % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} must divide world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
    start = (rank // ep_size) * ep_size
    ep_ranks = tuple(range(start, start + ep_size))
    dp_ranks = tuple(range(rank % ep_size, world_size, ep_size))
    return WorldLayout(world_size, ep_size, rank, ep_ranks, dp_ranks)


def _require_world(world_size: int) -> int:
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
    actual = dist.get_world_size()
    if actual != world_size:
        raise ValueError(f"world_size={world_size} was asked for but the process group has {actual} ranks")
    return dist.get_rank()


def _agree_then_validate(world_size: int, ep_size: int) -> int:
    """Agreement first (so a rank with a bad argument cannot leave the others waiting), then local checks."""
    if dist.is_initialized():
        check_ranks_agree("(world_size, ep_size)", (world_size, ep_size))
    rank = _require_world(world_size)
    world_layout(world_size, ep_size, rank)
    return rank


def ep_group(world_size: int, ep_size: int) -> dist.ProcessGroup:
    """Create all EP groups (collective: every rank must call it) and return the caller's."""
    rank = _agree_then_validate(world_size, ep_size)
    mine = None
    for start in range(0, world_size, ep_size):
        g = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            mine = g
    assert mine is not None
    return mine


def dp_group(world_size: int, ep_size: int) -> dist.ProcessGroup:
    """Create all DP groups (collective: every rank must call it) and return the caller's."""
    rank = _agree_then_validate(world_size, ep_size)
    mine = None
    for i in range(ep_size):
        ranks = list(range(i, world_size, ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    assert mine is not None
    return mine


@dataclass
class Topology:
    """The caller's layout and its process groups."""

    layout: WorldLayout
    ep_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup


def build_topology(ep_size: int, world_size: int | None = None) -> Topology:
    """EP and DP groups for the current world (collective)."""
    world_size = dist.get_world_size() if world_size is None and dist.is_initialized() else world_size
    if world_size is None:
        raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
    ep = ep_group(world_size, ep_size)
    dp = dp_group(world_size, ep_size)
    return Topology(world_layout(world_size, ep_size, dist.get_rank()), ep, dp)


def check_ranks_agree(name: str, value: Any, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``ValueError`` on every rank of ``group`` unless all of them passed an equal ``value``.

    ``value`` is any picklable object; a ``dict`` is compared key by key so the
    message names the field, e.g. ``"rank 1 has num_experts=8, rank 0 has 4"``.
    Collective over ``group`` (default: the world); a no-op when
    torch.distributed is not initialised. Every rank gets the same verdict, so
    none is left waiting in a later collective.
    """
    if not dist.is_initialized():
        return
    size = dist.get_world_size(group)
    if size == 1:
        return
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, value, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
    ref = gathered[0]
    for i, other in enumerate(gathered[1:], start=1):
        if other == ref:
            continue
        if isinstance(ref, dict) and isinstance(other, dict):
            for key in sorted(set(ref) | set(other), key=str):
                a, b = ref.get(key, "<missing>"), other.get(key, "<missing>")
                if a != b:
                    raise ValueError(
                        f"ranks disagree on {name}: rank {ranks[i]} has {key}={b!r}, rank {ranks[0]} has {a!r}"
                    )
        raise ValueError(f"ranks disagree: rank {ranks[i]} has {name}={other!r}, rank {ranks[0]} has {ref!r}")

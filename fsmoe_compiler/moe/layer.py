"""``MoELayer``: router + dispatcher + stacked experts (+ optional shared expert), local or expert-parallel.

Written so that ``torch.compile`` (Dynamo) traces the whole forward with zero
graph breaks: collectives come from ``_functional_collectives``, shapes are
static except the dropless split sizes (unbacked SymInts, see ``dispatch``),
and all process-group checks happen in ``__init__``, never in ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from fsmoe_compiler.runtime.topology import check_ranks_agree

from .dispatch import DISPATCHERS, CapacityDispatcher, DroplessDispatcher
from .experts import EXPERTS, DenseFFN, make_experts
from .routers import ROUTERS, make_router

CAPACITY_ONLY_ROUTERS = ("softmoe", "expert_choice")


def _choose(name: str, value: str, choices: Any) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {sorted(choices)}")
    return value


def resolve_ep_group(ep_group: dist.ProcessGroup | str | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """``(group, ep_size, ep_rank)``: ``None`` means the world group when distributed, else local (size 1).

    ``"local"`` forces all experts onto this process even when distributed
    (e.g. a single-process reference inside a multi-rank test).
    """
    if ep_group == "local":
        return None, 1, 0
    if isinstance(ep_group, str):
        raise ValueError(f"unknown ep_group {ep_group!r}; pass a ProcessGroup, None or 'local'")
    if ep_group is None:
        if not dist.is_initialized():
            return None, 1, 0
        ep_group = dist.group.WORLD
    return ep_group, dist.get_world_size(ep_group), dist.get_rank(ep_group)


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN: ``forward(x [..., d_model]) -> (y [..., d_model], aux_loss scalar)``.

    Args:
        d_model, d_ff: model and expert hidden width.
        num_experts: total experts ``E`` over the EP group (must divide evenly).
        router: one of ``ROUTERS`` (gshard, switch, sigmoid, xmoe, softmoe,
            mixtral, deepseek, expert_choice).
        top_k: choices per token; ``None`` (default) takes the router's
            default: 2, or 1 for switch. Expert choice uses it in its
            capacity; SoftMoE ignores it.
        dispatch: ``"capacity"`` or ``"dropless"`` (softmoe and expert_choice
            need capacity).
        capacity_factor, capacity_multiple: capacity ``C = ceil(k*T*cf/E)``
            rounded up to ``capacity_multiple``.
        expert: ``"gelu"`` or ``"swiglu"``.
        shared_expert: add a dense FFN (width ``shared_d_ff`` or ``d_ff``)
            applied to all tokens.
        ep_group: the expert-parallel process group; ``None`` -> the world
            group if torch.distributed is initialised, else all experts local;
            ``"local"`` -> all experts local even when distributed.
        router_kwargs: extra constructor arguments for the router (e.g.
            ``num_groups``/``topk_groups`` for deepseek, ``slots_per_expert``
            for softmoe, ``renormalize`` for sigmoid).

    When distributed, ``__init__`` checks (one collective over the world) that
    every rank built the layer with the same configuration and raises a
    ``ValueError`` naming the mismatch otherwise. Expert weights are
    initialised for all ``E`` experts and sliced, so identically seeded ranks
    form one consistent model.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: str = "gshard",
        top_k: int | None = None,
        dispatch: str = "capacity",
        capacity_factor: float = 1.25,
        capacity_multiple: int = 1,
        expert: str = "gelu",
        shared_expert: bool = False,
        shared_d_ff: int | None = None,
        ep_group: dist.ProcessGroup | str | None = None,
        router_kwargs: dict[str, Any] | None = None,
        check_config: bool = True,
    ) -> None:
        super().__init__()
        group, ep_size, ep_rank = resolve_ep_group(ep_group)
        rkw = dict(router_kwargs or {})
        if router == "expert_choice":
            rkw.setdefault("capacity_factor", capacity_factor)
            rkw.setdefault("capacity_multiple", capacity_multiple)
        self.config: dict[str, Any] = dict(
            d_model=d_model,
            d_ff=d_ff,
            num_experts=num_experts,
            router=router,
            top_k=top_k,
            dispatch=dispatch,
            capacity_factor=capacity_factor,
            capacity_multiple=capacity_multiple,
            expert=expert,
            shared_expert=shared_expert,
            shared_d_ff=shared_d_ff,
            ep_size=ep_size,
            router_kwargs=sorted(rkw.items()),
        )
        # First, before any check that could raise on some ranks only and leave
        # the others waiting in a collective: all ranks must agree.
        if check_config and dist.is_initialized() and ep_group != "local":
            check_ranks_agree("MoELayer config", self.config)
        _choose("router", router, ROUTERS)
        _choose("dispatch", dispatch, DISPATCHERS)
        _choose("expert", expert, EXPERTS)
        if router in CAPACITY_ONLY_ROUTERS and dispatch != "capacity":
            raise ValueError(f"router {router!r} needs dispatch='capacity' (it has no per-token top-k), got {dispatch!r}")
        if num_experts < 1 or d_model < 1 or d_ff < 1:
            raise ValueError(f"d_model, d_ff and num_experts must be >= 1, got {d_model}, {d_ff}, {num_experts}")
        if num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the expert-parallel group size {ep_size}"
            )
        self.router = make_router(router, d_model, num_experts, top_k, **rkw)
        self.config["top_k"] = self.router.top_k
        self.d_model = d_model
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = num_experts // ep_size
        self.experts = make_experts(
            expert, d_model, d_ff, num_experts, self.num_local_experts, ep_rank * self.num_local_experts
        )
        self.shared = DenseFFN(d_model, shared_d_ff or d_ff, expert) if shared_expert else None
        comm_group = group if ep_size > 1 else None
        if dispatch == "capacity":
            self.dispatcher: nn.Module = CapacityDispatcher(
                num_experts, capacity_factor, capacity_multiple, comm_group, ep_size
            )
        else:
            self.dispatcher = DroplessDispatcher(num_experts, comm_group, ep_size)

    @property
    def is_expert_parallel(self) -> bool:
        return self.ep_size > 1

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens)
        y = self.dispatcher(tokens, routing, self.experts)
        if self.shared is not None:
            y = y + self.shared(tokens)
        return y.reshape(shape), routing.aux_loss

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={c['d_model']}, d_ff={c['d_ff']}, experts={c['num_experts']} "
            f"({self.num_local_experts} local, ep={self.ep_size}), router={c['router']}, "
            f"dispatch={c['dispatch']}, expert={c['expert']}, shared={c['shared_expert']}"
        )

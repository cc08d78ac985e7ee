"""Megatron-Core's ``MoELayer`` at tiny sizes on CPU: the cases, their expected region facts, and how to build them.

The layer is megatron-core's own (``megatron.core.transformer.moe.moe_layer.MoELayer``) with the local
(non-Transformer-Engine) module spec: ``TopKRouter``, the ``alltoall`` token dispatcher, ``SequentialMLP``
experts (one ``ColumnParallelLinear``/``RowParallelLinear`` MLP per local expert, the routing probabilities
applied inside each expert between its two linears) and, when asked, a ``SharedExpertMLP``. Expert
parallelism is Megatron's own: ``parallel_state.initialize_model_parallel(expert_model_parallel_size=...)``
on the process group the caller made (one gloo rank, or the test suite's 2-rank pool).

Megatron-Core is written for CUDA. :func:`cpu_patches` holds the few process-local changes it needs to
run on CPU, each with why; they are undone on exit. :data:`DYNAMO` holds the Dynamo settings it needs
to be captured as one graph per direction (none of them changes the library).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

HIDDEN, FFN, SHARED_FFN = 64, 96, 64
SEQ, BATCH = 8, 2  # Megatron's activations are [seq, batch, hidden]
TOKENS = SEQ * BATCH


@dataclass(frozen=True)
class MegatronCase:
    """One configuration of Megatron's ``MoELayer`` and the region the recogniser must find for it."""

    experts: int = 4
    topk: int = 2
    shared: bool = False  # moe_shared_expert_intermediate_size
    capacity_factor: float | None = None  # with moe_pad_expert_input_to_capacity: fixed [E, C] buffers
    aux_loss: float = 1e-2  # moe_aux_loss_coeff (a second softmax and topk on the same logits)
    z_loss: float | None = None  # moe_z_loss_coeff (a logsumexp on the logits)
    score: str = "softmax"  # moe_router_score_function
    dispatcher: str = "alltoall"  # moe_token_dispatcher_type (Megatron's own default is "allgather")
    config: dict[str, Any] = field(default_factory=dict)  # any other TransformerConfig field

    def capacity(self, tokens: int = TOKENS) -> int | None:
        """Megatron's expert capacity (``get_capacity`` of tokens * topk over the experts), or None (dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(tokens * self.topk / self.experts * self.capacity_factor)

    @property
    def router_kind(self) -> str:
        return "sigmoid-topk" if self.score == "sigmoid" else "softmax-topk"


CASES: dict[str, MegatronCase] = {
    # TransformerConfig's defaults: the allgather dispatcher (at one rank: permute by the routing map, unpermute)
    "default-allgather-top2": MegatronCase(dispatcher="allgather"),
    # the default dispatch: dropless, sort by expert (masked_select + index_select), scatter_add back
    "dropless-top2": MegatronCase(),
    # + a shared expert beside the routed ones, and the router z-loss (logsumexp of the logits)
    "dropless-top2-shared-zloss": MegatronCase(shared=True, z_loss=1e-3),
    # token dropping with padding to capacity: argsort of the routing map, fixed [E * C] buffers
    "capacity-top2": MegatronCase(capacity_factor=1.0, config={"moe_pad_expert_input_to_capacity": True}),
    # token dropping without padding: dropped tokens are masked out of the routing map, counts stay data-dependent
    "capacity-nopad-top2": MegatronCase(capacity_factor=1.0),
    # DeepSeek-V3 style: sigmoid scores, an expert bias, group-limited routing (2 groups, the best 1), 8 experts
    "sigmoid-grouped-top2": MegatronCase(experts=8, score="sigmoid", config={
        "moe_router_enable_expert_bias": True, "moe_router_num_groups": 2, "moe_router_group_topk": 1,
        "moe_router_pre_softmax": False}),
}


# ---------------------------------------------------------------------------------------------------------------
# running Megatron-Core on CPU


class _ChunkOrder(list):
    """A constant chunk order as Python ints, read by Megatron through ``.tolist()``."""

    def tolist(self) -> list[int]:
        return list(self)


@contextlib.contextmanager
def cpu_patches() -> Iterator[None]:
    """The process-local changes Megatron-Core needs on CPU, undone on exit. Each says why.

    Nothing here changes what the layer computes: each patch replaces a CUDA call by what it does on CPU, or
    fixes a name the library leaves undefined without Transformer Engine.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    saved: list[tuple[Any, str, Any]] = []
    missing = object()

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, vars(obj).get(name, missing) if isinstance(obj, type) else getattr(obj, name, missing)))
        setattr(obj, name, value)

    # The router moves its weight to ``torch.cuda.current_device()`` and the all-to-all allocates its output
    # there; on CPU that device is the CPU (the moves become no-ops). Dynamo classifies ``torch.*`` callables by
    # the object it finds under their name when it first builds its rule map (again after each
    # ``torch._dynamo.reset()``): built while this patch is in place, the map would take the replacement for an
    # in-graph torch op that returns a non-tensor (a hard error). Building it first keeps the real function
    # there and lets Dynamo inline the replacement (a constant device). So: reset Dynamo outside this context.
    from torch._dynamo import trace_rules

    trace_rules.get_torch_obj_rule_map()
    patch(torch.cuda, "current_device", _cpu_device)
    # The alltoall dispatcher makes one ``torch.cuda.Stream`` for device-to-host copies at construction;
    # a non-None placeholder makes it skip that (it only creates the stream when the class attribute is None).
    patch(token_dispatcher.MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", "no CUDA stream on CPU")
    # ... and, at its device-to-host point, copies the all-to-all split sizes to the host as numpy arrays on that
    # stream (``maybe_move_tensor_to_cpu(..., as_numpy=True)``) and synchronises with it. On CPU that function
    # leaves CPU tensors alone, so the split sizes would reach ``all_to_all_single`` as tensors, which it
    # rejects. The CPU version makes the same host copies (Python ints) without the stream calls.
    patch(token_dispatcher.MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize", _host_split_sizes)
    # Without Transformer Engine, ``RouterGatingLinearFunction`` reads the module global ``te_general_gemm``
    # that only the Transformer Engine import defines (a NameError); None is what it means there: plain mm.
    patch(moe_utils, "te_general_gemm", None)
    # ``MoEAuxLossAutoScaler.backward`` reads and, on first use, sets a class attribute; Dynamo cannot trace
    # that read (a graph break at every ``MoEAuxLossAutoScaler.apply``, which splits the router from the
    # experts). Megatron's training schedule sets the scale (``set_loss_scale``) before the first step; this
    # backward returns what the original returns with that scale at 1.0.
    patch(moe_utils.MoEAuxLossAutoScaler, "backward", staticmethod(_aux_loss_scaler_backward))
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def _cpu_device() -> torch.device:
    """``torch.cuda.current_device`` on CPU: the CPU."""
    return torch.device("cpu")


def _host_split_sizes(self: Any, point: str, tokens_per_expert: torch.Tensor | None = None) -> Any:
    """``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` on CPU: at the device-to-host point, the split
    sizes as host ints (the original makes numpy arrays of them); nothing to synchronise."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.tolist())
    return tokens_per_expert


def _aux_loss_scaler_backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (aux_loss,) = ctx.saved_tensors
    return grad_output, torch.ones_like(aux_loss)


def _traceable_chunk_orders(layer: nn.Module) -> None:
    """Megatron keeps the constant order that sorts received chunks by local expert as a CPU tensor and reads it
    with ``.tolist()`` inside the forward; Dynamo turns those reads into data-dependent ints and then cannot index
    a Python list with them (a hard error, not a graph break, with ``capture_scalar_outputs``). The same
    constants as Python ints (with the ``.tolist()`` Megatron calls) keep its ``split`` + ``cat`` as written."""
    d = layer.token_dispatcher
    if not hasattr(d, "sort_input_by_local_experts"):  # the allgather dispatcher keeps no chunk order
        return
    d.sort_input_by_local_experts = _ChunkOrder(d.sort_input_by_local_experts.tolist())
    d.restore_output_by_local_experts = _ChunkOrder(d.restore_output_by_local_experts.tolist())


#: Dynamo settings under which Megatron's layer is one graph per direction (``torch._dynamo.config.patch``):
#: ``.tolist()`` split sizes and ``masked_select`` are data-dependent; Megatron's tensor-parallel linear warns
#: (``warnings.warn``) on rank 0 only at every call, which Dynamo cannot trace: ignored, else rank 0 breaks its
#: graph at every expert linear and rank 1 does not.
DYNAMO = {
    "capture_scalar_outputs": True,
    "capture_dynamic_output_shape_ops": True,
    "ignore_logging_functions": {warnings.warn},
}


# ---------------------------------------------------------------------------------------------------------------
# process groups


@contextlib.contextmanager
def one_rank() -> Iterator[None]:
    """A gloo process group of one rank in this process (Megatron needs ``torch.distributed``), torn down after."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def model_parallel(ep: int) -> Iterator[None]:
    """Megatron's parallel state with expert parallelism ``ep`` over the default process group, destroyed after."""
    from megatron.core import parallel_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_state.initialize_model_parallel(expert_model_parallel_size=ep, create_gloo_process_groups=False)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


# ---------------------------------------------------------------------------------------------------------------
# the layer


class Block(nn.Module):
    """Megatron's ``MoELayer`` with a residual; forward returns the layer output (``[seq, batch, hidden]``)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, bias = self.moe(x)
        assert bias is None
        return x + out


def build(case: MegatronCase, rank: int = 0, seed: int = 0, layers: int = 1) -> nn.Module:
    """The layer of ``case`` under the current parallel state, inside :func:`cpu_patches` (a :class:`Block`;
    ``layers`` > 1: that many blocks in a row, seeded ``seed``, ``seed + 1``, ...).

    Weights are seeded: the router and the shared expert the same on every rank, each rank's local experts
    from a seed of their own (so experts on different ranks differ and a misrouted token shows).
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=layers, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=4,
        num_moe_experts=case.experts, moe_router_topk=case.topk, moe_token_dispatcher_type=case.dispatcher,
        moe_router_score_function=case.score, moe_aux_loss_coeff=case.aux_loss, moe_z_loss_coeff=case.z_loss,
        moe_expert_capacity_factor=case.capacity_factor,
        moe_shared_expert_intermediate_size=SHARED_FFN if case.shared else None,
        expert_model_parallel_size=_ep_size(), use_cpu_initialization=True, add_bias_linear=False,
        params_dtype=torch.float32, init_method_std=0.05,
    )
    kwargs.update(case.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(**kwargs)
        spec = get_moe_module_spec(use_te=False, num_experts=case.experts, moe_grouped_gemm=False)
    if layers > 1:
        return nn.Sequential(*(_block(case, config, spec, rank, seed + i, i + 1) for i in range(layers)))
    return _block(case, config, spec, rank, seed, 1)


def _block(case: MegatronCase, config: Any, spec: Any, rank: int, seed: int, number: int) -> Block:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        layer = MoELayer(config, spec.submodules, layer_number=number)
    _traceable_chunk_orders(layer)
    gen = torch.Generator().manual_seed(seed)
    expert_gen = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            g = expert_gen if name.startswith("experts.") else gen
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.startswith("router.") else 0.1))
    return Block(layer)


def _ep_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size()


def inputs(rank: int = 0, step: int = 0) -> torch.Tensor:
    """A seeded ``[seq, batch, hidden]`` input of one rank at one step."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=g)


def step_values(model: torch.nn.Module, fn: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss, input gradient and every parameter's gradient of one step of ``fn`` (the model eager or compiled;
    aux and z-loss gradients included)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    loss = fn(x).pow(2).mean()
    loss.backward()
    out = {"loss": loss.detach().clone(), "input": x.grad.clone()}
    out.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out

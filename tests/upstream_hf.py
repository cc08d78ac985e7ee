"""HF transformers' MoE blocks and tiny MoE language models, built the way the upstream tests of this suite need them.

Each ``HFCase`` names an architecture (Mixtral, Qwen3-MoE, DeepSeek-V3), the
experts implementation the block runs (``config._experts_implementation``:
``"eager"``, the library's Python loop over ``nonzero()`` of expert hits;
``"batched_mm"``, expert weights gathered per token and ``bmm``;
``"grouped_mm"``, a sort-based dropless permutation and a grouped GEMM, which
on CPU in float32 under ``torch.compile`` is the opaque custom op
``transformers::grouped_mm_fallback`` and in bfloat16 ``aten._grouped_mm``),
the dtype, whether it is the bare MoE block or a 2-layer causal LM (with its
load-balancing auxiliary loss where the architecture has one), and the region
facts recognition must report. ``build`` makes the module, its inputs and its
loss, seeded, at tiny sizes (hidden 64, 4-8 experts, top-2).

Every other experts implementation transformers 5.25 registers is in
``LEFT_OUT`` with the reason no case runs it (a test pins the registry, so a
new one in a later version fails until it is a case or has a reason).

transformers' own expert parallelism (``from_pretrained(...,
distributed_config=DistributedConfig(tp_size=2, tp_plan={}, ep_size=2,
ep_implementation="all_to_all"))``) is not a case: it loads through
``from_pretrained`` only and needs ``accelerate``, which the ``ecosystem``
extra does not install. Tried by hand (with ``accelerate``, 2 gloo ranks): it
compiles, but each rank first takes its own TP slice of the batch (a local
``Replicate -> Shard(0)`` redistribute: rank r keeps output r of one split),
so the two graphs differ only in which ``getitem`` nodes remain, and the
profiler's cost agreement, keyed by node name, stops with "ranks profiled
different graphs" (``check_ranks=False`` too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

HIDDEN, BATCH, SEQ, VOCAB = 64, 2, 8, 128


@dataclass(frozen=True)
class HFCase:
    """One upstream case and the regions it must give in each graph (forward and backward alike)."""

    arch: str  # "mixtral" | "qwen3_moe" | "deepseek_v3"
    experts: str  # config._experts_implementation
    model: bool = False  # the tiny causal LM instead of the bare MoE block
    dtype: torch.dtype = torch.float32
    # expected facts of every region
    router: str = "softmax-topk"
    num_experts: int = 8
    top_k: int = 2
    shared: bool = False
    layers: int = 1  # MoE layers: regions expected per graph
    one_graph: bool = True  # False: Dynamo breaks the graph inside the layer (the eager expert loop)

    @property
    def id(self) -> str:
        parts = [self.arch, "model" if self.model else "block", self.experts]
        if self.dtype is not torch.float32:
            parts.append(str(self.dtype).removeprefix("torch."))
        return "-".join(parts)


def _mixtral(model: bool, **kw):
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                        num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                        max_position_embeddings=64, output_router_logits=model, router_aux_loss_coef=0.05, **kw)
    if model:
        from transformers import MixtralForCausalLM

        return MixtralForCausalLM, cfg
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return MixtralSparseMoeBlock, cfg


def _qwen3_moe(model: bool, **kw):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=2, decoder_sparse_step=1, mlp_only_layers=[],
                         vocab_size=VOCAB, max_position_embeddings=64, output_router_logits=model,
                         router_aux_loss_coef=0.05, **kw)
    if model:
        from transformers import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM, cfg
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return Qwen3MoeSparseMoeBlock, cfg


def _deepseek_v3(model: bool, **kw):
    from transformers import DeepseekV3Config

    # group-limited routing: 8 experts in 4 groups, the best 2 groups, then the top-2 experts in them
    cfg = DeepseekV3Config(hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                           num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5, first_k_dense_replace=1, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=VOCAB,
                           max_position_embeddings=64, **kw)
    if model:
        from transformers import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM, cfg
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    return DeepseekV3MoE, cfg


ARCHS: dict[str, Callable] = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3}


def build(case: HFCase, seed: int = 0) -> tuple[nn.Module, tuple, Callable]:
    """``(module, inputs, loss_of)`` for ``case``: seeded weights, ``loss_of(module(*inputs))`` a scalar.

    The block gets every parameter drawn from N(0, 0.1) (several are created
    empty or zero) and DeepSeek's score-correction bias a random value, so the
    bias changes the choice; the causal LMs keep the library's own init.
    Blocks take a ``[batch, seq, hidden]`` input that requires grad; the
    models take token ids with labels, and their loss includes the auxiliary
    loss (Mixtral, Qwen3-MoE: ``output_router_logits=True``).
    """
    torch.manual_seed(seed)
    cls, cfg = ARCHS[case.arch](case.model, attn_implementation="eager")
    cfg._experts_implementation = case.experts
    module = cls(cfg)
    if not case.model:
        for p in module.parameters():
            nn.init.normal_(p, std=0.1)
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn_like(b))
    module = module.to(case.dtype).train()
    if case.model:
        ids = torch.randint(0, VOCAB, (BATCH, SEQ))
        return module, (ids, ids.clone()), _model_loss
    x = torch.randn(BATCH, SEQ, HIDDEN, dtype=case.dtype, requires_grad=True)
    return module, (x,), _block_loss


def _model_loss(out) -> torch.Tensor:
    return out.loss


def _block_loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def call(module: nn.Module, inputs: tuple):
    """Run ``module`` on ``inputs`` as its case does (a causal LM takes ``input_ids`` and ``labels``)."""
    if len(inputs) == 2 and not inputs[0].is_floating_point():
        return module(input_ids=inputs[0], labels=inputs[1])
    return module(*inputs)


_E = {"mixtral": 4, "qwen3_moe": 8, "deepseek_v3": 8}
#: The experts' inner width per architecture (the input width of each expert's down projection).
FFN = {"mixtral": 128, "qwen3_moe": 32, "deepseek_v3": 32}
_ROUTER = {"mixtral": "softmax-topk", "qwen3_moe": "softmax-topk", "deepseek_v3": "sigmoid-topk"}


def _case(arch: str, experts: str, model: bool = False, dtype: torch.dtype = torch.float32) -> HFCase:
    return HFCase(arch=arch, experts=experts, model=model, dtype=dtype, router=_ROUTER[arch], num_experts=_E[arch],
                  shared=arch == "deepseek_v3", layers=2 if model else 1, one_graph=experts != "eager")


#: Every architecture with every experts implementation that runs on CPU, as the bare block; grouped_mm in
#: bfloat16 too (aten._grouped_mm instead of the opaque fallback); and each causal LM (2 MoE layers, attention,
#: the auxiliary loss) with the library's default implementation.
CASES: list[HFCase] = (
    [_case(arch, experts) for arch in ARCHS for experts in ("grouped_mm", "batched_mm")]
    + [_case(arch, "grouped_mm", dtype=torch.bfloat16) for arch in ARCHS]
    + [_case(arch, "grouped_mm", model=True) for arch in ARCHS]
    + [_case(arch, "eager") for arch in ARCHS]
)


#: Experts implementations transformers registers (``ExpertsInterface``, and ``FP8ExpertsInterface`` for
#: FP8-quantized models) that no case runs, and why. The user's switch is the same for all:
#: ``from_pretrained(..., experts_implementation=...)``, ``model.set_experts_implementation(...)`` or
#: ``config._experts_implementation``; ``eager`` is a case (``LOOP_CASES``), left out by the backend itself.
LEFT_OUT: dict[str, str] = {
    "deepgemm": "a CUDA kernel (DeepGEMM, Hopper or newer, CUDA >= 12.3) fetched from the Hub by the `kernels` "
                "package at first use: needs a GPU; this suite is CPU-only",
    "sonicmoe": "a CUDA kernel (SonicMoE, CuTe DSL) fetched from the Hub by the `kernels` package at first use: "
                "needs an NVIDIA GPU; this suite is CPU-only",
    "deepgemm_megamoe": "FP8/FP4-quantized experts only (FineGrainedFP8 quantization, which needs a GPU or XPU), "
                        "a DeepGEMM CUDA kernel: not a training configuration of this backend",
}

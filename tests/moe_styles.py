"""MoE blocks written the way other libraries write them, and look-alikes that are not MoE.

These are test fixtures for ``passes.recognize``: plain ``nn.Module`` code in the
three common styles (a per-expert loop with ``index_add_`` as in Mixtral,
one-hot/einsum capacity dispatch as in GShard/Switch/DeepSpeed, and a sort-based
dropless permutation as in Megatron), each optionally with a shared expert, plus
negative controls (a dense transformer block, attention alone, and modules that
call ``topk`` for something other than routing). Nothing here imports
``fsmoe_compiler``: the recogniser must find these from the ATen graph alone.

Every block maps ``[batch, seq, hidden]`` to the same shape and records the
numbers the recogniser should report in ``expected``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLUExpert(nn.Module):
    """One feed-forward expert, w2(silu(w1 x) * w3 x), as in Mixtral."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SharedExpert(nn.Module):
    """A dense expert every token goes through, gated by a sigmoid (Qwen2-MoE style)."""

    def __init__(self, hidden: int, ffn: int, gated: bool = True) -> None:
        super().__init__()
        self.mlp = SwiGLUExpert(hidden, ffn)
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out


class LoopMoE(nn.Module):
    """Mixtral/HF style: softmax -> topk -> renormalise -> loop over experts with index_add_."""

    def __init__(self, hidden=16, ffn=32, num_experts=4, top_k=2, shared: bool = False,
                 softmax_after_topk: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.softmax_after_topk = softmax_after_topk  # older Mixtral code: topk on logits, softmax over the k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, ffn) for _ in range(num_experts))
        self.shared_expert = SharedExpert(hidden, ffn) if shared else None
        self.expected = dict(num_experts=num_experts, top_k=top_k, capacity=None, dropless=True,
                             hidden=hidden, ffn_hidden=ffn)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        router_logits = self.gate(hidden_states)
        if self.softmax_after_topk:
            top_logits, selected_experts = torch.topk(router_logits, self.top_k, dim=-1)
            routing_weights = F.softmax(top_logits, dim=-1, dtype=torch.float)
        else:
            routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((b * s, h), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            current_state = hidden_states[None, top_x].reshape(-1, h)
            current = self.experts[e](current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        if self.shared_expert is not None:
            final = final + self.shared_expert(hidden_states)
        return final.reshape(b, s, h)


class CapacityMoE(nn.Module):
    """GShard/Switch/DeepSpeed style: one-hot masks, cumsum positions, capacity, einsum dispatch/combine.

    Experts are batched weights ``[E, M, H]`` applied with einsum over the expert
    dimension; the auxiliary load-balancing loss is added to the output as a
    side term, as training code often does through a hook.
    """

    def __init__(self, hidden=16, ffn=32, num_experts=4, top_k=2, capacity_factor=1.0,
                 tokens=24, shared: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity = int(math.ceil(top_k * capacity_factor * tokens / num_experts))
        self.wg = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, hidden, ffn) / math.sqrt(hidden))
        self.w_out = nn.Parameter(torch.randn(num_experts, ffn, hidden) / math.sqrt(ffn))
        self.shared_expert = SharedExpert(hidden, ffn, gated=False) if shared else None
        self.expected = dict(num_experts=num_experts, top_k=top_k, capacity=self.capacity,
                             dropless=False, hidden=hidden, ffn_hidden=ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        reshaped = x.reshape(-1, m)
        logits = self.wg(reshaped)
        gates = F.softmax(logits, dim=1)
        topk_vals, topk_idx = torch.topk(gates, self.top_k, dim=1)
        masks = F.one_hot(topk_idx, self.num_experts)  # [S, k, E]
        # position of each (token, choice) inside its expert's buffer, choice-major as GShard does
        flat = masks.transpose(0, 1).reshape(-1, self.num_experts)  # [k*S, E]
        locations = (torch.cumsum(flat, dim=0) - 1).reshape(self.top_k, -1, self.num_experts).transpose(0, 1)
        keep = (locations < self.capacity) & (masks > 0)
        loc_s = (locations * keep).sum(dim=-1)  # [S, k]
        gate_s = topk_vals * keep.any(dim=-1)
        gate_s = gate_s / gate_s.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gate_s.dtype).eps)
        loc_sc = F.one_hot(loc_s, self.capacity)  # [S, k, C]
        combine = torch.einsum("ske,skc->sec", (masks * keep).to(x.dtype) * gate_s[..., None], loc_sc.to(x.dtype))
        dispatch_mask = combine.bool()
        # auxiliary loss: E * mean over experts of (mean gate * fraction routed)
        me = gates.mean(dim=0)
        ce = masks[:, 0].to(x.dtype).mean(dim=0)
        l_aux = (me * ce).sum() * self.num_experts
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.to(x.dtype), reshaped)
        h = F.gelu(torch.einsum("ecm,emh->ech", dispatched, self.w_in))
        expert_out = torch.einsum("ech,ehm->ecm", h, self.w_out)
        out = torch.einsum("sec,ecm->sm", combine, expert_out)
        if self.shared_expert is not None:
            out = out + self.shared_expert(reshaped)
        return out.reshape(b, s, m) + 0.0 * l_aux


class ArgmaxTop1MoE(nn.Module):
    """DeepSpeed top-1 gating: argmax (no topk), one-hot mask, cumsum locations, capacity, einsum dispatch."""

    def __init__(self, hidden=16, ffn=32, num_experts=4, capacity_factor=1.0, tokens=24, shared: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = int(math.ceil(capacity_factor * tokens / num_experts))
        self.wg = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, hidden, ffn) / math.sqrt(hidden))
        self.w_out = nn.Parameter(torch.randn(num_experts, ffn, hidden) / math.sqrt(ffn))
        self.shared_expert = SharedExpert(hidden, ffn, gated=False) if shared else None
        self.expected = dict(num_experts=num_experts, top_k=1, capacity=self.capacity, dropless=False,
                             hidden=hidden, ffn_hidden=ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        reshaped = x.reshape(-1, m)
        gates = F.softmax(self.wg(reshaped), dim=1)
        indices1_s = torch.argmax(gates, dim=1)
        mask1 = F.one_hot(indices1_s, num_classes=self.num_experts)
        locations1 = torch.cumsum(mask1, dim=0) - 1
        mask1 = mask1 * torch.lt(locations1, self.capacity)
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        gates1_s = (gates * mask1).sum(dim=1)
        locations1_sc = F.one_hot(locations1_s, self.capacity).to(x.dtype)
        combine = torch.einsum("se,sc->sec", gates1_s.unsqueeze(-1) * mask1.to(x.dtype), locations1_sc)
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(x.dtype), reshaped)
        h = F.relu(torch.einsum("ecm,emh->ech", dispatched, self.w_in))
        out = torch.einsum("sec,ecm->sm", combine, torch.einsum("ech,ehm->ecm", h, self.w_out))
        if self.shared_expert is not None:
            out = out + self.shared_expert(reshaped)
        return out.reshape(b, s, m)


class SortMoE(nn.Module):
    """Megatron style: argsort of expert ids, index_select, per-expert mm over split sizes, scatter back.

    ``grouped=True`` runs the experts with ``torch._grouped_mm`` over offsets
    instead of one ``mm`` per expert.
    """

    def __init__(self, hidden=16, ffn=32, num_experts=4, top_k=2, shared: bool = False,
                 grouped: bool = False, score: str = "softmax", shared_on_input: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.grouped, self.score = num_experts, top_k, grouped, score
        self.shared_on_input = shared_on_input  # DeepSeek style: shared expert on the [B, S, M] input
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.fc1 = nn.Parameter(torch.randn(num_experts, hidden, ffn) / math.sqrt(hidden))
        self.fc2 = nn.Parameter(torch.randn(num_experts, ffn, hidden) / math.sqrt(ffn))
        self.shared_expert = SharedExpert(hidden, ffn) if shared else None
        self.expected = dict(num_experts=num_experts, top_k=top_k, capacity=None, dropless=True,
                             hidden=hidden, ffn_hidden=ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        tokens = x.reshape(-1, m)
        logits = self.router(tokens)
        if self.score == "sigmoid":
            scores = torch.sigmoid(logits)
            probs, idx = torch.topk(scores, self.top_k, dim=-1)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        else:
            probs, idx = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        flat_idx = idx.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        token_of = order // self.top_k
        permuted = tokens.index_select(0, token_of)
        counts = F.one_hot(flat_idx, self.num_experts).sum(dim=0)  # tokens per expert, [E]
        if self.grouped:
            # the CPU/meta kernels of _grouped_mm want bf16 operands
            offs = torch.cumsum(counts, dim=0).to(torch.int32)
            h = F.silu(torch._grouped_mm(permuted.bfloat16(), self.fc1.bfloat16(), offs=offs))
            out = torch._grouped_mm(h, self.fc2.bfloat16(), offs=offs).float()
        else:
            sizes = counts.tolist()
            for n in sizes:
                torch._check(n >= 0)
            torch._check(sum(sizes) == permuted.shape[0])
            chunks = torch.split(permuted, sizes)
            outs = [F.silu(c @ self.fc1[e]) @ self.fc2[e] for e, c in enumerate(chunks)]
            out = torch.cat(outs, dim=0)
        weighted = out * probs.reshape(-1)[order].unsqueeze(-1)
        result = torch.zeros_like(tokens).scatter_add(0, token_of.unsqueeze(-1).expand(-1, m), weighted)
        if self.shared_expert is not None and self.shared_on_input:
            return result.reshape(b, s, m) + self.shared_expert(x)
        if self.shared_expert is not None:
            result = result + self.shared_expert(tokens)
        return result.reshape(b, s, m)


@torch.library.custom_op("moe_styles::scatter_rows", mutates_args=())
def scatter_rows(src: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """A library's own scatter-add of rows (opaque to the compiler): ``out[index[i]] += src[i]``."""
    return src.new_zeros(rows, src.shape[1]).index_add(0, index, src)


@scatter_rows.register_fake
def _(src, index, rows):
    return src.new_empty(rows, src.shape[1])


def _scatter_rows_backward(ctx, grad):
    return grad.index_select(0, ctx.index), None, None


def _scatter_rows_setup(ctx, inputs, output):
    ctx.index = inputs[1]


scatter_rows.register_autograd(_scatter_rows_backward, setup_context=_scatter_rows_setup)


class OpaqueCombineMoE(SortMoE):
    """Sort-based MoE whose un-permute is an opaque custom op (as libraries ship their own kernels)."""

    def weighted_rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' outputs in expert order, scaled by their routing weights, and each row's token."""
        probs, idx = torch.topk(torch.softmax(self.router(tokens), dim=-1), self.top_k, dim=-1)
        order = torch.argsort(idx.reshape(-1), stable=True)
        token_of = order // self.top_k
        permuted = tokens.index_select(0, token_of)
        counts = F.one_hot(idx.reshape(-1), self.num_experts).sum(dim=0)
        sizes = counts.tolist()
        for n in sizes:
            torch._check(n >= 0)
        torch._check(sum(sizes) == permuted.shape[0])
        outs = [F.silu(c @ self.fc1[e]) @ self.fc2[e] for e, c in enumerate(torch.split(permuted, sizes))]
        return torch.cat(outs, dim=0) * probs.reshape(-1)[order].unsqueeze(-1), token_of

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        weighted, token_of = self.weighted_rows(x.reshape(-1, m))
        return scatter_rows(weighted, token_of, b * s).reshape(b, s, m)


@torch.library.custom_op("moe_styles::rows_rescaled", mutates_args=())
def rows_rescaled(x: torch.Tensor) -> torch.Tensor:
    """A library's own kernel that reads token-order rows and takes no routing index (opaque, not a scatter)."""
    return x * 0.5


@rows_rescaled.register_fake
def _(x):
    return torch.empty_like(x)


rows_rescaled.register_autograd(lambda ctx, grad: grad * 0.5)


class OpaqueEpilogueMoE(OpaqueCombineMoE):
    """Sort-based MoE whose combined output goes through an opaque kernel without a routing index."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        tokens = x.reshape(-1, m)
        weighted, token_of = self.weighted_rows(tokens)
        combined = torch.zeros_like(tokens).index_add(0, token_of, weighted)
        return rows_rescaled(combined).reshape(b, s, m)


class _InplaceAllToAll(torch.autograd.Function):
    """Variable-size all-to-all written with the in-place c10d call (``dist.all_to_all_single(out, inp)``),
    its backward the reverse exchange, as Megatron-style code writes it. Dynamo traces each call as the
    functional all-to-all, a ``wait_tensor`` and an ``aten.copy`` into the preallocated output."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits):
        ctx.splits = (out_splits, in_splits)
        out = x.new_empty(sum(out_splits), x.shape[1])
        torch.distributed.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), grad.shape[1])
        torch.distributed.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits)
        return grad_in, None, None


class InplaceA2AMoE(nn.Module):
    """Dropless expert parallelism over the default process group with in-place all-to-alls: ``histc`` counts,
    an integer count exchange, ``.tolist()`` split sizes, the data exchange, a per-expert loop over the received
    segments (rank-major), the exchange back and an ``index_add`` un-permute."""

    def __init__(self, hidden=16, ffn=32, num_experts=4, top_k=2) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.ep = torch.distributed.get_world_size()
        local = num_experts // self.ep
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.fc1 = nn.Parameter(torch.randn(local, hidden, ffn) / math.sqrt(hidden))
        self.fc2 = nn.Parameter(torch.randn(local, ffn, hidden) / math.sqrt(ffn))
        self.expected = dict(num_experts=num_experts, top_k=top_k, capacity=None, dropless=True,
                             hidden=hidden, ffn_hidden=ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        tokens = x.reshape(-1, m)
        probs, idx = torch.topk(torch.softmax(self.router(tokens), dim=-1), self.top_k, dim=-1)
        order = torch.argsort(idx.reshape(-1), stable=True)
        token_of = order // self.top_k
        permuted = tokens.index_select(0, token_of)
        counts = torch.histc(idx.reshape(-1).float(), bins=self.num_experts, min=0, max=self.num_experts - 1).long()
        received = torch.empty_like(counts)
        torch.distributed.all_to_all_single(received, counts)
        in_splits = counts.view(self.ep, -1).sum(1).tolist()
        out_splits = received.view(self.ep, -1).sum(1).tolist()
        recv = _InplaceAllToAll.apply(permuted, out_splits, in_splits)
        segments = torch.split(recv, received.tolist())
        local = self.fc1.shape[0]
        outs = [F.silu(seg @ self.fc1[i % local]) @ self.fc2[i % local] for i, seg in enumerate(segments)]
        back = _InplaceAllToAll.apply(torch.cat(outs), in_splits, out_splits)
        weighted = back * probs.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(tokens).index_add(0, token_of, weighted).reshape(b, s, m)


class InplaceCapacityA2AMoE(CapacityMoE):
    """Expert parallelism written by hand around GShard-style capacity dispatch (einsum into ``[E, C, M]``), as
    users write their own EP experts: one in-place all-to-all into a preallocated buffer, per-expert indexing of
    the received buffer (``recv[e]``, an ``aten.select``) in a loop over the local experts, and the in-place
    exchange back before the einsum combine. Every rank holds ``E / world`` experts."""

    def __init__(self, hidden=16, ffn=32, num_experts=4, top_k=2, capacity_factor=1.0, tokens=24,
                 shared: bool = False) -> None:
        super().__init__(hidden, ffn, num_experts, top_k, capacity_factor, tokens, shared)
        self.ep = torch.distributed.get_world_size()
        local = num_experts // self.ep
        self.w_in = nn.Parameter(torch.randn(local, hidden, ffn) / math.sqrt(hidden))
        self.w_out = nn.Parameter(torch.randn(local, ffn, hidden) / math.sqrt(ffn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        reshaped = x.reshape(-1, m)
        gates = F.softmax(self.wg(reshaped), dim=1)
        topk_vals, topk_idx = torch.topk(gates, self.top_k, dim=1)
        masks = F.one_hot(topk_idx, self.num_experts)
        flat = masks.transpose(0, 1).reshape(-1, self.num_experts)
        locations = (torch.cumsum(flat, dim=0) - 1).reshape(self.top_k, -1, self.num_experts).transpose(0, 1)
        keep = (locations < self.capacity) & (masks > 0)
        loc_s = (locations * keep).sum(dim=-1)
        gate_s = topk_vals * keep.any(dim=-1)
        gate_s = gate_s / gate_s.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gate_s.dtype).eps)
        loc_sc = F.one_hot(loc_s, self.capacity)
        combine = torch.einsum("ske,skc->sec", (masks * keep).to(x.dtype) * gate_s[..., None], loc_sc.to(x.dtype))
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(x.dtype), reshaped)  # [E, C, M]
        local, c = self.w_in.shape[0], self.capacity
        splits = [local * c] * self.ep
        recv = _InplaceAllToAll.apply(dispatched.reshape(-1, m), splits, splits)  # rank-major [ep*local*C, M]
        recv = recv.view(self.ep, local, c, m).transpose(0, 1)  # [local, ep, C, M]
        outs = [F.gelu(recv[e] @ self.w_in[e]) @ self.w_out[e] for e in range(local)]  # recv[e]: [ep, C, M]
        y = torch.stack(outs).transpose(0, 1).reshape(-1, m)
        back = _InplaceAllToAll.apply(y, splits, splits).view(self.num_experts, c, m)
        out = torch.einsum("sec,ecm->sm", combine, back)
        if self.shared_expert is not None:
            out = out + self.shared_expert(reshaped)
        return out.reshape(b, s, m)


class Attention(nn.Module):
    """Plain multi-head self-attention (negative control)."""

    def __init__(self, hidden=16, heads=2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, m // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(m // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, s, m))


class DenseBlock(nn.Module):
    """Pre-norm transformer block with attention and a dense GELU MLP (negative control)."""

    def __init__(self, hidden=16, ffn=32) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = Attention(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TopKNotRouting(nn.Module):
    """topk that is not routing: top-k pooling over the sequence and a top-k sampling head.

    The pooling scores ``[batch, seq]`` go through a softmax and topk, the chosen
    tokens are gathered and projected by one dense layer; the head takes a
    softmax over a vocabulary and keeps the top-k probabilities. Negative control.
    """

    def __init__(self, hidden=16, vocab=32, keep=4, sample_k=5) -> None:
        super().__init__()
        self.keep, self.sample_k = keep, sample_k
        self.score = nn.Linear(hidden, 1)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        scores = torch.softmax(self.score(x).squeeze(-1), dim=-1)  # [b, s]
        w, pos = torch.topk(scores, self.keep, dim=-1)
        picked = torch.gather(x, 1, pos.unsqueeze(-1).expand(-1, -1, m)) * w.unsqueeze(-1)
        pooled = self.mlp(self.proj(picked)).mean(dim=1, keepdim=True)  # [b, 1, m]
        probs = torch.softmax(self.head(x + pooled), dim=-1)  # [b, s, vocab]
        top_p, top_i = torch.topk(probs, self.sample_k, dim=-1)
        picked_logp = torch.log(top_p) + 0.0 * top_i.to(top_p.dtype)
        return x + pooled + picked_logp.sum(-1, keepdim=True)


class Block(nn.Module):
    """Pre-norm transformer block whose MLP is the given module (MoE or dense)."""

    def __init__(self, mlp: nn.Module, hidden=16, attention: bool = True) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = Attention(hidden) if attention else None
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Stack(nn.Module):
    """Several blocks in sequence, e.g. a two-layer MoE model."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


STYLES = {
    "loop": LoopMoE,
    "loop-topk-softmax": lambda **kw: LoopMoE(softmax_after_topk=True, **kw),
    "capacity": CapacityMoE,
    "argmax-top1": ArgmaxTop1MoE,
    "sort": SortMoE,
    "sort-grouped": lambda **kw: SortMoE(grouped=True, **kw),
    "sort-sigmoid": lambda **kw: SortMoE(score="sigmoid", **kw),
}

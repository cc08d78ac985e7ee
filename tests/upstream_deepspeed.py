"""DeepSpeed's ``deepspeed.moe.layer.MoE`` at tiny sizes on CPU: the cases, their expected region facts, building.

The layer is DeepSpeed's own, unchanged: ``TopKGate`` (GShard-style gating: a softmax over the gate's
logits, ``argmax`` for the first expert; for top-2 a second ``argmax`` over the logits plus Gumbel noise
with the first choice masked out; a capacity per expert from the tokens, the capacity factor and
``min_capacity``, enforced for top-1 by a ``topk`` over the tokens of each expert's (randomly scored) routed
tokens, for top-2 by the ``cumsum`` positions; without token dropping the capacity is the largest expert
load), ``MOELayer`` (the routes' slots in a flat ``[experts * capacity]`` buffer, an ``index_select`` into
``[experts, capacity, hidden]``, ``_AllToAll`` under expert parallelism, ``Experts`` running one copy of the
user's expert module per local expert on its chunk, and the gate-weighted ``index_select`` back) and the
auxiliary load-balancing loss ``l_aux`` the layer returns.

Randomness is upstream's and kept: top-1 scores the routed tokens with uniform noise before the capacity
``topk`` (``use_rts``), top-2 samples its second expert with Gumbel noise (``top2_2nd_expert_sampling``).
Both are drawn from the global generator in the graph, in the same order in eager and compiled runs; the
tests seed the generator before each step of either (:func:`step_seed`).

Process groups: at ``ep_size=1`` DeepSpeed's layer needs none (its gate only asks whether the absent expert
group spans ranks); :func:`deepspeed_ep` wires it as ``deepspeed.initialize`` does for expert parallelism:
``deepspeed.comm`` over the process group the caller made (``init_distributed`` wraps an initialised
``torch.distributed``), then ``MoE.set_deepspeed_parallelism()``, which makes the ``ep_size_<n>`` expert
and expert-data groups. DeepSpeed keeps those groups in module globals by name; the test ranks are reused
by later jobs with fresh process groups, so :func:`deepspeed_ep` empties them on exit.

Nothing in DeepSpeed is patched for CPU: with ``DS_BUILD_OPS=0`` its accelerator is the CPU one, and its
``all_to_all_single`` is ``torch.distributed.all_to_all_single`` (gloo runs it on CPU tensors).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from dataclasses import dataclass
from typing import Iterator

os.environ.setdefault("DS_BUILD_OPS", "0")  # DeepSpeed's pure-Python path: no C++/CUDA op builds at import

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

HIDDEN, FFN = 64, 96
BATCH, SEQ = 2, 8
TOKENS = BATCH * SEQ  # tokens per rank
AUX_COEFF = 0.01  # weight of DeepSpeed's l_aux in the loss


@dataclass(frozen=True)
class DSCase:
    """One configuration of DeepSpeed's ``MoE`` and the facts its region must carry."""

    name: str
    k: int  # 1 or 2
    drop_tokens: bool = True
    experts: int = 4
    capacity_factor: float = 1.0  # DeepSpeed's default
    min_capacity: int = 4  # DeepSpeed's default

    def capacity(self, tokens: int = TOKENS) -> int | None:
        """DeepSpeed's capacity (tokens over experts times the factor, times k for top-2, at least
        ``min_capacity``); None without token dropping (the largest expert load: data-dependent)."""
        if not self.drop_tokens:
            return None
        return max(math.ceil(tokens / self.experts * self.capacity_factor * self.k), self.min_capacity)


CASES = (
    DSCase("top1", k=1),
    DSCase("top2", k=2),
    DSCase("top1-nodrop", k=1, drop_tokens=False),
    DSCase("top2-nodrop", k=2, drop_tokens=False, experts=8),
)
CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}


def expected(case: DSCase) -> dict:
    """The facts every region of ``case`` must carry, forward and backward.

    Without token dropping DeepSpeed still fills an ``[experts, capacity, hidden]`` buffer, its capacity
    the largest expert load of the step: a capacity buffer of data-dependent size, reported as no
    (static) capacity and not dropless.
    """
    return {"router": "softmax-topk", "top_k": case.k, "num_experts": case.experts, "capacity": case.capacity(),
            "dropless": False, "hidden": HIDDEN}


# the region facts :func:`expected` names (``upstream_checks.region_facts``)
FACTS = ("router", "top_k", "num_experts", "capacity", "dropless", "hidden")


# ------------------------------------------------------------------------------------------------ building


class Expert(nn.Module):
    """The user's expert module DeepSpeed copies once per local expert: a two-layer GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, FFN)
        self.fc2 = nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """A dense projection, then DeepSpeed MoE layers as a pre-norm transformer block holds them
    (``h + moe(norm(h))``, as Megatron-DeepSpeed's GPT layers do); returns the loss, ``l_aux`` included."""

    def __init__(self, case: DSCase, layers: int = 1, ep_size: int = 1) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.norms = nn.ModuleList([nn.LayerNorm(HIDDEN) for _ in range(layers)])
        self.moes = nn.ModuleList([
            MoE(HIDDEN, Expert(), num_experts=case.experts, ep_size=ep_size, k=case.k,
                capacity_factor=case.capacity_factor, min_capacity=case.min_capacity, drop_tokens=case.drop_tokens)
            for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        aux = h.new_zeros(())
        for norm, moe in zip(self.norms, self.moes):
            out, l_aux, _counts = moe(norm(h))
            h = h + out
            aux = aux + l_aux
        return h.pow(2).mean() + AUX_COEFF * aux


def build(name: str, layers: int = 1, ep_size: int = 1, rank: int = 0, seed: int = 0) -> Block:
    """The block of case ``name``, seeded: the dense and gate weights the same on every rank, each local
    expert from a seed of its own rank and index (DeepSpeed deep-copies one expert module, so its copies
    would otherwise start equal and a misrouted token would not show)."""
    torch.manual_seed(seed)
    block = Block(BY_NAME[name], layers, ep_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in block.named_parameters():
            if ".deepspeed_experts." in pname or pname.startswith("norms."):
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if ".gate." in pname else 0.1))
        for li, moe in enumerate(block.moes):
            for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                g = torch.Generator().manual_seed(seed + 1000 * (rank + 1) + 100 * li + e)
                for p in expert.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return block


def inputs(step: int = 0, rank: int = 0) -> torch.Tensor:
    """This rank's ``[batch, seq, hidden]`` tokens for ``step`` (different on each rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, SEQ, HIDDEN, generator=g).requires_grad_(True)


def step_seed(step: int, rank: int = 0) -> None:
    """Seed the global generator the gate's noise is drawn from, the same before the eager and the compiled step."""
    torch.manual_seed(10_000 + 100 * step + rank)


# ------------------------------------------------------------------------------------------------ expert parallel


@contextlib.contextmanager
def deepspeed_ep(model: nn.Module) -> Iterator[None]:
    """DeepSpeed's expert-parallel groups for every ``MoE`` of ``model`` over the default process group, as
    ``deepspeed.initialize`` makes them; DeepSpeed's group registry emptied on exit (module docstring)."""
    import deepspeed.comm as ds_dist
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    ds_torch_backend = importlib.import_module("deepspeed.comm.torch")  # ``deepspeed.comm.torch`` is also torch

    # CPU-only: constructing DeepSpeed's TorchBackend on the CPU accelerator JIT-compiles (C++, minutes on a
    # small machine, and a compiler needed) its shared-memory all-reduce op even with DS_BUILD_OPS=0. Only its
    # CPU all-reduce uses that op, never the MoE layer's all-to-all; without it DeepSpeed uses torch.distributed.
    saved_build = ds_torch_backend.build_shm_op
    ds_torch_backend.build_shm_op = lambda: None
    try:
        ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    finally:
        ds_torch_backend.build_shm_op = saved_build
    try:
        for m in model.modules():
            if isinstance(m, MoE):
                m.set_deepspeed_parallelism()
        yield
    finally:
        for registry in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                         groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            registry.clear()


def prime_gate_noise(model: nn.Module, rank: int = 0) -> None:
    """One eager forward (no gradient, the global generator's state restored after) before the first compiled
    call, so that Dynamo traces the gate whole.

    DeepSpeed's gate creates its noise samplers (``torch.distributions`` ``rsample`` methods: uniform for
    top-1's random token selection, Gumbel for top-2's second expert) on its first call and keeps them in
    module-level dicts by device (``exp_selection_uniform_map``, ``gumbel_map`` in
    ``deepspeed.moe.sharded_moe``). Dynamo cannot replay storing such a bound method created inside the traced
    code into a global dict ("Reconstruction failure ... UserMethodVariable(Uniform.rsample)"): under
    ``fullgraph=True`` the first compiled call fails, without it the graph breaks inside the gate and no graph
    holds the layer whole (no MoE region). No Dynamo setting changes that; once the dicts hold the samplers
    (after any eager call, as here) the gate traces as one graph. ``use_rts=False`` (top-1) and
    ``top2_2nd_expert_sampling=False`` (top-2) avoid the samplers too, but change the gating.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model(inputs(0, rank))

"""Four gloo ranks, experts split four ways: every router and dispatch style through the whole backend.

Each case is a small model (dense layers around one MoE layer) whose dense
gradients are averaged inside backward (``sync_gradients_in_graph``),
compiled by fsmoe with ``strict=True``, every MoE layer chunked in 2 and the
gradient all-reduces merged into partitions of at most 1 KiB. Every step's
loss and every parameter's gradient must equal eager PyTorch on the same
rank (averaged with ``sync_gradients``), through warm-up, profiling and the
scheduled graph. One job of 4 fresh ranks runs every case, one after another.
"""

from __future__ import annotations

import re

import pytest
import torch

from moe_cases import CASES, plain_name, violation

D_MODEL, D_FF, EXPERTS, WORLD = 16, 32, 4, 4
STEPS = 4  # warm-up, one profiling call, the first scheduled call (timed per task), a plain scheduled call
PARTITION_BYTES = 1024  # a 16 x 16 weight alone; the biases and norms merge into partitions around it
ROUTER_KWARGS = {"deepseek": dict(num_groups=2, topk_groups=1), "softmoe": dict(slots_per_expert=4)}


class Net(torch.nn.Module):
    """A dense layer, a norm, one MoE layer (its case's expert, and shared expert where it has one) and a dense
    head."""

    def __init__(self, router: str, dispatch: str, expert: str, shared: bool) -> None:
        from fsmoe_compiler.moe import MoELayer

        super().__init__()
        self.inp = torch.nn.Linear(D_MODEL, D_MODEL)
        self.norm = torch.nn.LayerNorm(D_MODEL)
        self.moe = MoELayer(D_MODEL, D_FF, EXPERTS, router=router, dispatch=dispatch,
                            capacity_factor=2.0 if router == "switch" else 1.0, shared_expert=shared,
                            expert=expert, router_kwargs=ROUTER_KWARGS.get(router))
        self.head = torch.nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        y, aux = self.moe(self.norm(h))
        return (self.head(h + y) * w).sum() + aux


def _train_every_case(rank: int, world_size: int) -> list[dict]:
    import torch._dynamo

    import fsmoe_compiler
    from fsmoe_compiler.moe import sync_gradients
    from fsmoe_compiler.moe.parallel import sync_gradients_in_graph

    out = []
    for router, dispatch, expert, shared in CASES:
        torch.manual_seed(0)
        ref = Net(router, dispatch, expert, shared)
        torch.manual_seed(0)
        model = sync_gradients_in_graph(Net(router, dispatch, expert, shared))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fsmoe", options={
            "strict": True, "pipeline_degree": 2, "profile_steps": 1, "split_tokens": 1,
            "grad_partition": PARTITION_BYTES})
        worst: dict[str, float] = {}
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(STEPS):  # each rank its own tokens: unaveraged gradients would differ between ranks
            x, w = torch.randn(2, 8, D_MODEL, generator=g), torch.randn(2, 8, D_MODEL, generator=g)
            ref.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            want_loss = ref(x, w)
            want_loss.backward()
            sync_gradients(ref)
            loss = compiled(x, w)
            loss.backward()
            want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
            got = {plain_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert got.keys() == want.keys(), (router, dispatch, sorted(set(got) ^ set(want)))
            worst[f"step {step} loss"] = violation(loss.detach(), want_loss.detach())
            for n in want:
                worst[f"step {step} {n}"] = max(worst.get(f"step {step} {n}", -1.0), violation(got[n], want[n]))
        rep = fsmoe_compiler.report(compiled)
        schedules = {s_kind: s for s_kind in ("forward", "backward") for s in rep.schedules(s_kind)}
        notes = [n for s in rep.schedules("backward") for n in s.notes if "gradient partitioning" in n]
        out.append({
            "case": (router, dispatch, expert, shared),
            "bad": {k: v for k, v in worst.items() if v > 0},
            "fallbacks": rep.fallbacks(),
            "degrees": {k: sorted(set(s.degrees.values())) for k, s in schedules.items()},
            "partitions": notes,
            "nonzero": all(bool(p.grad.abs().max() > 0) for p in model.parameters() if p.grad is not None),
        })
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_router_and_dispatch_trains_as_eager_on_four_ranks_chunked_and_partitioned():
    from fsmoe_compiler.launch import run_ranks

    results = run_ranks(_train_every_case, WORLD, timeout_s=840, pg_timeout_s=120)
    assert len(CASES) == 14  # 8 routers with capacity, the 6 that route dropless too (moe_cases)
    for per_rank in results:
        assert [r["case"] for r in per_rank] == [tuple(c) for c in CASES]
        for r in per_rank:
            assert not r["bad"], (r["case"], r["bad"])
            assert r["fallbacks"] == [], r["case"]
            assert r["degrees"] == {"forward": [2], "backward": [2]}, r["case"]  # chunked, and scheduled
            assert r["nonzero"], r["case"]
            (note,) = r["partitions"]
            merged, parts = map(int, re.search(r"(\d+) gradient all-reduces merged into (\d+) partitions",
                                               note).groups())
            assert 1 < parts < merged, (r["case"], note)  # partitioned: neither per parameter nor one bucket
    for per_rank in results[1:]:  # every rank merged the same gradients alike
        assert [r["partitions"] for r in per_rank] == [r["partitions"] for r in results[0]]

"""The bench's ``torchtitan_graph`` method: torchtitan's graph_trainer EP-overlap passes on the bench's torchtitan model.

On 2 gloo ranks (experts sharded by torchtitan's expert parallelism), from
the same weights and batch as eager, for two SGD steps (the second reads
the updated weights; both start from eager's weights): the loss
equals eager's, every gradient equals eager's except the routed experts'
weights, which differ by bf16 rounding only (graph_trainer's chunking adds
the two chunks' bf16 grouped-GEMM weight gradients after casting each, where
eager casts one). The passes must really have changed the graph: the chunk
pass doubles the all-to-alls, the overlap schedule moves nodes and puts
all-to-alls in flight together, and the FSDP bucketing pass is left out.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchtitan")

from fsmoe_compiler.bench import titan_graph  # noqa: E402
from fsmoe_compiler.bench.methods import make_runner  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:In CPU autocast"),  # torchtitan's router asks for fp32 autocast
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),  # at torchtitan's import
]

#: routed-expert weights: bf16 grouped GEMMs, their gradient summed over the 2 chunks after the cast
EXPERT_WEIGHTS = ("w1_EFD", "w2_EDF", "w3_EFD")
BF16_REL = 1e-2  # bf16 has 8 mantissa bits: about 0.4 % of the largest entry


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _step_pair(rank: int, world_size: int, steps: int) -> dict:
    from fsmoe_compiler.examples.titan_moe import build_model, make_batch

    torch.manual_seed(0)
    ref = build_model(n_layers=1)
    torch.manual_seed(0)
    model = build_model(n_layers=1)
    setup = make_runner("torchtitan_graph", model, world_size=world_size, link_bytes_per_ms=1e6)
    idx, targets = make_batch(4, seed=1000 + rank)
    out = {"loss": [], "grad_rel": []}
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        for o in (opt_ref, opt):
            o.zero_grad(set_to_none=True)
        want = ref(idx, targets)
        want.backward()
        got = setup.runner(idx, targets)
        got.backward()
        out["loss"].append((float(want), float(got)))
        rel = {}
        for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
            a, b = _local(p_ref.grad), _local(p.grad)
            rel[name] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        out["grad_rel"].append(rel)
        opt_ref.step()
        opt.step()
        with torch.no_grad():  # the next step from the same weights again (bf16 rounding would compound)
            for p_ref, p in zip(ref.parameters(), model.parameters()):
                p.copy_(p_ref)
    out["info"] = {k: v for k, v in setup.info.items()}
    return out


@pytest.mark.timeout(240)
def test_torchtitan_graph_equals_eager_and_its_passes_chunk_and_reorder(rank_pool):
    results = rank_pool.run(_step_pair, (2,), timeout_s=200)
    for rank, res in enumerate(results):
        for step, (want, got) in enumerate(res["loss"]):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6), (rank, step)
        for step, rel in enumerate(res["grad_rel"]):
            for name, r in rel.items():
                limit = BF16_REL if name.endswith(EXPERT_WEIGHTS) else 1e-5
                assert r <= limit, (rank, step, name, r)
        info = res["info"]
        assert (info["chunk_dim"], info["chunks"]) == ("batch", 2)
        # the chunk pass duplicated the MoE region: every all-to-all (counts, dispatch, combine, both directions)
        a2a = info["all_to_all"]
        assert a2a["traced"] >= 4 and a2a["final"] == 2 * a2a["traced"], a2a
        by_pass = {r["pass"]: r for r in info["passes"]}
        assert by_pass["ep_overlap_chunk_pass"]["all_to_all"] == [a2a["traced"], a2a["final"]]
        # the overlap schedule moved nodes and launched all-to-alls while others were in flight
        sched = by_pass["ep_overlap_schedule_pass"]
        assert sched["moved"] > 0 and info["scheduled_moved"] == sched["moved"]
        before, after = sched["in_flight_together"]
        assert after > before, sched
        # FSDP bucketing off through graph_trainer's own disable_passes; Inductor and CUDA graphs never added
        assert "joint_transformer_block_bucketing_reordering_pass" not in by_pass
        assert "joint_transformer_block_bucketing_reordering_pass" in info["disabled_passes"]
        assert not any("inductor" in p or "cudagraph" in p for p in by_pass)
        # the CPU-only changes were applied (and are reported), each where it was needed
        assert {"fakeify", "suffix_insertion"} <= set(info["cpu_changes"]), info["cpu_changes"]
        assert set(info["cpu_changes_text"]) == set(info["cpu_changes"])


def test_torchtitan_graph_is_skipped_with_the_reason_on_another_model():
    from fsmoe_compiler.examples.gpt2_moe import build_model

    with pytest.raises(titan_graph.MethodSkipped, match="needs --model torchtitan"):
        make_runner("torchtitan_graph", build_model(), world_size=1, link_bytes_per_ms=1e6)


def test_torchtitan_graph_on_one_process_equals_eager_and_leaves_torchtitans_classes_as_they_were():
    """Without expert parallelism (no all-to-all: graph_trainer chunks the annotated MoE region all the same) the
    loss equals eager's; graph_trainer's annotations wrap torchtitan's classes process-wide, the method puts them
    back, and the model's modules keep no annotated forward."""
    from torchtitan.models.common.moe import MoE
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    from fsmoe_compiler.examples.titan_moe import build_model, make_batch

    before = (MoE.forward, AllToAllTokenDispatcher.dispatch, AllToAllTokenDispatcher.combine)
    torch.manual_seed(0)
    ref = build_model(n_layers=1, expert_parallel=False)
    torch.manual_seed(0)
    model = build_model(n_layers=1, expert_parallel=False)
    step = titan_graph.titan_graph_runner(model)
    idx, targets = make_batch(4)
    assert float(step(idx, targets)) == pytest.approx(float(ref(idx, targets)), rel=1e-6)
    assert step.info["all_to_all"] == {"traced": 0, "final": 0}
    assert (MoE.forward, AllToAllTokenDispatcher.dispatch, AllToAllTokenDispatcher.combine) == before
    assert not any("forward" in vars(m) for m in model.modules())

"""Baselines reproduce their closed forms; our search is valid, cached, never worse than a baseline, above the bound."""

import pytest

from fsmoe_compiler.scheduler import validate_schedule
from fsmoe_compiler.scheduler.costs import LinearCost
from fsmoe_compiler.sim import (CACHE, LayerSpec, SearchOptions, SolveCache, best_forward, build_layer_forward,
                                evaluate_layer, fsmoe_paper, fsmoe_step, paper_degree, paper_T, schedule_step,
                                sequential, step_lower_bound, tutel, tutel_degree)
from fsmoe_compiler.sim.baselines import paper_terms
from fsmoe_compiler.sim.costs import ClusterCosts


def costs(a2a=(0.287, 1.306e-6), ag=(0.338, 6.7e-7), rs=(0.395, 6.7e-7), ar=(0.511, 2.916e-6), gemm=(1.09, 1.53e-10),
          dense=(0.2, 1.53e-10), name="test") -> ClusterCosts:
    return ClusterCosts(name=name, all_to_all=LinearCost(*a2a), all_gather=LinearCost(*ag),
                        reduce_scatter=LinearCost(*rs), all_reduce=LinearCost(*ar),
                        gemm={"gpt": LinearCost(*gemm), "swiglu": LinearCost(*gemm)}, dense=LinearCost(*dense))


TESTBED = costs()
FAST = costs(a2a=(0.03, 2.5e-8), ag=(0.015, 4.86e-9), rs=(0.015, 4.86e-9), ar=(0.05, 6.25e-9), gemm=(0.03, 3.11e-12),
             dense=(0.07, 3.11e-12), name="fast")
SPECS = [LayerSpec(B=4, L=512, M=2048, H=8192, f=2.4), LayerSpec(B=8, L=1024, M=1024, H=8192, f=4.8, ffn="swiglu"),
         LayerSpec(B=2, L=256, M=4096, H=8192, f=1.2), LayerSpec(B=8, L=512, M=1024, H=2048, f=4.8, gpus=32)]


def test_sequential_is_the_sum_of_all_durations():
    spec = SPECS[0]
    s = sequential([spec, spec], TESTBED)
    validate_schedule(s.graph, s.schedule)
    assert s.makespan == pytest.approx(sum(t.duration for t in s.graph))
    # closed form: per layer fwd = attn + 2A + G + R + E, bwd = 2 attn + 2A + G + R + 2E, plus one bucket
    A, G, R, E = paper_terms(spec, TESTBED, 1, "forward")
    attn = TESTBED.dense(spec.attention_macs)
    per_layer = (attn + 2 * A + G + R + E) + (2 * attn + 2 * A + G + R + 2 * E)
    bucket = TESTBED.all_reduce(2 * spec.dense_grad_elems)
    assert s.makespan == pytest.approx(2 * per_layer + bucket, rel=1e-9)
    assert s.r_fwd == [1, 1] and s.r_bwd == [1, 1]


def test_paper_T_formulas_by_hand():
    spec = SPECS[0]
    for r in (1, 2, 4, 8):
        A, G, R, E = paper_terms(spec, TESTBED, r)
        assert A < G  # intra-node dominant on this testbed (AG moves es x the A2A's elements)
        assert paper_T(spec, TESTBED, r) == pytest.approx(max(2 * A + r * (G + R), 2 * A + G + R + E, 2 * r * A))
        assert paper_T(spec, TESTBED, r, "backward", g=40.0) == pytest.approx(
            max(2 * A + r * (G + R), 2 * A + G + R + 2 * E, 2 * r * A + 40.0))
    # inter-dominant: slow inter link, fast intra link
    c = costs(a2a=(0.3, 2e-5))
    for r in (1, 2, 4):
        A, G, R, E = paper_terms(spec, c, r)
        assert A >= G
        assert paper_T(spec, c, r, g=5.0) == pytest.approx(max(2 * r * A + max(G + R, 5.0), 2 * A + G + R + E))
    r, t = paper_degree(spec, TESTBED)
    assert r in (1, 2, 4, 8) and t == pytest.approx(min(paper_T(spec, TESTBED, x) for x in (1, 2, 4, 8)))


def test_paper_fixed_order_matches_T_when_compute_dominates():
    # experts dominate: T(r) = 2A + G + R + E exactly, and FSMoE's fixed-order run takes exactly that
    c = costs(gemm=(0.5, 3e-9))
    spec = SPECS[0]
    s = fsmoe_paper([spec], c)
    validate_schedule(s.graph, s.schedule)
    r = s.r_fwd[0]
    A, G, R, E = paper_terms(spec, c, r)
    assert E > r * (G + R) and E > 2 * r * A
    attn = c.dense(spec.attention_macs)
    assert s.forward_ms == pytest.approx(attn + paper_T(spec, c, r))
    assert paper_T(spec, c, r) == pytest.approx(2 * A + G + R + E)


def test_tutel_uses_one_stream_and_one_degree():
    spec = SPECS[1]
    s = tutel([spec, spec], TESTBED)
    validate_schedule(s.graph, s.schedule)
    assert s.r_fwd == s.r_bwd and s.r_fwd[0] in (1, 2, 4, 8)
    assert {t.resource for t in s.graph if t.kind in ("all_gather", "reduce_scatter")} == {"inter"}
    assert s.graph.total("intra") == 0
    assert "B.bucket" in s.graph.tasks and s.schedule.start["B.bucket"] >= s.schedule.end["B0.attn"]
    r, t = tutel_degree(spec, TESTBED)
    assert r == s.r_fwd[0] and t > 0


@pytest.mark.parametrize("c", [TESTBED, FAST], ids=["testbed", "fast"])
@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_ours_valid_never_worse_than_baselines_and_above_bound(c, spec):
    res = evaluate_layer(spec, c, num_layers=2, cache=SolveCache())
    lb = res["lower_bound"].makespan
    for m in ("sequential", "tutel", "fsmoe_paper", "fsmoe"):
        st = res[m]
        validate_schedule(st.graph, st.schedule)
        assert st.schedule.makespan == pytest.approx(st.makespan, rel=1e-9)
        assert st.makespan >= lb - 1e-9, m
        assert st.forward_ms + st.backward_ms == pytest.approx(st.makespan)
    ours = res["fsmoe"].makespan
    assert ours <= min(res[m].makespan for m in ("sequential", "tutel", "fsmoe_paper")) + 1e-9
    assert res["sequential"].makespan > res["tutel"].makespan * 0.999 or res["tutel"].r_fwd == [1, 1]


def test_ours_strictly_beats_paper_somewhere():
    wins = 0
    for spec in SPECS:
        res = evaluate_layer(spec, FAST, methods=("fsmoe_paper", "fsmoe"), cache=SolveCache())
        wins += res["fsmoe"].makespan < res["fsmoe_paper"].makespan * (1 - 1e-3)
    assert wins >= 1


def test_lower_bound_is_tight_for_a_single_forward_layer():
    spec = SPECS[0]
    lb = step_lower_bound([spec], TESTBED, max_degree=8)
    _, s = best_forward(spec, TESTBED, SearchOptions(), SolveCache())
    assert lb.forward_ms <= s.makespan + 1e-9
    assert s.makespan <= lb.forward_ms * 1.02


def test_identical_layers_are_solved_once():
    cache = SolveCache()
    spec = SPECS[0]
    fsmoe_step([spec] * 4, TESTBED, cache=cache)
    fwd_keys = [k for k in cache.store if k[0] == "fwd"]
    assert len(fwd_keys) == 1  # four identical layers, one forward solve
    h0 = cache.hits
    again = fsmoe_step([spec] * 4, TESTBED, cache=cache)
    assert cache.hits > h0 and len([k for k in cache.store if k[0] == "fwd"]) == 1
    validate_schedule(again.graph, again.schedule)
    other = LayerSpec(B=4, L=512, M=2048, H=8192, f=1.2)
    fsmoe_step([spec, other], TESTBED, cache=cache)
    assert len([k for k in cache.store if k[0] == "fwd"]) == 2


def test_degree_search_pipelines_when_balanced_and_not_when_alpha_dominates():
    spec = SPECS[0]
    balanced = costs(a2a=(0.01, 1.3e-6), ag=(0.01, 1.6e-7), rs=(0.01, 1.6e-7), gemm=(0.01, 1.53e-10))
    A, G, R, E = paper_terms(spec, balanced, 1)
    assert 0.5 < (2 * A) / E < 2  # communication and compute comparable
    r, s = best_forward(spec, balanced, SearchOptions(), SolveCache())
    assert r > 1
    assert s.makespan < build_layer_forward(spec, balanced, 1).total("compute") + 2 * A + G + R - 1e-6
    heavy = costs(a2a=(5.0, 1e-9), ag=(5.0, 1e-9), rs=(5.0, 1e-9), gemm=(5.0, 1e-12))
    r, _ = best_forward(spec, heavy, SearchOptions(), SolveCache())
    assert r == 1


def test_separate_forward_and_backward_degrees():
    # the backward has 2x expert work: somewhere in these layers the best r_bwd differs from r_fwd
    differ = 0
    for spec in SPECS:
        st = schedule_step([spec], TESTBED, "fsmoe", cache=SolveCache())
        differ += st.r_fwd != st.r_bwd
    assert differ >= 1


def test_schedule_step_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid methods"):
        schedule_step([SPECS[0]], TESTBED, "magic")
    with pytest.raises(ValueError, match="at least one"):
        schedule_step([], TESTBED)
    with pytest.raises(ValueError, match="max_degree"):
        schedule_step([SPECS[0]], TESTBED, max_degree=0)
    st = schedule_step([SPECS[0]], TESTBED, "cpsat", cache=SolveCache())
    assert st.method == "fsmoe"


def test_without_a_cache_argument_solves_share_the_module_cache():
    hits = CACHE.hits
    for _ in range(2):  # the second call (at the latest) finds the first one's solves
        schedule_step([SPECS[0]], TESTBED, "cpsat")
    assert CACHE.hits > hits


def test_weight_gradient_split_is_valid_never_worse_and_above_its_bound():
    spec = SPECS[0]
    plain = evaluate_layer(spec, FAST, num_layers=3, cache=SolveCache())
    split = evaluate_layer(spec, FAST, num_layers=3, cache=SolveCache(), split_weight_grads=True)
    ours = split["fsmoe"]
    validate_schedule(ours.graph, ours.schedule)
    roles = {t.role for t in ours.graph}
    assert {"expert_wgrad", "dense_wgrad"} <= roles
    # the all-reduce slices wait for the attention weight gradient, the layer below for the input gradient
    assert ours.graph.preds("B2.ar0") == ["B2.attn_w"] and ours.graph.preds("B1.a2a_d0") == ["B2.attn"]
    assert ours.makespan <= plain["fsmoe"].makespan + 1e-9
    assert ours.makespan < plain["fsmoe_paper"].makespan * 0.97  # the split buys real time here
    assert split["lower_bound"].makespan <= ours.makespan + 1e-9
    assert split["lower_bound"].makespan <= plain["lower_bound"].makespan + 1e-9
    for m in ("sequential", "tutel", "fsmoe_paper"):
        assert split["lower_bound"].makespan <= split[m].makespan + 1e-9


def test_lower_bound_stays_valid_when_our_degrees_are_capped():
    for spec in SPECS:
        res = evaluate_layer(spec, TESTBED, num_layers=2, max_degree=2, cache=SolveCache())
        assert max(res["fsmoe"].r_fwd + res["fsmoe"].r_bwd) <= 2
        for m in ("sequential", "tutel", "fsmoe_paper", "fsmoe"):
            assert res["lower_bound"].makespan <= res[m].makespan + 1e-9, m


@pytest.mark.parametrize("split", [False, True])
def test_step_lower_bound_holds_for_other_configurations(split):
    """No configuration (other degrees, other slicings) solved hard beats the step bound."""
    from fsmoe_compiler.scheduler import solve_cpsat
    from fsmoe_compiler.sim import build_layer_forward, build_stack_backward

    spec = SPECS[3]
    lb = step_lower_bound([spec, spec], FAST, 8, split).makespan
    fwd = 2 * min(solve_cpsat(build_layer_forward(spec, FAST, r), 0.1).makespan for r in (1, 2, 3, 4))
    for rb, k in ((1, 1), (2, 3), (4, 2)):
        g = build_stack_backward([spec, spec], FAST, rb, [[spec.dense_grad_elems / k] * k] * 2, wgrad=split)
        s = solve_cpsat(g, 0.2, skip_if_tight=False)
        validate_schedule(g, s)
        assert fwd + s.makespan >= lb - 1e-9

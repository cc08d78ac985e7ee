"""Heuristic and CP-SAT: valid schedules, CP-SAT never worse, CP-SAT optimal on small graphs (brute force)."""

import itertools
import random

import pytest

from fsmoe_compiler.scheduler import (RESOURCES, TaskGraph, critical_path, fixed_order_schedule, heuristic_schedule,
                                      list_schedule, lower_bound, solve_cpsat, validate_schedule)
from fsmoe_compiler.scheduler.costs import LinearCost
from fsmoe_compiler.sim import LayerSpec, build_layer_backward, build_layer_forward, build_stack_backward
from fsmoe_compiler.sim.costs import ClusterCosts

COSTS = ClusterCosts(
    name="test", all_to_all=LinearCost(0.3, 1.3e-6), all_gather=LinearCost(0.34, 6.7e-7),
    reduce_scatter=LinearCost(0.4, 6.7e-7), all_reduce=LinearCost(0.5, 2.9e-6),
    gemm={"gpt": LinearCost(1.09, 1.53e-10), "swiglu": LinearCost(1.47, 3.17e-10)}, dense=LinearCost(0.2, 1.53e-10))


def random_graph(seed: int, n: int) -> TaskGraph:
    rng = random.Random(seed)
    g = TaskGraph(name=f"rand{seed}")
    for i in range(n):
        # durations on a 0.25 ms grid so the integer CP-SAT model is exact
        g.add(f"t{i}", "op", rng.choice(RESOURCES), rng.randint(1, 12) * 0.25)
    for j in range(n):
        for i in range(j):
            if rng.random() < 0.3:
                g.add_dep(f"t{i}", f"t{j}")
    return g


def brute_force(g: TaskGraph) -> float:
    """Optimal makespan: every combination of per-resource orders, each run as early as possible."""
    by_res = {r: [t.id for t in g.on(r)] for r in RESOURCES}
    best = float("inf")
    for combo in itertools.product(*(itertools.permutations(v) for v in by_res.values())):
        order = dict(zip(by_res, map(list, combo)))
        try:
            s = fixed_order_schedule(g, order)
        except ValueError:
            continue  # contradicts a dependency
        best = min(best, s.makespan)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_cpsat_matches_brute_force_optimum(seed):
    g = random_graph(seed, 7)
    opt = brute_force(g)
    s = solve_cpsat(g, time_limit_s=5.0, skip_if_tight=False)
    validate_schedule(g, s)
    assert s.makespan == pytest.approx(opt, abs=1e-9)
    assert s.status in ("OPTIMAL", "FALLBACK_WORSE")  # FALLBACK_WORSE only if the heuristic was already optimal
    h = heuristic_schedule(g)
    assert h.makespan >= opt - 1e-9
    assert lower_bound(g) <= opt + 1e-9


def test_heuristic_can_be_suboptimal_and_cpsat_fixes_it():
    """A graph where greedy critical-path order is not optimal: CP-SAT must be strictly better somewhere."""
    gaps = []
    for seed in range(40):
        g = random_graph(100 + seed, 8)
        h = heuristic_schedule(g)
        c = solve_cpsat(g, time_limit_s=2.0, heuristic=h, skip_if_tight=False)
        validate_schedule(g, c)
        assert c.makespan <= h.makespan + 1e-9
        gaps.append(h.makespan - c.makespan)
    assert max(gaps) > 0.2  # the heuristic is not always optimal...
    assert sum(1 for x in gaps if x > 1e-9) < len(gaps)  # ...but often is


@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
def test_cpsat_never_worse_than_heuristic_on_moe_layers(r):
    spec = LayerSpec(B=4, L=512, M=2048, H=8192, f=2.4)
    for g in (build_layer_forward(spec, COSTS, r), build_layer_backward(spec, COSTS, r)):
        h = heuristic_schedule(g)
        validate_schedule(g, h)
        c = solve_cpsat(g, time_limit_s=0.05, heuristic=h)
        validate_schedule(g, c)
        assert c.makespan <= h.makespan + 1e-9
        assert lower_bound(g) <= c.makespan + 1e-9
        assert critical_path(g) <= c.makespan + 1e-9


def test_cpsat_is_deterministic():
    spec = LayerSpec(B=4, L=1024, M=2048, H=8192, f=2.4)
    g = build_stack_backward([spec, spec], COSTS, [3, 3], [[spec.dense_grad_elems / 3] * 3] * 2)
    a = solve_cpsat(g, time_limit_s=0.05, skip_if_tight=False)
    b = solve_cpsat(g, time_limit_s=0.05, skip_if_tight=False)
    validate_schedule(g, a)
    assert a.makespan == b.makespan and a.start == b.start


def test_cpsat_falls_back_to_heuristic_when_it_finds_nothing():
    g = random_graph(7, 8)
    h = heuristic_schedule(g)
    s = solve_cpsat(g, time_limit_s=1e-9, heuristic=h, skip_if_tight=False)
    validate_schedule(g, s)
    assert s.makespan <= h.makespan + 1e-9
    assert s.status in ("OPTIMAL", "FEASIBLE", "FALLBACK_NO_SOLUTION", "FALLBACK_WORSE")


def test_skip_when_heuristic_meets_lower_bound():
    g = TaskGraph()
    g.add("a", "op", "compute", 1.0)
    g.add("b", "op", "compute", 2.0)
    s = solve_cpsat(g, time_limit_s=1.0)
    assert s.status == "OPTIMAL" and s.meta.get("proof") == "meets lower bound" and s.makespan == 3.0


def test_list_schedule_inserts_into_gaps():
    # inter: x (1 ms) then y (needs compute c first, 5 ms); a 3 ms task z with no deps fits in the gap [1, 5)
    g = TaskGraph()
    g.add("c", "op", "compute", 5.0)
    g.add("y", "op", "inter", 1.0)
    g.add("x", "op", "inter", 1.0)
    g.add("z", "op", "inter", 3.0)
    g.add_dep("c", "y")
    s = list_schedule(g)
    validate_schedule(g, s)
    assert s.makespan == pytest.approx(6.0)
    assert s.end["z"] <= 5.0 + 1e-9


def test_justify_never_worse_and_valid():
    from fsmoe_compiler.scheduler.heuristic import heuristic_starts, justify, schedule_from_starts

    for seed in range(10):
        g = random_graph(300 + seed, 12)
        starts, ms = heuristic_starts(g)
        j, jms = justify(g, starts)
        assert jms <= ms + 1e-9
        validate_schedule(g, schedule_from_starts(g, j))


def test_split_weight_gradient_rules_let_the_all_reduce_start_early():
    """With weight gradients split off, running the attention weight gradient right after its input gradient
    lets the all-reduce overlap the layers below; the heuristic must find that, not leave the all-reduces last."""
    fast = ClusterCosts(name="h100-like", all_to_all=LinearCost(0.03, 2.5e-8), all_gather=LinearCost(0.015, 4.86e-9),
                        reduce_scatter=LinearCost(0.015, 4.86e-9), all_reduce=LinearCost(0.05, 6.25e-9),
                        gemm={"swiglu": LinearCost(0.0468, 3.11e-12)}, dense=LinearCost(0.072, 3.11e-12))
    spec = LayerSpec(B=2, L=512, M=4096, H=32768, f=4.8, ffn="swiglu")
    g = build_stack_backward([spec] * 4, fast, 1, None, wgrad=True)
    plain = list_schedule(g)  # critical path only: the chain first, weight gradients late
    s = heuristic_schedule(g)
    validate_schedule(g, s)
    assert s.makespan < plain.makespan * 0.95
    # the attention weight gradient of layer 3 runs before layer 2's backward is done, so its all-reduce can start
    assert s.end["B3.attn_w"] < s.start["B2.attn"] < plain.end["B3.attn_w"]


def test_cpsat_handles_durations_below_its_time_unit():
    # sub-microsecond tasks: the integer model must not round them into an order that contradicts a dependency
    g = TaskGraph()
    g.add("attn", "attention", "compute", 3.0e-7)
    g.add("d", "a2a", "inter", 8e-6)
    g.add("e", "expert", "compute", 1.3e-8)
    g.add("c", "a2a", "inter", 8e-6)
    g.add_dep("attn", "d")
    g.add_dep("d", "e")
    g.add_dep("e", "c")
    s = solve_cpsat(g, time_limit_s=0.05, skip_if_tight=False)
    validate_schedule(g, s)
    assert s.makespan == pytest.approx(3.0e-7 + 8e-6 + 1.3e-8 + 8e-6, rel=1e-9)


def test_parallel_generation_valid_and_runs_fillers_when_compute_would_idle():
    from fsmoe_compiler.scheduler.heuristic import list_starts, parallel_starts, schedule_from_starts

    for seed in range(10):
        g = random_graph(400 + seed, 12)
        starts, ms = parallel_starts(g)
        s = schedule_from_starts(g, starts)
        validate_schedule(g, s)
        assert s.makespan == pytest.approx(ms)
    # a (compute, 1) -> x (inter, 1) -> b (compute, 1) -> c (inter, 0.6), and a filler w (compute, 1.5) after a.
    # The serial scheme puts w behind b (the 1 ms gap at [1, 2) is too short): 4.5 ms. The non-delay scheme
    # runs w as soon as compute idles, at 1, and b at 2.5: 4.1 ms.
    g = TaskGraph()
    g.add("a", "op", "compute", 1.0)
    g.add("x", "op", "inter", 1.0)
    g.add("b", "op", "compute", 1.0)
    g.add("w", "op", "compute", 1.5)
    g.add("c", "op", "inter", 0.6)
    for u, v in (("a", "x"), ("x", "b"), ("a", "w"), ("b", "c")):
        g.add_dep(u, v)
    _, serial = list_starts(g)
    starts, par = parallel_starts(g)
    validate_schedule(g, schedule_from_starts(g, starts))
    assert serial == pytest.approx(4.5) and par == pytest.approx(4.1)
    assert starts[g.arrays().index["w"]] == pytest.approx(1.0)


def test_cpsat_starts_from_the_hint_even_when_its_float_times_do_not_round_to_a_solution():
    """Irregular durations: rounding each float start alone breaks precedences, so CP-SAT would drop the hint and
    find nothing in a short limit; the hint replayed in integer time is a solution it starts from."""
    from dataclasses import replace

    spec = LayerSpec(B=4, L=1024, M=2048, H=8192, f=2.4)
    base = build_stack_backward([spec] * 4, COSTS, [4] * 4, [[spec.dense_grad_elems / 2] * 2] * 4)
    rng = random.Random(0)
    g = TaskGraph(name="irregular")
    for t in base.tasks.values():
        g.add_task(replace(t, duration=t.duration * (1 + rng.random() * 1e-3) + 1e-7))
    for u, v in base.deps:
        g.add_dep(u, v)
    h = heuristic_schedule(g)
    s = solve_cpsat(g, time_limit_s=0.002, heuristic=h, skip_if_tight=False)
    validate_schedule(g, s)
    assert s.status in ("OPTIMAL", "FEASIBLE"), s.status
    assert s.makespan <= h.makespan + 1e-9


def test_gc_paused_restores_the_collector_also_on_error():
    import gc

    from fsmoe_compiler.gc_pause import gc_paused

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: stays off
    finally:
        gc.enable()

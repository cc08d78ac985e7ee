"""Profiler on one process: timing a real MoE graph, link-model fits, the cost model, and the profile cache.

Graphs come from a local (no expert parallelism) ``MoELayer`` captured with
aot_autograd, plus small hand-built graphs with a functional all-to-all node
(never run: they are priced, not executed). Collectives on real ranks are in
``test_profiler_ranks.py``.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import warnings

import pytest
import torch
import torch.fx as fx

from fsmoe_compiler.profiler import (
    CostModel,
    ProfileCache,
    StepProfiler,
    TimingInterpreter,
    agree,
    cpu_shares,
    fit_collectives,
    last_arrivals,
    median_per_node,
    profile_call,
    profile_key,
    steady_calls,
    typical_ms,
)
from fsmoe_compiler.planner import SLOPE_ANCHOR_BYTES, link_sizes
from fsmoe_compiler.profiler.cache import key_payload
from fsmoe_compiler.ops import is_collective, is_wait
from fsmoe_compiler.runtime.topology import world_layout
from fsmoe_compiler.scheduler.costs import LinearCost
from graph_capture import captured, grads_through

D_MODEL, D_FF, EXPERTS = 16, 32, 4


def _moe_forward(batch: int = 2, seed: int = 0) -> fx.GraphModule:
    """The forward graph of a local MoELayer (shared through the session's capture cache: do not change it)."""
    from fsmoe_compiler.moe import MoELayer

    return captured(MoELayer, D_MODEL, D_FF, EXPERTS, ep_group="local", inputs=((batch, 6, D_MODEL),), seed=seed,
                    backward=False).forward[0]


def inputs_from_meta(gm: fx.GraphModule, seed: int = 0) -> list[torch.Tensor]:
    """Real tensors shaped like the placeholders' ``meta["val"]`` (random floats, zero integers)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in gm.graph.find_nodes(op="placeholder"):
        v = n.meta["val"]
        if v.dtype.is_floating_point:
            out.append(torch.randn(tuple(v.shape), generator=g, dtype=v.dtype))
        else:
            out.append(torch.zeros(tuple(v.shape), dtype=v.dtype))
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


# -- timing ------------------------------------------------------------------------------------------


def test_profiled_call_gives_the_graphs_outputs_and_a_time_for_every_compute_node():
    gm = _moe_forward()
    args = inputs_from_meta(gm)
    out, node_ms, samples = profile_call(gm, args)
    assert _same(out, gm(*args))
    compute = [n.name for n in gm.graph.nodes if n.op == "call_function" and not is_collective(n) and not is_wait(n)]
    assert set(node_ms) == set(compute)
    assert all(ms >= 0 and math.isfinite(ms) for ms in node_ms.values())
    assert samples == []  # a local layer does not communicate


def test_interpreter_keeps_only_the_latest_call():
    gm = _moe_forward()
    interp = TimingInterpreter(gm)
    interp.run(*inputs_from_meta(gm, 1))
    first = dict(interp.node_ms)
    interp.run(*inputs_from_meta(gm, 2))
    assert set(interp.node_ms) == set(first)


def test_step_profiler_is_a_boxed_compiled_function_whose_nodes_cost_the_median_of_their_steady_calls():
    gm = _moe_forward()
    prof = StepProfiler(gm)
    assert prof._boxed_call
    for seed in range(3):
        args = inputs_from_meta(gm, seed)
        assert _same(prof(args), gm(*args))
    assert prof.calls == 3
    costs = prof.cost_model(_samples(0.1, 1e-6, [100, 1000]))
    assert set(costs.node_ms) == set(prof.node_ms_runs[0])
    steady = sorted(prof.node_ms_runs, key=lambda run: sum(run.values()))[:2]  # the faster two of three calls
    for name, ms in costs.node_ms.items():
        assert ms == pytest.approx((steady[0][name] + steady[1][name]) / 2)
    assert prof.node_ms() == costs.node_ms
    assert set(costs.comm) == {"all_to_all/2"}


def test_steady_calls_drop_the_disturbed_calls_whole_not_each_nodes_slowest_time():
    # calls after a switch of variant: every node slow at once; steady calls: one node each a little slower
    runs = [{"mm": 5.0, "add": 10.0}, {"mm": 5.5, "add": 1.0}, {"mm": 6.0, "add": 11.0}, {"mm": 5.0, "add": 1.2}]
    assert steady_calls(runs) == [runs[3], runs[1]]  # fastest first
    assert median_per_node(steady_calls(runs)) == {"mm": 5.25, "add": 1.1}  # each node's fastest: 5.0 and 1.0
    assert steady_calls(runs[:3]) == [runs[1], runs[0]]  # of three, the faster two
    assert steady_calls(runs[:1]) == runs[:1]
    assert steady_calls([]) == []


def test_step_profilers_profile_aot_autograds_forward_and_backward():
    profilers: list[StepProfiler] = []
    assert grads_through(lambda gm: profilers.append(StepProfiler(gm)) or profilers[-1], steps=2)
    assert [p.calls for p in profilers] == [2, 2]
    assert all(p.cost_model().node_ms for p in profilers)


# -- link model fits ---------------------------------------------------------------------------------


def _samples(alpha: float, beta: float, sizes, repeats: int = 3, noise: float = 0.0, group_size: int = 2):
    rng = random.Random(0)
    return [
        {"node": None, "kind": "all_to_all", "group": "7", "group_size": group_size, "bytes": n,
         "ms": alpha + beta * n + rng.uniform(-noise, noise)}
        for n in sizes for _ in range(repeats)
    ]


def test_fit_recovers_alpha_and_beta_per_kind_and_group_size():
    samples = _samples(0.2, 3e-6, [1 << 14, 1 << 17, 1 << 20], noise=1e-3)
    samples += _samples(0.5, 1e-5, [1000, 9000], group_size=4)
    fits = fit_collectives(samples)
    assert set(fits) == {"all_to_all/2", "all_to_all/4"}
    assert fits["all_to_all/2"].alpha == pytest.approx(0.2, abs=2e-3)
    assert fits["all_to_all/2"].beta == pytest.approx(3e-6, rel=1e-2)
    assert fits["all_to_all/4"].alpha == pytest.approx(0.5)
    assert fits["all_to_all/4"].beta == pytest.approx(1e-5)


def test_fit_of_one_size_is_proportional_and_a_negative_intercept_is_clamped():
    one = fit_collectives(_samples(0.0, 2e-6, [4096]) + [{"kind": "all_reduce", "group_size": 2, "bytes": 0, "ms": 0.1}])
    assert one["all_to_all/2"].alpha == 0.0 and one["all_to_all/2"].beta == pytest.approx(2e-6)
    assert one["all_reduce/2"] == LinearCost(0.1, 0.0)
    neg = fit_collectives(_samples(-0.5, 1e-6, [1 << 20, 1 << 21]))["all_to_all/2"]
    assert neg.alpha == 0.0 and neg.beta > 0
    flat = fit_collectives([{"kind": "all_gather", "group_size": 2, "bytes": n, "ms": t}
                            for n, t in [(100, 1.0), (200, 0.5)]])["all_gather/2"]
    assert flat.beta == 0.0 and flat.alpha == pytest.approx(0.75)


def test_a_link_whose_small_messages_cost_more_than_the_line_gets_a_floor():
    from fsmoe_compiler.profiler.comm import with_floor
    from fsmoe_compiler.reporting.tables import link_models_text

    def samples(points):
        return [{"kind": "all_reduce", "group_size": 2, "bytes": n, "ms": t} for n, t in points for _ in range(3)]

    # an all-reduce on the emulated 300 Mbit/s link, back to back: 384 B, 4 KiB, 64 KiB, 1 MiB
    measured = [(384, 0.98), (4096, 0.77), (65536, 1.79), (1 << 20, 29.12)]
    fit = fit_collectives(samples(measured))["all_reduce/2"]
    line = LinearCost(fit.alpha, fit.beta)
    assert line(384) < 0.6 and fit.floor == pytest.approx(0.77)  # the next size's time bounds the floor
    assert fit(384) == fit(4096) == pytest.approx(0.77) and fit(1 << 20) == line(1 << 20)
    on_a_line = [(n, 0.25 + 3e-5 * n) for n in (384, 4096, 65536, 1 << 20)]
    assert fit_collectives(samples(on_a_line))["all_reduce/2"].floor == 0.0
    assert with_floor(line, measured[:1]) is line  # one size: nothing to compare with
    # the floor travels with the cost model (a cache written before it existed loads as a plain line)
    costs = CostModel(comm={"all_reduce/2": fit})
    assert CostModel.from_dict(costs.to_dict()).comm["all_reduce/2"] == fit
    old = costs.to_dict()
    old["comm"]["all_reduce/2"] = old["comm"]["all_reduce/2"][:2]
    assert CostModel.from_dict(old).comm["all_reduce/2"] == line
    assert "at least 0.770 ms" in link_models_text({"all_reduce/2": (fit.alpha, 28.0, None, fit.floor)})
    with pytest.raises(ValueError, match="floor=-1"):
        LinearCost(0.1, 0.0, -1.0)


def test_last_arrivals_keep_each_repetitions_least_time_over_ranks_and_fit_their_typical_time():
    def rank(times: list[float], nbytes: int = 4096) -> list[dict]:
        return [{"node": None, "kind": "all_to_all", "group": "0", "group_size": 2, "bytes": nbytes, "repeat": i,
                 "ms": t} for i, t in enumerate(times)]

    # rank 0 left each barrier first and waited for rank 1 inside the collective, except in repetition 2
    first, last = rank([4.56, 0.50, 0.30, 2.41, 0.9]), rank([0.31, 0.28, 1.7, 0.33, 0.29])
    loose = {"node": "all_to_all_single", "kind": "all_to_all", "group_size": 2, "bytes": 4096, "ms": 9.0}
    got = last_arrivals([first + [loose], last])
    assert sorted(s["ms"] for s in got if "repeat" in s) == [0.28, 0.29, 0.30, 0.31, 0.33]
    assert loose in got and len(got) == 6  # an in-graph sample (no repetition index) passes through
    fitted = fit_collectives([s for s in got if "repeat" in s])["all_to_all/2"]
    assert fitted.alpha == 0.0 and fitted.beta * 4096 == pytest.approx(0.295)  # without the slowest, not rank 0's
    assert fit_collectives(first)["all_to_all/2"].beta * 4096 == pytest.approx(1.0275)  # what one rank alone read


def test_a_repeated_time_costs_its_mean_without_the_slowest_twentieth():
    tail = [0.3] * 16 + [0.6, 0.9, 1.2, 40.0]  # a loopback all-to-all: mostly fast, a long tail, one host stall
    assert typical_ms(tail) == pytest.approx((16 * 0.3 + 0.6 + 0.9 + 1.2) / 19)  # the stall is dropped, the tail is not
    assert typical_ms(tail) > statistics.median(tail)  # a step sums such times: the median would price it short
    assert typical_ms([0.5, 0.7]) == pytest.approx(0.6) and typical_ms([2.0]) == 2.0  # too few to drop any
    assert typical_ms(list(range(1, 41))) == pytest.approx(statistics.fmean(range(1, 39)))  # two of forty
    with pytest.raises(ValueError, match="at least one"):
        typical_ms([])


def test_link_microbenchmarks_time_a_message_large_enough_to_fix_the_slope():
    assert link_sizes({32, 8192, 6720, 16384}) == [32, 8192, 16384, SLOPE_ANCHOR_BYTES]  # a tiny layer's messages
    assert link_sizes([4 << 20, 1 << 20, 2 << 20, 3 << 20]) == [1 << 20, 3 << 20, 4 << 20]  # large enough alone
    assert link_sizes([SLOPE_ANCHOR_BYTES]) == [SLOPE_ANCHOR_BYTES]
    with pytest.raises(ValueError, match="at least one"):
        link_sizes(set())
    # fitted from the small sizes alone, noise of 0.05 ms reads as a slope of several ms/MiB; with the anchor it is
    # the link's: 0.3 ms + 0.4 ms/MiB
    true = lambda n: 0.3 + 0.4 * n / (1 << 20)
    small = [(32, 0.05), (8192, -0.05), (16384, 0.05)]
    pts = [{"kind": "all_to_all", "group_size": 2, "bytes": n, "ms": true(n) + e} for n, e in small]
    anchor = [{"kind": "all_to_all", "group_size": 2, "bytes": SLOPE_ANCHOR_BYTES, "ms": true(SLOPE_ANCHOR_BYTES)}]
    assert fit_collectives(pts + anchor)["all_to_all/2"].beta * (1 << 20) == pytest.approx(0.4, rel=0.05)


def test_cpu_share_is_the_part_of_a_collective_the_compute_beside_it_could_not_hide():
    def alone(ms: float, nbytes: int) -> list[dict]:
        return [{"node": None, "kind": "all_to_all", "group": "0", "group_size": 2, "bytes": nbytes, "repeat": i,
                 "ms": ms} for i in range(3)]

    def beside(ms: float, load_ms: float, nbytes: int) -> list[dict]:
        return [{**s, "beside": True, "load_ms": load_ms} for s in alone(ms, nbytes)]

    serial = alone(1.0, 4096) + beside(2.0, 1.0, 4096)  # the sum: the collective needed the core throughout
    hidden = alone(4.0, 4096) + beside(4.1, 2.0, 4096)  # the larger: the link waits, the core was free
    half = alone(2.0, 1 << 20) + beside(3.0, 2.0, 1 << 20)
    assert cpu_shares(serial) == {"all_to_all/2": 1.0}
    assert cpu_shares(hidden) == {"all_to_all/2": pytest.approx(0.05)}
    assert cpu_shares(alone(1.0, 4096) + half) == {"all_to_all/2": pytest.approx(0.5)}  # no pair at 4 KiB
    assert cpu_shares(alone(1.0, 4096)) == {}
    # an emulated link's token bucket: one repetition after idling bursts through; the steady state needed no core
    def reps(times: list[float], load_ms: float | None = None) -> list[dict]:
        extra = {} if load_ms is None else {"beside": True, "load_ms": load_ms}
        return [{"node": None, "kind": "all_to_all", "group": "0", "group_size": 2, "bytes": 4096, "repeat": i,
                 "ms": t, **extra} for i, t in enumerate(times)]

    bursty = reps([1.3, 3.7, 3.7, 3.8]) + reps([1.6, 3.6, 3.6, 3.7], load_ms=1.0)
    # the steady state: (2.933 - 2.9) / 1.0; from the least of each, the bursts, it read (1.6 - 1.3) / 1.0 = 0.3
    assert cpu_shares(bursty) == {"all_to_all/2": pytest.approx(0.1 / 3)}
    # the loaded runs are not the link: the fit reads the collective alone
    assert fit_collectives(serial)["all_to_all/2"].beta * 4096 == pytest.approx(1.0)
    nodes = {n.name: n for n in _a2a_graph().graph.nodes}
    costs = CostModel(node_ms={"mm": 6.0}, comm={"all_to_all/2": LinearCost(0.5, 0.0)}, cpu_share={"all_to_all/2": 0.4})
    assert costs.cpu_ms(nodes["all_to_all_single"]) == pytest.approx(0.2)
    assert costs.cpu_ms(nodes["mm"]) == 0.0 and CostModel(comm=costs.comm).cpu_ms(nodes["all_to_all_single"]) == 0.0
    assert CostModel.from_json(costs.to_json()) == costs
    assert "CPU shares not in [0, 1]: all_to_all/2=1.5" in CostModel(cpu_share={"all_to_all/2": 1.5}).problems()[0]


# -- cost model --------------------------------------------------------------------------------------


def _a2a_graph(rows: int = 8, group: str = "0", splits=(2, 2)) -> fx.GraphModule:
    """x -> mm -> all_to_all -> wait -> relu, with meta["val"] on every node (never executed)."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    x.meta["val"], w.meta["val"] = torch.empty(rows, 4), torch.empty(4, 6)
    mm = g.create_node("call_function", torch.ops.aten.mm.default, (x, w), name="mm")
    mm.meta["val"] = torch.empty(rows, 6)
    a2a = g.create_node(
        "call_function", torch.ops._c10d_functional.all_to_all_single.default, (mm, list(splits), list(splits), group),
        name="all_to_all_single",
    )
    a2a.meta["val"] = torch.empty(rows, 6)
    wait = g.create_node("call_function", torch.ops._c10d_functional.wait_tensor.default, (a2a,), name="wait_tensor")
    wait.meta["val"] = torch.empty(rows, 6)
    relu = g.create_node("call_function", torch.ops.aten.relu.default, (wait,), name="relu")
    relu.meta["val"] = torch.empty(rows, 6)
    g.output(relu)
    return fx.GraphModule(torch.nn.Module(), g)


def test_node_cost_scales_chunk_copies_by_degree_and_prices_collectives_by_bytes():
    gm = _a2a_graph()
    nodes = {n.name: n for n in gm.graph.nodes}
    costs = CostModel(node_ms={"mm": 6.0, "relu": 1.0}, comm={"all_to_all/2": LinearCost(0.5, 0.01)})
    assert costs.node_cost(nodes["mm"]) == 6.0
    assert costs.node_cost(nodes["all_to_all_single"]) == pytest.approx(0.5 + 0.01 * 8 * 6 * 4)
    assert costs.node_cost(nodes["wait_tensor"]) == 0.0
    assert costs.node_cost(nodes["x"]) == 0.0
    with gm.graph.inserting_after(nodes["mm"]):  # a chunk copy: same op, a third of the rows
        copy = gm.graph.call_function(torch.ops.aten.mm.default, nodes["mm"].args)
    copy.meta["fsmoe"] = {"layer": 0, "role": "expert", "chunk": 1, "degree": 3, "origin": "mm"}
    assert costs.node_cost(copy) == pytest.approx(2.0)
    copy.meta["fsmoe"]["origin"] = "never_measured"
    assert costs.node_cost(copy) == 0.0
    # a group size without its own model borrows the nearest measured one; an unmeasured kind is an error
    assert costs.collective_ms("all_to_all", 4, 100) == pytest.approx(1.5)
    with pytest.raises(KeyError, match="all_gather"):
        costs.collective_ms("all_gather", 2, 100)


def test_cost_model_json_round_trip_and_merge():
    costs = CostModel(
        node_ms={"mm": 1.25, "relu": 0.5},
        comm={"all_to_all/2": LinearCost(0.1, 1e-6)},
        samples=_samples(0.1, 1e-6, [100, 1000]),
    )
    again = CostModel.from_json(costs.to_json())
    assert again == costs
    assert CostModel.from_json(json.loads(costs.to_json())) == costs
    with pytest.raises(ValueError, match="schema"):
        CostModel.from_json(json.dumps({**json.loads(costs.to_json()), "schema": 99}))
    other = CostModel(node_ms={"relu": 0.75, "add": 0.1}, samples=_samples(0.1, 1e-6, [10000]))
    merged = costs.merge(other)
    assert merged.node_ms == {"mm": 1.25, "relu": 0.75, "add": 0.1}
    assert len(merged.samples) == len(costs.samples) + len(other.samples)
    assert merged.comm["all_to_all/2"].beta == pytest.approx(1e-6)
    assert costs.merge(other, nodes=False).node_ms == costs.node_ms


def test_from_profiles_takes_the_median_call_per_node():
    costs = CostModel.from_profiles([{"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 1.0}, {"a": 2.0, "b": 2.0, "c": 4.0},
                                     {"b": 9.0}])
    assert costs.node_ms == {"a": 2.0, "b": 3.5, "c": 4.0}  # b: the mean of the middle two of four


def test_agree_without_distributed_is_the_identity():
    costs = CostModel(node_ms={"a": 1.0})
    assert agree(costs, "test/alone") is costs


# -- cache -------------------------------------------------------------------------------------------


def test_profile_key_is_stable_across_captures_and_changes_with_shapes():
    first = profile_key(_moe_forward(), 2)
    second = profile_key(_moe_forward(seed=1), 2)  # another capture, other weights: same shapes
    assert first == second
    assert profile_key(_moe_forward(batch=3), 2) != first
    assert profile_key(_moe_forward(), 4) != first


def test_profile_key_ignores_group_names_and_ranks_but_not_group_sizes():
    a = profile_key(_a2a_graph(group="0"), world_layout(4, 2, 0))
    assert a == profile_key(_a2a_graph(group="my_group"), world_layout(4, 2, 3))
    payload = json.dumps(key_payload(_a2a_graph(group="my_group"), world_layout(4, 2, 3)), default=str)
    assert "my_group" not in payload and "rank" not in payload
    assert a != profile_key(_a2a_graph(group="0"), world_layout(4, 4, 0))
    assert a != profile_key(_a2a_graph(group="0", splits=(1, 1, 1, 1)), world_layout(4, 2, 0))
    assert a != profile_key(_a2a_graph(rows=12), world_layout(4, 2, 0))
    assert profile_key(_a2a_graph(), {"world_size": 2, "ep_size": 2, "rank": 0}) == profile_key(
        _a2a_graph(), {"world_size": 2, "ep_size": 2, "rank": 1}
    )


def test_cache_stores_atomically_and_loads(tmp_path):
    cache = ProfileCache(tmp_path / "profiles")
    key = profile_key(_a2a_graph(), 2)
    assert cache.load(key) is None  # nothing stored yet, no warning
    costs = CostModel(node_ms={"mm": 1.0}, comm={"all_to_all/2": LinearCost(0.1, 1e-6)})
    path = cache.store(key, costs)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load(key) == costs


@pytest.mark.parametrize(
    "content, why",
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"schema": 1, "key": "0" * 64, "costs": {}}), "holds key"),
        (json.dumps({"schema": 0, "key": "K", "costs": {}}), "schema"),
        (json.dumps({"schema": 1, "key": "K", "costs": {"schema": 1, "node_ms": {}}}), "bad cost model"),
    ],
    ids=["corrupt", "other-key", "old-schema", "truncated-model"],
)
def test_unusable_cache_files_warn_naming_the_file_and_load_as_none(tmp_path, content, why):
    cache = ProfileCache(tmp_path)
    key = "K" if '"K"' in content else profile_key(_a2a_graph(), 2)
    cache.path(key).write_text(content)
    with pytest.warns(UserWarning, match=why) as record:
        assert cache.load(key) is None
    assert str(cache.path(key)) in str(record[0].message)


def _stored(cache: ProfileCache, key: str, costs: dict) -> None:
    cache.path(key).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key).write_text(json.dumps({"schema": 1, "key": key, "costs": costs}))


@pytest.mark.parametrize(
    "node_ms, comm, samples, why",
    [
        ({"mm": float("nan")}, {}, [], r"node costs not a time in \[0, 3600000\] ms: mm=nan"),
        ({"mm": -2.0}, {}, [], r"node costs not a time .*mm=-2.0"),
        ({"mm": 1e12}, {}, [], r"node costs not a time .*mm=1000000000000.0"),
        ({"mm": 1.0}, {"all_to_all/2": [0.1, float("inf")]}, [], r"bad cost model .*LinearCost needs finite"),
        ({"mm": 1.0}, {"all_to_all/2": [1e9, 1e-6]}, [], r"link models not a time: all_to_all/2 \(alpha 1000000000.0"),
        ({"mm": 1.0}, {"all_to_all/2": [0.1, 10.0]}, [], r"link models not a time: all_to_all/2 \(alpha 0.1, beta 10.0\)"),
        ({"mm": 1.0}, {}, [{"node": "a2a", "ms": -1.0}], r"collective samples without a time: \['a2a'\]"),
    ],
    ids=["nan", "negative", "absurd", "inf-beta", "absurd-alpha", "absurd-beta", "negative-sample"],
)
def test_a_cache_file_with_impossible_costs_is_ignored_with_a_warning_naming_it(tmp_path, node_ms, comm, samples, why):
    cache = ProfileCache(tmp_path)
    key = profile_key(_a2a_graph(), 2)
    _stored(cache, key, {"schema": 1, "node_ms": node_ms, "comm": comm, "samples": samples})
    with pytest.warns(UserWarning, match=why) as record:
        assert cache.load(key) is None
    assert str(cache.path(key)) in str(record[0].message)


def test_a_cache_file_that_leaves_nodes_of_the_graph_without_a_time_is_ignored(tmp_path):
    """The scheduler would price a node the model has no time for at 0: such a file (another graph's, or edited)
    is ignored, while the same file with every compute node is used."""
    gm = _moe_forward()
    _, node_ms, samples = profile_call(gm, inputs_from_meta(gm))
    full = CostModel.from_profiles([node_ms], samples)
    assert full.problems(gm.graph) == []
    cache = ProfileCache(tmp_path)
    key = profile_key(gm, 1)
    cache.store(key, full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load(key, gm.graph) == full
    dropped = sorted(node_ms)[:3]
    cache.store(key, CostModel({k: v for k, v in node_ms.items() if k not in dropped}, full.comm, full.samples))
    in_graph_order = [n.name for n in gm.graph.nodes if n.name in dropped]
    with pytest.warns(UserWarning, match=r"no time for 3 node\(s\) of the graph: " + re.escape(repr(in_graph_order))):
        assert cache.load(key, gm.graph) is None

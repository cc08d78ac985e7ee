"""One word per thing: the simulator's method names and aliases, collective kinds in its cost records and cache,
and the buckets ``sync_gradients(bucket_mb=...)`` all-reduces. Pure and fast: no ranks, no solver."""

from __future__ import annotations

import json

import pytest
import torch

from fsmoe_compiler.moe.parallel import _buckets
from fsmoe_compiler.names import COLLECTIVE_KINDS, SEQUENTIAL, TUTEL
from fsmoe_compiler.sim import presets
from fsmoe_compiler.sim.methods import (ALIASES, BASELINES, METHODS, OURS, REPORTED_METHODS, canonical_method,
                                        report_name)


def test_the_simulator_has_one_methods_tuple_and_reports_ours_as_ours():
    assert METHODS == ("fsmoe", "sequential", "tutel", "fsmoe_paper", "lower_bound")
    assert BASELINES[:2] == (SEQUENTIAL, TUTEL)
    assert REPORTED_METHODS == (OURS, "sequential", "tutel", "fsmoe_paper", "lower_bound")
    assert {canonical_method(a) for a in ALIASES} <= set(METHODS)
    assert canonical_method("cpsat") == canonical_method(OURS) == "fsmoe" and report_name("cpsat") == OURS
    with pytest.raises(ValueError, match="unknown method 'magic'; valid methods: fsmoe, .*aliases: cpsat"):
        canonical_method("magic")


def test_cluster_costs_name_collectives_by_their_kind():
    costs = presets.get_preset("fsmoe-testbed", 16)
    assert [costs.collective(k) for k in COLLECTIVE_KINDS] == [costs.all_to_all, costs.all_gather,
                                                               costs.reduce_scatter, costs.all_reduce]
    assert [op for op, _, _ in presets.costs_table(costs)][:4] == list(COLLECTIVE_KINDS)
    with pytest.raises(ValueError, match="valid kinds"):
        costs.collective("a2a")


def test_a_local_cache_with_the_old_kind_words_still_loads(tmp_path):
    samples = {k: [[n, 0.1 * (i + 1) + 1e-6 * n] for n in (1e4, 1e6)] for i, k in
               enumerate(("a2a", "allgather", "reducescatter", "allreduce"))}
    path = tmp_path / "local_costs.json"
    path.write_text(json.dumps({"machine": presets._machine_key(),
                                "samples": {"coll": samples, "gemm": [[1e6, 0.01], [1e8, 1.0]]}}))
    c = presets.local_costs(16, cache_path=path)  # no measure needed: it comes from the cache
    assert c.all_to_all.alpha == pytest.approx(0.1) and c.all_reduce.alpha == pytest.approx(0.4)


def test_the_local_preset_without_a_cache_or_a_measurement_says_how_to_get_one(tmp_path):
    with pytest.raises(ValueError, match="fsmoe simulate --preset local"):
        presets.local_costs(16, cache_path=tmp_path / "none.json")


def test_gradient_buckets_keep_order_size_and_dtype():
    f32 = [torch.zeros(256) for _ in range(5)]  # 1 KiB each
    b = _buckets(f32[:2] + [torch.zeros(4, dtype=torch.float64)] + f32[2:], 2 / 1024)  # 2 KiB buckets
    assert [len(x) for x in b] == [2, 1, 2, 1]
    assert b[1][0].dtype == torch.float64 and sum(map(len, b)) == 6
    assert [len(x) for x in _buckets(f32, float("inf"))] == [5]
    assert [len(x) for x in _buckets([torch.zeros(1024)], 1e-6)] == [1]  # a gradient larger than a bucket: alone
    with pytest.raises(ValueError, match="bucket_mb"):
        _buckets(f32, 0)

"""Cost presets give the documented constants; the local fit recovers known lines."""

import json
import random

import pytest

from fsmoe_compiler.bench import links
from fsmoe_compiler.scheduler.costs import LinearCost
from fsmoe_compiler.sim import presets
from fsmoe_compiler.sim.costs import ClusterCosts
from fsmoe_compiler.sim.presets import fit_local, get_preset, h100_ib400, preset_names


def test_fsmoe_testbed_has_the_constants_fsmoe_measured():
    c16, c32, c48 = (get_preset("fsmoe-testbed", g) for g in (16, 32, 48))
    assert [c.all_to_all.beta for c in (c16, c32, c48)] == [1.306e-6, 1.854e-6, 2.320e-6]
    assert [c.all_reduce.beta for c in (c16, c32, c48)] == [2.916e-6, 3.495e-6, 4.951e-6]
    assert c16.all_to_all.alpha == 0.287 and c16.all_reduce.alpha == 0.511
    assert c16.all_gather == LinearCost(0.338, 6.7e-7) and c16.reduce_scatter == LinearCost(0.395, 6.7e-7)
    assert c16.gemm == {"gpt": LinearCost(1.09, 1.53e-10), "swiglu": LinearCost(1.47, 3.17e-10)}
    assert (c32.gpus, c32.gpus_per_node, c32.name) == (32, 8, "fsmoe-testbed")


def test_fsmoe_testbed_rejects_gpu_counts_it_was_not_measured_at():
    with pytest.raises(ValueError, match=r"gpus in \[16, 32, 48\].*gpus=24"):
        get_preset("fsmoe-testbed", 24)


def test_h100_preset_follows_its_derivation():
    c = h100_ib400(16)
    # 2 bytes * (P-1)/P / (50 GB/s * 0.8), P = 2 nodes, in ms
    assert c.all_to_all.beta == pytest.approx(2 * 0.5 / 40e9 * 1e3)
    assert c.all_reduce.beta == pytest.approx(2 * 2 * 0.5 / 8 / 40e9 * 1e3)
    assert c.all_gather.beta == pytest.approx(2 * 7 / 8 / 360e9 * 1e3)
    assert c.gemm["gpt"].beta == pytest.approx(1e3 / (0.65 * 989e12 / 2))
    assert c.gemm["swiglu"].alpha > c.gemm["gpt"].alpha
    # more nodes: a larger share of the A2A crosses the network
    assert h100_ib400(16).all_to_all.beta < h100_ib400(32).all_to_all.beta < h100_ib400(48).all_to_all.beta


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        get_preset("a100-ethernet", 16)
    msg = str(e.value)
    assert "a100-ethernet" in msg
    for name in preset_names():
        assert name in msg


def test_fit_linear_recovers_alpha_and_beta_from_noisy_points():
    rng = random.Random(0)
    ns = [2**k for k in range(10, 21)]
    ts = [0.25 + 3e-6 * n + rng.gauss(0, 1e-3) for n in ns]
    fit = LinearCost.fit(ns, ts)
    assert fit.alpha == pytest.approx(0.25, abs=5e-3)
    assert fit.beta == pytest.approx(3e-6, rel=1e-2)


def test_fit_linear_clamps_to_a_valid_cost():
    assert LinearCost.fit([1, 2, 3], [3.0, 2.0, 1.0]).beta == 0.0  # decreasing -> flat
    fit = LinearCost.fit([1, 10, 100], [0.0, 0.5, 9.0])  # negative intercept -> through the origin
    assert fit.alpha == 0.0 and fit.beta > 0
    with pytest.raises(ValueError):
        LinearCost.fit([5, 5], [1.0, 2.0])


def test_fit_local_and_the_cache_round_trip(tmp_path, monkeypatch):
    samples = presets.LocalSamples(
        coll={k: [(n, 0.1 * (i + 1) + 1e-6 * (i + 1) * n) for n in (1e4, 1e5, 1e6)] for i, k in enumerate(presets.LOCAL_COLLECTIVES)},
        gemm=[(m, 0.05 + 1e-8 * m) for m in (1e6, 1e7, 1e8)],
    )
    c = fit_local(samples, gpus=32)
    assert isinstance(c, ClusterCosts) and c.name == "local" and c.gpus == 32
    assert c.all_to_all.alpha == pytest.approx(0.1) and c.all_reduce.beta == pytest.approx(4e-6)
    assert c.gemm["gpt"].alpha == pytest.approx(0.1) and c.gemm["swiglu"].alpha == pytest.approx(0.15)
    assert c.gemm["gpt"].beta == pytest.approx(1e-8)

    calls = []
    monkeypatch.setattr(links, "measure_local", lambda: calls.append(1) or samples)
    path = tmp_path / "local_costs.json"
    first = links.local_costs(16, cache_path=path)
    assert calls == [1] and json.loads(path.read_text())["machine"]["version"] == presets.LOCAL_CACHE_VERSION
    assert links.local_costs(16, cache_path=path) == first and calls == [1]  # from the cache
    links.local_costs(16, cache_path=path, refit=True)
    assert calls == [1, 1]
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert links.local_costs(16, cache_path=path) == first
    assert calls == [1, 1, 1]


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FSMOE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert presets.default_cache_path() == tmp_path / "fsmoe" / "local_costs.json"
    monkeypatch.setenv("FSMOE_CACHE_DIR", str(tmp_path / "x"))
    assert presets.default_cache_path() == tmp_path / "x" / "local_costs.json"


@pytest.mark.timeout(60)
def test_local_measurement_on_two_real_ranks():
    samples = links.measure_local(coll_sizes=(1 << 12, 1 << 16), gemm_sizes=((64, 64, 64), (128, 256, 256)), reps=3)
    assert set(samples.coll) == set(presets.LOCAL_COLLECTIVES)
    assert all(len(v) == 2 and all(t > 0 for _, t in v) for v in samples.coll.values())
    assert len(samples.gemm) == 2 and all(t > 0 for _, t in samples.gemm)
    c = fit_local(samples)
    assert c.gemm["gpt"].beta >= 0 and c.all_to_all.alpha >= 0

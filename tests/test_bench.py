"""``fsmoe bench``: bad input, aggregation, PyTorch's overlap scheduler on CPU, and end-to-end runs on 2 ranks."""

from __future__ import annotations

import json
import re
import os

import pytest
import torch

from fsmoe_compiler.bench import allocator
from fsmoe_compiler.bench import runner as bench_runner
from fsmoe_compiler.bench.cli import main as bench_main
from fsmoe_compiler.bench.methods import BENCH_METHODS, CpuRuntimeEstimator, parse_methods
from fsmoe_compiler.bench.netns import netns_unavailable_reason
from fsmoe_compiler.bench.records import BenchConfig, MethodResult, RankMethodRaw

TINY = ["--layers", "1", "--d-model", "32", "--d-ff", "64", "--batch", "4", "--seq", "16",
        "--steps", "2", "--warmup", "1", "--no-breakdown"]


def test_parse_methods_keeps_order_and_names_the_valid_ones():
    assert parse_methods(None) == list(BENCH_METHODS)
    assert parse_methods("aot_eager, eager,aot_eager") == ["aot_eager", "eager"]
    with pytest.raises(ValueError, match="unknown method.*'turbo'.*valid methods: eager, dynamo, aot_eager, inductor, "
                                          "pytorch_overlap, inductor_overlap, torchtitan_graph, fsmoe_sequential, "
                                          "fsmoe_tutel, fsmoe, fsmoe_inductor, fsmoe_partitioned, fsmoe_bucket"):
        parse_methods("eager,turbo")
    with pytest.raises(ValueError, match="no methods given"):
        parse_methods(" , ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "eager,turbo"], "unknown method(s) 'turbo'; valid methods: eager, dynamo, aot_eager"),
        (["--emulate-link", "12parsecs"], "bad link rate '12parsecs'"),
        (["--model", "llama"], "unknown example model 'llama'; valid models: gpt2, mixtral"),
        (["--experts", "3"], "--experts (3) must be a multiple of --ranks (2)"),
        (["--warmup", "0"], "--warmup must be >= 1"),
        (["--top-k", "9"], "--top-k (9) must be <= --experts (4)"),
        (["--tokens", "8", "--seq", "16"], "--tokens (8) must be >= --seq (16)"),
        (["--fsmoe-option", "max_degree"], "--fsmoe-option wants KEY=VALUE, got 'max_degree'"),
        (["--model", "torchtitan", "--dispatch", "capacity"], "--model torchtitan is dropless only"),
        (["--emulate-link", "inter=300mbit,intra=fast"], "bad link rate 'fast'"),
        (["--emulate-link", "intra=2gbit"], "no inter=RATE; the forms: RATE or inter=RATE[,intra=RATE]"),
        (["--emulate-link", "inter=1gbit,between=1gbit"], "at 'between=1gbit'; the forms"),
        (["--ranks", "4", "--ranks-per-node", "3"], "--ranks-per-node must divide --ranks (4), got 3"),
        (["--ranks-per-node", "2"], "--ranks-per-node 2 places ranks in node namespaces: it needs --emulate-link"),
        (["--emulate-link", "inter=300mbit,intra=2gbit"], "an intra-node rate (2gbit) needs nodes of >= 2 ranks"),
        (["--ranks-per-node", "2", "--emulate-link", "300mbit"], "joins >= 2 nodes: 2 ranks at 2 per node make 1"),
    ],
)
def test_bad_input_is_an_error_naming_the_fix(argv, message, capsys):
    assert bench_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsmoe bench: error: ") and message in err, err


def test_tokens_sets_the_batch():
    from fsmoe_compiler.bench.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--tokens", "512", "--seq", "32", "--fsmoe-option",
                                                       "max_degree=8", "--fsmoe-option", "cache_dir=/tmp/c"]))
    assert cfg.batch == 16 and cfg.seq == 32
    assert cfg.fsmoe_options == {"max_degree": 8, "cache_dir": "/tmp/c"}


def test_a_bad_fsmoe_option_fails_before_any_rank_starts():
    from fsmoe_compiler.bench.cli import build_parser, config_from_args

    with pytest.raises(ValueError, match=r"--fsmoe-option: fsmoe option 'narrow_comm' must be True or False, "
                                         r"got 'False' \(VALUE is read as JSON"):
        config_from_args(build_parser().parse_args(["--fsmoe-option", "narrow_comm=False"]))
    cfg = config_from_args(build_parser().parse_args(["--fsmoe-option", "narrow_comm=false"]))
    assert cfg.fsmoe_options == {"narrow_comm": False}


@pytest.mark.parametrize("argv, dispatch", [([], "capacity"), (["--dispatch", "dropless"], "dropless"),
                                            (["--model", "torchtitan"], "dropless")])
def test_dispatch_reaches_the_example_model(argv, dispatch):
    """--dispatch is handed to the example's build_model (torchtitan's layer is always dropless: its default);
    the tiny model built from the bench's overrides in one process gives a finite loss."""
    from fsmoe_compiler.bench.cli import build_parser, config_from_args
    from fsmoe_compiler.demo import example_module

    if "torchtitan" in argv:
        pytest.importorskip("torchtitan")
    cfg = config_from_args(build_parser().parse_args(argv + ["--layers", "1", "--d-model", "32", "--d-ff", "64",
                                                             "--seq", "8", "--shared-expert"]))
    assert cfg.dispatch == dispatch and cfg.model_overrides()["dispatch"] == dispatch
    mod = example_module(cfg.model)
    torch.manual_seed(0)
    model = mod.build_model(**cfg.model_overrides())
    assert torch.isfinite(model(*mod.make_batch(2, cfg.seq, model.config.vocab_size)))


def test_rank_env_selects_the_malloc_asked_for(monkeypatch):
    from fsmoe_compiler.bench.cli import build_parser, config_from_args

    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/opt/lib/libjemalloc.so.2")
    cfg = config_from_args(build_parser().parse_args(["--threads", "2", "--malloc", "jemalloc"]))
    env = bench_runner.rank_env(cfg, None, 29555)
    assert env["OMP_NUM_THREADS"] == "2" and env["MASTER_PORT"] == "29555" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert env["LD_PRELOAD"].split()[0] == "/opt/lib/libjemalloc.so.2" and env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    keep = bench_runner.rank_env(config_from_args(build_parser().parse_args(["--malloc", "glibc-keep"])), None, 1)
    assert {k: keep[k] for k in allocator.GLIBC_KEEP} == allocator.GLIBC_KEEP and "MALLOC_CONF" not in keep
    assert int(keep["MALLOC_MMAP_THRESHOLD_"]) == 32 << 20  # glibc's ceiling; larger values are ignored
    plain = bench_runner.rank_env(config_from_args(build_parser().parse_args(["--malloc", "glibc"])), None, 1)
    assert all(plain.get(k) == os.environ.get(k) for k in [*allocator.GLIBC_KEEP, "MALLOC_CONF", "LD_PRELOAD"])
    with pytest.raises(SystemExit):  # argparse names the choices
        build_parser().parse_args(["--malloc", "tcmalloc"])
    with pytest.raises(ValueError, match="--malloc must be one of auto, jemalloc, glibc-keep, glibc, got 'tcmalloc'"):
        BenchConfig(methods=["eager"], malloc="tcmalloc").validate()


def test_auto_malloc_is_jemalloc_where_installed_else_glibc_keep_and_says_why(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/opt/lib/libjemalloc.so.2")
    assert allocator.resolve("auto") == ("jemalloc", None)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    malloc, why = allocator.resolve("auto")
    assert malloc == "glibc-keep" and "jemalloc not installed" in why and "libjemalloc2" in why
    with pytest.raises(ValueError, match="libjemalloc.so.2 not found.*glibc-keep, glibc"):
        allocator.resolve("jemalloc")


def test_a_rank_started_with_the_jemalloc_env_runs_jemalloc():
    import subprocess
    import sys

    if allocator.find_jemalloc() is None:
        pytest.skip(f"jemalloc is not installed ({allocator.INSTALL_HINT}); .ci/run installs it")
    code = "from fsmoe_compiler.bench import allocator; print(allocator.in_use())"
    for malloc, expected in (("jemalloc", "jemalloc"), ("glibc-keep", "glibc-keep"), ("glibc", "glibc")):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", *allocator.GLIBC_KEEP)}
        env.update(allocator.env_for(malloc, env), PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected, (malloc, out.stdout, out.stderr)


def test_warm_up_leaves_every_method_at_the_same_weights():
    from fsmoe_compiler.bench import worker

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    start = worker._snapshot(model)
    for _ in range(3):  # warm-up trains: weights, running stats and momentum move
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(params[0], start["0.weight"]) and opt.state
    worker._restore(model, opt, start)
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert list(model.parameters()) == params and all(p.grad is None for p in params)  # same tensors, in place
    assert not opt.state  # no momentum carried into the timed steps


def test_aggregate_takes_the_slowest_rank_per_repeat_and_flags_loss_mismatch():
    cfg = BenchConfig(methods=["eager", "aot_eager", "fsmoe"])
    ranks = [
        {"link": {"alpha_ms": 0.1, "bytes_per_ms": 1e5}, "cpu": {}, "methods": {
            "eager": vars(RankMethodRaw(times_ms=[10.0, 12.0, 11.0], first_loss=2.0)),
            "aot_eager": vars(RankMethodRaw(times_ms=[5.0, 6.0, 7.0], first_loss=2.5)),
            "fsmoe": vars(RankMethodRaw(error="ValueError: unknown fsmoe option 'scheduler'")),
        }},
        {"link": {}, "cpu": {}, "methods": {
            "eager": vars(RankMethodRaw(times_ms=[11.0, 9.0, 13.0], first_loss=4.0)),
            "aot_eager": vars(RankMethodRaw(times_ms=[4.0, 6.0, 5.0], first_loss=4.5)),
            "fsmoe": vars(RankMethodRaw(error="failed on another rank")),
        }},
    ]
    res = bench_runner.aggregate(cfg, ranks, {"mode": "loopback"}, [])
    eager, aot, fs = res.methods
    assert eager.times_ms == [11.0, 12.0, 13.0] and eager.median_ms == 12.0 and eager.first_loss == 3.0
    assert aot.times_ms == [5.0, 6.0, 7.0] and aot.speedup_vs_eager == pytest.approx(2.0)
    assert not fs.ok and "unknown fsmoe option" in fs.error
    assert any("first-step loss of aot_eager" in w for w in res.warnings)
    assert res.speedups == {"eager": {"aot_eager": 0.5}, "aot_eager": {"eager": 2.0}}
    json.loads(res.to_json())


def test_method_result_of_one_repeat_has_a_degenerate_range():
    r = MethodResult.aggregate("eager", [RankMethodRaw(times_ms=[3.0])])
    assert (r.median_ms, r.q1_ms, r.q3_ms, r.min_ms, r.max_ms) == (3.0,) * 5


def test_the_table_tells_a_graph_kept_as_traced_from_one_that_failed_and_says_why():
    from fsmoe_compiler import records
    from fsmoe_compiler.bench.cli import render
    from fsmoe_compiler.bench.records import BenchResult

    kept = f"{records.FASTEST_AS_TRACED} (token split: as traced chosen, 5.0 ms)"
    failed = "scheduling failed, graph runs as traced: costs failed: rank 1: ValueError: bad cost"
    config = {"model": "gpt2", "layers": 1, "d_model": 8, "d_ff": 16, "experts": 2, "top_k": 1, "capacity_factor": 1.0,
              "batch": 1, "seq": 4, "ranks": 2, "threads": 1, "warmup": 1, "steps": 1}
    methods = [MethodResult("fsmoe", ok=True, median_ms=5.0, times_ms=[5.0],
                            info={"fsmoe": {"forward": {"fallback": kept}, "backward": {"fallback": failed}}})]
    text = render(BenchResult(config=config, link={"mode": "loopback"}, methods=methods))
    assert "fw: as traced, measured fastest; bw: fallback, why below" in text
    assert f"fsmoe backward graph fell back: {failed}" in text
    assert "forward graph fell back" not in text  # a choice, not a failure


def test_cpu_estimator_prices_compute_and_collectives_without_a_gpu():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b):
        return torch.mm(a, b).relu()

    with FakeTensorMode():
        gm = make_fx(f, tracing_mode="fake")(torch.randn(64, 32), torch.randn(32, 16))
    est = CpuRuntimeEstimator(flops_per_ms=1e6, bytes_per_ms=1e9, link_bytes_per_ms=1e3, world_size=2)
    mm = next(n for n in gm.graph.nodes if "mm" in str(n.target))
    assert est(mm, None) == pytest.approx(2 * 64 * 32 * 16 / 1e6)
    placeholder = next(iter(gm.graph.nodes))
    assert est(placeholder, None) == 0.0


def _run_json(tmp_path, argv: list[str], timeout_s: int = 150) -> dict:
    path = tmp_path / "bench.json"
    assert bench_main(argv + ["--json", str(path), "--timeout", str(timeout_s)]) == 0
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_runs_every_method_on_two_ranks_and_writes_json(tmp_path, capsys, monkeypatch):
    # without root / iproute2 the emulated link falls back to loopback and says so; force that path here
    monkeypatch.setattr(bench_runner, "netns_unavailable_reason", lambda: "not running as root (test)")
    data = _run_json(tmp_path, TINY + ["--emulate-link", "1gbit", "--shared-expert", "--trace-dir",
                                       str(tmp_path / "traces")], timeout_s=360)  # three methods run Inductor
    out = capsys.readouterr().out
    assert data["config"]["shared_expert"] and "+ shared expert" in out
    assert "running on loopback instead" in out and "method" in out and "median ms" in out
    assert data["link"]["mode"] == "loopback"
    assert any("running on loopback instead" in w for w in data["warnings"])
    by_name = {m["name"]: m for m in data["methods"]}
    assert list(by_name) == list(BENCH_METHODS)  # every method is in the table, failed or not
    tg = by_name["torchtitan_graph"]  # torchtitan's graph passes run on torchtitan's model only: skipped, with why
    assert not tg["ok"] and "MethodSkipped" in tg["error"] and "--model torchtitan" in tg["error"]
    assert re.search(r"torchtitan_graph +skipped", out)
    malloc = data["config"]["malloc"]  # "auto" made concrete, and the ranks ran what was asked
    assert malloc in ("jemalloc", "glibc-keep") and f"malloc: {malloc}" in out
    assert not any(w.startswith("malloc: asked for") for w in data["warnings"])
    for name in ("eager", "dynamo", "aot_eager", "inductor", "pytorch_overlap", "inductor_overlap"):
        m = by_name[name]
        assert m["ok"], m["error"]
        assert len(m["times_ms"]) == 2 and m["median_ms"] > 0 and m["speedup_vs_eager"] > 0
        assert m["first_loss"] == pytest.approx(by_name["eager"]["first_loss"], rel=1e-4)
    ov = by_name["pytorch_overlap"]["info"]["overlap"]
    assert ov["collectives"] == 4 and ov["moved"] > 0  # forward + backward all-to-alls, really reordered
    assert ov["overlapped_after"] > ov["overlapped_before"]  # some now have compute between start and wait
    assert not any("different orders" in w for w in data["warnings"])
    codegen = by_name["fsmoe_inductor"]
    assert codegen["ok"], codegen["error"]
    assert min(codegen["info"]["codegen_s_by_rank"]) > 0  # the chosen graphs compiled by Inductor on every rank
    assert "Inductor compile of the graphs fsmoe chose" in out
    for name in ("fsmoe_sequential", "fsmoe_tutel", "fsmoe", "fsmoe_inductor", "fsmoe_partitioned", "fsmoe_bucket"):
        m = by_name[name]
        assert m["ok"] or m["error"], m  # a failing fsmoe method is marked with its error, the rest go on
        if m["ok"]:
            assert m["first_loss"] == pytest.approx(by_name["eager"]["first_loss"], rel=1e-4)
            trace = json.loads((tmp_path / "traces" / f"{name}.rank0.json").read_text())  # --trace-dir
            assert {"forward", "backward"} <= set(trace["metadata"]) and trace["traceEvents"]
            # the backend's own work per rank, with its waits for the other rank kept apart
            assert len(m["info"]["overhead_s_by_rank"]) == 2 and min(m["info"]["overhead_s_by_rank"]) > 0
            assert len(m["info"]["wait_s_by_rank"]) == 2 and min(m["info"]["wait_s_by_rank"]) >= 0
    if any(by_name[n]["ok"] for n in ("fsmoe_sequential", "fsmoe_tutel", "fsmoe")):
        assert "backend compile overhead (the slowest rank's passes" in out


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_bench_runs_torchtitans_moe_layer_expert_parallel_and_dropless(tmp_path, capsys):
    """--model torchtitan: torchtitan's own layer, its experts sharded over the 2 ranks; fsmoe compiles it,
    finds its region in both graphs and gives eager's first loss."""
    pytest.importorskip("torchtitan")
    data = _run_json(tmp_path, TINY + ["--model", "torchtitan", "--methods", "eager,fsmoe", "--shared-expert",
                                       "--grad-sync", "graph"])
    out = capsys.readouterr().out
    assert data["config"]["dispatch"] == "dropless" and "top-2 (dropless) + shared expert" in out
    eager, fs = data["methods"]
    assert eager["ok"] and fs["ok"], (eager["error"], fs["error"])
    assert fs["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-4)
    for kind in ("forward", "backward"):
        assert fs["info"]["fsmoe"][kind]["degrees"], fs["info"]["fsmoe"][kind]  # one MoE layer found, scheduled


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_runs_plain_torch_compile_as_the_inductor_peer(tmp_path):
    """``inductor``: ``torch.compile(model)`` with Inductor's C++ kernels on CPU; its first loss is eager's (fused
    kernels round differently, within the bench's 1e-4 check) and its steps are timed like the others."""
    data = _run_json(tmp_path, TINY + ["--methods", "eager,inductor"])
    eager, ind = data["methods"]
    assert ind["name"] == "inductor" and ind["ok"], ind["error"]
    assert ind["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-4)
    assert len(ind["times_ms"]) == len(eager["times_ms"]) > 0 and min(ind["times_ms"]) > 0
    assert not [w for w in data["warnings"] if "inductor" in w], data["warnings"]


@pytest.mark.skipif(netns_unavailable_reason() is not None, reason=f"no emulated links: {netns_unavailable_reason()}")
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bench_runs_inside_namespaces_on_an_emulated_link(tmp_path):
    from fsmoe_compiler.bench.netns import list_namespaces

    mine = f"fsm{os.getpid()}"  # this process's links; another run's namespaces may come and go meanwhile
    data = _run_json(tmp_path, TINY + ["--methods", "eager,pytorch_overlap", "--emulate-link", "200mbit"])
    assert data["link"]["mode"] == "emulated" and data["link"]["rate"] == "200mbit"
    # all-to-all bandwidth measured by the ranks: gloo gets ~50-95 % of the shaped rate (see netns._tune_tcp)
    assert 60 < data["link"]["measured_mbit_s"] < 260
    assert all(m["ok"] for m in data["methods"])
    assert list_namespaces(mine) == []  # nothing left behind


@pytest.mark.timeout(120)
def test_a_rank_that_dies_fails_the_run_quickly(monkeypatch):
    cfg = BenchConfig(methods=["eager"], layers=1, d_model=32, d_ff=64, batch=4, seq=16, steps=1, warmup=1,
                      timeout_s=100)
    monkeypatch.setenv("FSMOE_BENCH_TEST_CRASH_RANK", "1")
    with pytest.raises(bench_runner.BenchError, match="rank 1"):
        bench_runner.run(cfg)


def test_add_bench_parser_mounts_the_subcommand():
    import argparse

    from fsmoe_compiler.bench.cli import add_bench_parser, run_bench

    parser = argparse.ArgumentParser(prog="fsmoe")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--ranks", "2", "--methods", "eager,fsmoe", "--emulate-link", "200mbit",
                              "--tokens", "256", "--threads", "1", "--json", "x.json"])
    assert args.func is run_bench and args.methods == "eager,fsmoe" and args.emulate_link == "200mbit"


def _children(pid: int) -> list[int]:
    import os

    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupting_the_bench_kills_its_ranks_and_removes_its_namespaces(sig):
    import signal
    import subprocess
    import sys
    import time

    from fsmoe_compiler.bench.netns import list_namespaces

    emulate = netns_unavailable_reason() is None
    argv = [sys.executable, "-m", "fsmoe_compiler.bench", *TINY[:-5], "--steps", "10000", "--warmup", "1",
            "--methods", "eager", "--timeout", "100"]
    if emulate:
        argv += ["--emulate-link", "1gbit"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        ranks: list[int] = []
        while time.monotonic() < deadline and len(ranks) < 2:
            time.sleep(0.5)
            ranks = _children(proc.pid)
        assert len(ranks) == 2, "the ranks did not start"
        if emulate:
            assert len(list_namespaces(f"fsm{proc.pid}r")) == 2
        time.sleep(3)  # let them get going
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    time.sleep(0.5)
    assert [r for r in ranks if _alive(r)] == []
    assert list_namespaces(f"fsm{proc.pid}") == []


def test_a_failing_method_reports_its_root_cause_not_dynamos_wrapper():
    from fsmoe_compiler.bench.worker import describe_error

    try:
        try:
            raise ValueError("unknown fsmoe option 'scheduler'; valid options are: strict\nmore")
        except ValueError as inner:
            raise RuntimeError("backend='fsmoe' raised:\nValueError: ...") from inner
    except RuntimeError as exc:
        assert describe_error(exc) == "ValueError: unknown fsmoe option 'scheduler'; valid options are: strict"

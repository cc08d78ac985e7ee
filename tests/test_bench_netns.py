"""Emulated links for ``fsmoe bench``: namespaces always removed, and tbf really limits the rate.

Needs root and iproute2 (``ip``, ``tc``); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fsmoe_compiler.bench.netns import (
    LinkEmulation,
    NetnsError,
    list_namespaces,
    measure_transfer,
    netns_unavailable_reason,
    parse_rate,
    tbf_params,
)

REASON = netns_unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"emulated links unavailable: {REASON}")


def _mine(tag: str) -> list[str]:
    return list_namespaces(f"fsm{tag}")


def test_parse_rate_accepts_tc_units_and_names_the_forms_on_bad_input():
    assert parse_rate("200mbit") == 200_000_000
    assert parse_rate("1gbit") == 1_000_000_000
    assert parse_rate("1.5Mbit") == 1_500_000
    assert parse_rate("10mbps") == 80_000_000  # tc: bps = bytes per second
    assert parse_rate("64000") == 64000
    for bad in ("fast", "12parsecs", "", "-5mbit", "mbit"):
        with pytest.raises(ValueError, match=r"bad link rate .*e\.g\. 200mbit"):
            parse_rate(bad)
    with pytest.raises(ValueError, match="below 8 kbit"):
        parse_rate("10bit")


def test_tbf_bucket_holds_a_gso_segment_and_grows_with_the_rate():
    rate, burst, latency = tbf_params(parse_rate("100mbit"))
    assert rate == "100000000bit" and burst == f"{64 * 1024}b" and latency == "200ms"
    assert int(tbf_params(parse_rate("10gbit"))[1][:-1]) == 5_000_000


def test_one_rank_is_not_a_link():
    with pytest.raises(ValueError, match=">= 2 ranks"):
        LinkEmulation(1, "1gbit")


def test_a_node_layout_must_divide_the_ranks_into_two_or_more_nodes():
    with pytest.raises(ValueError, match="positive divisor of the 4 ranks, got 3"):
        LinkEmulation(4, "1gbit", ranks_per_node=3)
    with pytest.raises(ValueError, match="joins >= 2 nodes: 4 ranks at 4 per node make 1"):
        LinkEmulation(4, "1gbit", ranks_per_node=4)
    with pytest.raises(ValueError, match=r"intra-node rate \(10gbit\) needs nodes of >= 2 ranks"):
        LinkEmulation(4, "1gbit", intra_rate="10gbit")
    with pytest.raises(ValueError, match="bad link rate"):
        LinkEmulation(4, "1gbit", ranks_per_node=2, intra_rate="fast")
    link = LinkEmulation(4, "1gbit", tag="x", ranks_per_node=2)
    assert [link.rank_ns(r) for r in range(4)] == ["fsmxn0", "fsmxn0", "fsmxn1", "fsmxn1"] and link.nodes == 2


@needs_netns
@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3])
def test_namespaces_exist_inside_and_are_gone_after(world):
    tag = f"{os.getpid()}t{world}"
    with LinkEmulation(world, "1gbit", tag=tag) as link:
        names = _mine(tag)
        assert sorted(link.namespaces) == sorted(n for n in names if not n.endswith("br"))
        assert len(names) == world + (1 if world > 2 else 0)  # N ranks: plus the bridge namespace
        assert "tbf" in link.qdiscs() and "rate 1Gbit" in link.qdiscs()
    assert _mine(tag) == []


@needs_netns
@pytest.mark.timeout(60)
def test_namespaces_are_removed_when_the_body_raises():
    tag = f"{os.getpid()}x"
    with pytest.raises(RuntimeError, match="boom"):
        with LinkEmulation(2, "100mbit", tag=tag):
            assert len(_mine(tag)) == 2
            raise RuntimeError("boom")
    assert _mine(tag) == []


@needs_netns
@pytest.mark.timeout(60)
def test_a_failed_setup_removes_what_it_made(monkeypatch):
    tag = f"{os.getpid()}f"
    link = LinkEmulation(2, "100mbit", tag=tag)

    def broken_shape(ns, dev):
        raise NetnsError("tc exploded")

    monkeypatch.setattr(link, "_shape", broken_shape)
    with pytest.raises(NetnsError, match="tc exploded"):
        with link:
            pass
    assert _mine(tag) == []


@needs_netns
@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_namespaces_are_removed_on_sigterm_and_ctrl_c(sig):
    tag = f"{os.getpid()}s{int(sig)}"
    code = textwrap.dedent(f"""
        import time
        from fsmoe_compiler.bench.netns import LinkEmulation
        with LinkEmulation(2, "100mbit", tag="{tag}"):
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        assert len(_mine(tag)) == 2
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert _mine(tag) == []


@needs_netns
@pytest.mark.timeout(60)
def test_tbf_limits_a_bulk_transfer_between_namespaces():
    # 8 MB at 100 mbit/s: 0.67 s on the wire; loopback would take milliseconds
    with LinkEmulation(2, "100mbit", tag=f"{os.getpid()}b") as link:
        t = measure_transfer(link, 8_000_000)
        t_back = measure_transfer(link, 8_000_000, src=1, dst=0)
    assert 0.6 <= t <= 3.0, t
    assert 0.6 <= t_back <= 3.0, t_back


@needs_netns
@pytest.mark.timeout(60)
def test_bridge_links_every_pair_of_ranks_at_the_rate():
    with LinkEmulation(3, "100mbit", tag=f"{os.getpid()}g") as link:
        t = measure_transfer(link, 4_000_000, src=2, dst=0)
    assert 0.3 <= t <= 2.0, t


@needs_netns
@pytest.mark.timeout(90)
def test_two_nodes_of_two_ranks_talk_fast_inside_a_node_and_at_the_rate_between_nodes():
    tag = f"{os.getpid()}n"
    with LinkEmulation(4, "50mbit", tag=tag, ranks_per_node=2, intra_rate="800mbit") as link:
        assert sorted(_mine(tag)) == sorted(link.namespaces) == [f"fsm{tag}n0", f"fsm{tag}n1"]
        assert link.addresses == ["10.66.0.1", "10.66.0.1", "10.66.0.2", "10.66.0.2"]
        assert link.exec_prefix(1) == link.exec_prefix(0) != link.exec_prefix(2)
        assert "lo: qdisc tbf" in link.qdiscs() and "rate 800Mbit" in link.qdiscs()
        inter = measure_transfer(link, 3_000_000, src=1, dst=2)  # 3 MB at 50 mbit/s: 0.48 s
        intra = measure_transfer(link, 3_000_000, src=2, dst=3)  # the same inside node 1 at 800 mbit/s: 30 ms
    assert 0.4 <= inter <= 2.5, inter
    assert intra <= inter / 4, (intra, inter)
    assert _mine(tag) == []


@needs_netns
@pytest.mark.timeout(60)
def test_faster_rate_is_faster():
    with LinkEmulation(2, "1gbit", tag=f"{os.getpid()}q") as link:
        t = measure_transfer(link, 8_000_000)
    assert 0.055 <= t <= 0.5, t  # 8 MB at 1 gbit/s: 64 ms


def test_unavailable_reason_names_root_and_iproute2(monkeypatch):
    import fsmoe_compiler.bench.netns as netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "not running as root" in netns.netns_unavailable_reason()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    assert netns.netns_unavailable_reason() == "ip and tc not found (install iproute2)"
    with pytest.raises(NetnsError, match="cannot emulate a link: ip and tc not found"):
        LinkEmulation(2, "1gbit").setup()

"""Emulated links: each rank in its own Linux network namespace, joined by veth links shaped with ``tc tbf``.

Why: on one machine, gloo ranks talk over loopback at memory speed, so
communication is nearly free and no schedule can show what overlap buys. Real
packets through a rate-limited veth take real wall time (the kernel paces
them) without spinning a compute core, which is what a slow network does.

Layout (names carry the launcher's pid, so parallel runs never collide):

* 2 ranks: namespaces ``fsm<pid>r0`` and ``fsm<pid>r1`` joined by one veth pair
  (``eth0`` in each), addresses 10.66.0.1 and 10.66.0.2.
* N ranks: one more namespace ``fsm<pid>br`` holding a bridge ``br0``; rank r's
  ``eth0`` is paired with ``p<r>`` on the bridge.
* Nodes of several ranks (``ranks_per_node``): one namespace per node,
  ``fsm<pid>n<i>``, joined as above node to node; the ranks of a node share
  its namespace and address, so their traffic stays on the node's loopback,
  shaped to ``intra_rate`` when one is given (a fast intra-node link beside
  the slow inter-node one; two "nodes" of two ranks on one machine).

Every veth end is shaped on egress with ``tbf rate RATE``, so each node's
upload and download are each limited to RATE (a full-duplex link per node).
Namespaces are deleted (which deletes their veths and qdiscs) on leaving the
context, at interpreter exit, and on SIGINT/SIGTERM. Needs root and the
``ip``/``tc`` tools of iproute2; :func:`netns_unavailable_reason` says why not.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

NS_PREFIX = "fsm"
SUBNET = "10.66.0"
TCP_BUFFERS = "4096 8388608 16777216"  # min, default, max bytes of each TCP socket buffer in the namespaces

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?\s*$", re.IGNORECASE)
_BITS_PER_UNIT = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 8,  # tc's "bps" means bytes per second
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}

# every namespace this process created and has not deleted yet (for atexit / signals)
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()


class NetnsError(RuntimeError):
    """Creating or configuring the emulated link failed (the partial setup is removed)."""


def parse_rate(rate: str) -> int:
    """``"200mbit"``, ``"1gbit"``, ``"500kbit"``, ``"10mbps"`` (bytes/s, tc's meaning) -> bits per second.

    A bare number is bits per second. ValueError names the accepted forms.
    """
    m = _RATE_RE.match(str(rate))
    if not m:
        raise ValueError(
            f"bad link rate {rate!r}; use a number with a unit, e.g. 200mbit, 1gbit, 500kbit "
            f"(units: {', '.join(_BITS_PER_UNIT)}; bps = bytes/s as in tc)"
        )
    bits = float(m.group(1)) * _BITS_PER_UNIT[(m.group(2) or "bit").lower()]
    if bits < 8000:
        raise ValueError(f"link rate {rate!r} is below 8 kbit/s; give a usable rate, e.g. 200mbit")
    return int(bits)


@dataclass(frozen=True)
class LinkSpec:
    """What ``--emulate-link`` asks for: the rate between nodes and, for nodes of several ranks, within one."""

    inter: str
    intra: str | None = None


def parse_link_spec(text: str) -> LinkSpec:
    """``RATE`` or ``inter=RATE[,intra=RATE]`` (e.g. ``300mbit``, ``inter=300mbit,intra=2gbit``); ValueError
    naming the forms otherwise. The rates are checked by :func:`parse_rate`."""
    forms = "RATE or inter=RATE[,intra=RATE] (e.g. 300mbit, inter=300mbit,intra=2gbit)"
    if "=" not in text:
        parse_rate(text)
        return LinkSpec(text.strip())
    parts: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("inter", "intra") or key in parts:
            raise ValueError(f"bad --emulate-link {text!r} at {item!r}; the forms: {forms}")
        parse_rate(value)
        parts[key] = value.strip()
    if "inter" not in parts:
        raise ValueError(f"bad --emulate-link {text!r}: no inter=RATE; the forms: {forms}")
    return LinkSpec(parts["inter"], parts.get("intra"))


def netns_unavailable_reason() -> str | None:
    """None when network namespaces can be made here; else why not (not root, no ``ip``/``tc``)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root (network namespaces and tc need root)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    return None


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def delete_namespace(name: str) -> None:
    """Delete namespace ``name`` (its veths and qdiscs go with it); quiet if it is already gone."""
    if shutil.which("ip") is None:
        return
    _run(["ip", "netns", "del", name], check=False)
    with _LIVE_LOCK:
        _LIVE.discard(name)


def list_namespaces(prefix: str = NS_PREFIX) -> list[str]:
    """Names of the existing network namespaces that start with ``prefix`` ([] without ``ip``)."""
    if shutil.which("ip") is None:
        return []
    res = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        names = sorted(_LIVE)
    for name in names:
        delete_namespace(name)


atexit.register(_cleanup_all)


def tbf_params(rate_bps: int) -> tuple[str, str, str]:
    """``(rate, burst, latency)`` arguments for ``tc qdisc ... tbf``.

    burst: at least one 64 KiB GSO segment and 4 ms of traffic (the bucket
    must hold a whole packet, and a too-small bucket caps throughput below
    RATE at the kernel's timer granularity); latency 200 ms of queue so TCP
    is paced by the bucket instead of by drops.
    """
    burst = max(64 * 1024, int(rate_bps / 8 * 0.004))
    return f"{rate_bps}bit", f"{burst}b", "200ms"


@dataclass
class LinkEmulation:
    """One namespace per node joined by RATE-shaped veth links; use as a context manager.

    A node is one rank unless ``ranks_per_node`` says more (it must divide
    ``world_size``, leaving at least 2 nodes); ``intra_rate`` shapes the
    loopback inside each node. ``addresses[r]``: rank r's IPv4 address (its
    node's); ``exec_prefix(r)``: the argv prefix that runs a command inside
    rank r's namespace; ``ifname``: the interface name inside every node
    namespace (for ``GLOO_SOCKET_IFNAME``).
    """

    world_size: int
    rate: str
    tag: str = field(default_factory=lambda: str(os.getpid()))
    namespaces: list[str] = field(default_factory=list)
    bridge_ns: str | None = None
    addresses: list[str] = field(default_factory=list)
    ifname: str = "eth0"
    notes: list[str] = field(default_factory=list)
    ranks_per_node: int = 1
    intra_rate: str | None = None
    _old_handlers: dict[int, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(f"an emulated link needs >= 2 ranks, got {self.world_size}")
        if self.world_size > 250:
            raise ValueError(f"at most 250 ranks on an emulated link, got {self.world_size}")
        per = self.ranks_per_node
        if isinstance(per, bool) or not isinstance(per, int) or per < 1 or self.world_size % per:
            raise ValueError(f"ranks per node must be a positive divisor of the {self.world_size} ranks, got {per!r}")
        if self.world_size // per < 2:
            raise ValueError(f"an emulated link joins >= 2 nodes: {self.world_size} ranks at {per} per node make "
                             f"{self.world_size // per}")
        if self.intra_rate is not None and per < 2:
            raise ValueError(f"an intra-node rate ({self.intra_rate}) needs nodes of >= 2 ranks; ranks per node: {per}")
        self.rate_bps = parse_rate(self.rate)
        self.intra_bps = parse_rate(self.intra_rate) if self.intra_rate is not None else None

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    # -- names -------------------------------------------------------------------------------
    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def rank_ns(self, rank: int) -> str:
        """The namespace rank ``rank`` runs in (its node's)."""
        if self.ranks_per_node == 1:
            return f"{NS_PREFIX}{self.tag}r{rank}"
        return f"{NS_PREFIX}{self.tag}n{self.node_of(rank)}"

    def exec_prefix(self, rank: int) -> list[str]:
        """argv prefix running a command in rank ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[self.node_of(rank)]]

    # -- setup / teardown --------------------------------------------------------------------
    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        with _LIVE_LOCK:
            _LIVE.add(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _shape(self, ns: str, dev: str, rate_bps: int | None = None) -> None:
        rate, burst, latency = tbf_params(self.rate_bps if rate_bps is None else rate_bps)
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
              "rate", rate, "burst", burst, "latency", latency])

    def _tune_tcp(self, ns: str) -> None:
        """Large TCP buffers in the namespace (per-netns sysctls), so the kernel keeps the link busy while
        a rank is off the CPU on this shared 2-core machine. Measured: a raw TCP stream gets ~96 % of RATE
        in each direction at once; gloo's all-to-all gets between ~50 % and ~95 % of RATE per call
        (bimodal, the same with htb instead of tbf); the bench reports the rate its ranks measured."""
        for key in ("tcp_rmem", "tcp_wmem"):
            res = _run(["ip", "netns", "exec", ns, "sh", "-c", f"echo '{TCP_BUFFERS}' > /proc/sys/net/ipv4/{key}"],
                       check=False)
            if res.returncode != 0:
                self.notes.append(f"could not set {key} in {ns}: {res.stderr.strip()}")

    def setup(self) -> "LinkEmulation":
        """Create namespaces, veths, addresses and qdiscs; on any failure remove what was made and raise."""
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsError(f"cannot emulate a link: {reason}")
        try:
            firsts = range(0, self.world_size, self.ranks_per_node)  # each node's first rank names its namespace
            for r in firsts:
                self._add_ns(self.rank_ns(r))
                self.namespaces.append(self.rank_ns(r))
                if self.intra_bps is not None:
                    self._shape(self.rank_ns(r), "lo", self.intra_bps)  # rank to rank inside the node
            self.addresses = [f"{SUBNET}.{self.node_of(r) + 1}" for r in range(self.world_size)]
            if self.nodes == 2:
                a, b = self.namespaces
                _run(["ip", "-n", a, "link", "add", self.ifname, "type", "veth",
                      "peer", "name", self.ifname, "netns", b])
                for ns in (a, b):
                    self._shape(ns, self.ifname)
            else:
                self.bridge_ns = f"{NS_PREFIX}{self.tag}br"
                self._add_ns(self.bridge_ns)
                br = self.bridge_ns
                _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
                _run(["ip", "-n", br, "link", "set", "br0", "up"])
                for r, ns in enumerate(self.namespaces):
                    port = f"p{r}"
                    _run(["ip", "-n", ns, "link", "add", self.ifname, "type", "veth",
                          "peer", "name", port, "netns", br])
                    _run(["ip", "-n", br, "link", "set", port, "master", "br0"])
                    _run(["ip", "-n", br, "link", "set", port, "up"])
                    self._shape(ns, self.ifname)  # rank's upload
                    self._shape(br, port)  # rank's download
            for ns, addr in zip(self.namespaces, [self.addresses[r] for r in firsts]):
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", self.ifname])
                _run(["ip", "-n", ns, "link", "set", self.ifname, "up"])
                self._tune_tcp(ns)
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Delete every namespace of this emulation (veths and qdiscs go with them). Idempotent."""
        for ns in list(self.namespaces) + ([self.bridge_ns] if self.bridge_ns else []):
            delete_namespace(ns)
        self.namespaces = []
        self.bridge_ns = None

    def qdiscs(self) -> str:
        """``tc -s qdisc`` of every rank's interface (for reports and tests)."""
        out = []
        devs = [self.ifname] + (["lo"] if self.intra_bps is not None else [])
        for ns in self.namespaces:
            for dev in devs:
                out.append(f"{ns} {dev}: " + _run(["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show",
                                                   "dev", dev], check=False).stdout.strip())
        return "\n".join(out)

    # -- context manager with signal safety -------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.teardown()
        old = self._old_handlers.get(signum)
        if callable(old):
            old(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)

    def __enter__(self) -> "LinkEmulation":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        try:
            return self.setup()
        except BaseException:
            self._restore_handlers()
            raise

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()

    def __exit__(self, *exc: object) -> None:
        try:
            self.teardown()
        finally:
            self._restore_handlers()


def measure_transfer(link: LinkEmulation, nbytes: int, src: int = 0, dst: int = 1,
                     timeout_s: float = 60.0, python: str | None = None, port: int = 29411) -> float:
    """Seconds to send ``nbytes`` over TCP from rank ``src``'s namespace to rank ``dst``'s (after connect).

    A tiny receiver in ``dst`` listens; a sender in ``src`` connects, starts the
    clock, sends, and stops when the receiver acknowledges the last byte.
    """
    import sys

    py = python or sys.executable
    recv_code = (
        "import socket,sys\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('0.0.0.0',{port}));s.listen(1);print('ready',flush=True)\n"
        "c,_=s.accept();n=0\n"
        f"while n<{nbytes}:\n"
        "    b=c.recv(1<<20)\n"
        "    if not b: break\n"
        "    n+=len(b)\n"
        "c.sendall(b'k');c.close()\n"
    )
    send_code = (
        "import socket,time\n"
        f"c=socket.create_connection(('{link.addresses[dst]}',{port}),timeout={timeout_s})\n"
        f"buf=b'x'*{nbytes};t=time.perf_counter();c.sendall(buf);c.recv(1)\n"
        "print(time.perf_counter()-t)\n"
    )
    recv = subprocess.Popen(link.exec_prefix(dst) + [py, "-c", recv_code], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        if recv.stdout.readline().strip() != "ready":
            raise NetnsError("transfer receiver did not start")
        res = subprocess.run(link.exec_prefix(src) + [py, "-c", send_code], capture_output=True, text=True,
                             timeout=timeout_s)
        if res.returncode != 0:
            raise NetnsError(f"transfer sender failed: {res.stderr.strip()}")
        return float(res.stdout.strip())
    finally:
        recv.kill()
        recv.wait(timeout=5)


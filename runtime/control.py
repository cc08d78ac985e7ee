"""Control-plane agreement between ranks over the process group's key-value store, not its collectives.

The backend has to agree with the other ranks at moments the model does not
choose: while Dynamo compiles, when a graph is about to run something other
than what was traced (a chunked variant, a scheduled graph), and while it
plans. A gloo collective issued from inside a graph compiler could hang the
job (observed here: both ranks in the same ``all_gather_object`` under
compilation, about once in forty compiles), and every extra collective shifts
the sequence numbers the model's own collectives are matched by. The store
(TCPStore for ``env://``) is a separate channel.

Dynamo may compile a different sequence of graphs on each rank (a
data-dependent recompile, a graph break on one rank only), so nothing here is
numbered by a per-process call counter: every agreement is keyed by what it
is about, chosen by the caller (a graph's digest and phase; a program point
and the how-many-th time it runs), and every wait is bounded by what the
other ranks are seen doing:

* **Liveness.** Each rank that takes part runs a daemon thread that bumps a
  heartbeat counter in the store every ``BEAT_S`` seconds, and announces what
  it is doing (compiling which graph, waiting at which agreement, running which
  call, outside fsmoe, failed) before it does it. A rank whose heartbeat
  stops for ``DEAD_S`` seconds is dead: whoever waits for it raises
  :class:`RankGone` naming it and its last announced activity. A rank that
  raised in fsmoe announces it, so the others fail at once with its error.
* :func:`meet`: every rank posts a value under a key and waits for all the
  others'; for decisions every rank must make (planning inside a call all
  ranks agreed to run). A peer that is seen waiting somewhere it needs this
  rank, running a call this rank is not in, or away longer than
  ``ABSENT_S`` is a real disagreement: :class:`ExchangeTimeout` at once, naming
  it and what it is doing instead, announced as ``failed`` so that rank, waiting
  for this one elsewhere, stops at once too.
* :func:`vote`: every rank posts a ballot for one instance of a decision it
  can also decline (run a transformed graph for this call, or play safe). A
  rank that is not coming (same tests as above) is *abandoned*: its ballot key
  is atomically marked (``compare_set``), so a late arrival learns the
  outcome, and every rank reaches the same verdict from the same final keys.
  Abandoning costs nothing but the optimisation: the caller then runs the
  graph as traced, which issues the collectives in program order like every
  other rank's traced or eager code. A rank that stops voting on a series
  says so (:func:`leave`): the others abandon its later instances at once.

It is the one channel for everything the ranks must agree on: regions at
compile, every call's vote, the profile cache's hit, message sizes and the
cost models themselves (``profiler.agree``).
"""

from __future__ import annotations

import atexit
import pickle
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch.distributed as dist

_PREFIX = "fsmoe/control"
#: seconds between heartbeats
BEAT_S = 1.0
#: a rank whose heartbeat has not moved for this long is dead
DEAD_S = 15.0
#: a rank seen outside fsmoe (eager code, data loading) this long while another waits for it is not coming
ABSENT_S = 10.0
#: how often a waiting rank looks at what the missing ranks are doing
POLL_S = 0.25

_waited = [0.0]  # seconds this process has spent blocked in agreements, waiting for the other ranks


def waited_s() -> float:
    """Seconds this process has spent so far waiting in :func:`meet` or :func:`vote`.

    Compile-overhead figures subtract it: a rank that reaches an agreement first
    waits there for the others' Dynamo tracing, which is not this backend's work
    (without the agreement it would wait at the model's first collective instead).
    """
    return _waited[0]


class OwnClock:
    """Wall time since it was made, split into this rank's own work and its waits for the other ranks."""

    def __init__(self) -> None:
        self._t0, self._w0 = time.perf_counter(), _waited[0]

    def waited(self) -> float:
        """Seconds spent waiting for the other ranks since the clock was made."""
        return _waited[0] - self._w0

    def own(self) -> float:
        """Seconds since the clock was made, less the waits."""
        return time.perf_counter() - self._t0 - self.waited()


class ExchangeTimeout(RuntimeError):
    """Some rank did not post its value for an agreement, and it is not coming."""


class RankGone(ExchangeTimeout):
    """A rank died (its heartbeat stopped) or failed inside fsmoe while others waited for it."""


@dataclass
class Verdict:
    """The outcome of one :func:`vote`: every ballot in rank order, or None where the vote was abandoned."""

    agreed: bool
    ballots: list[Any] | None
    reason: str = ""
    absent: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# the plane: this process's view of one process group's store


class _Plane:
    """The store, rank and world of the current default process group, the heartbeat thread and the
    announcements; one per process group (a new group, or :func:`reset`, makes a new one)."""

    def __init__(self) -> None:
        self.group = dist.group.WORLD
        self.store = dist.distributed_c10d._get_default_store()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.scratch: dict[str, Any] = {}
        self.state: tuple = ("outside", "", "")  # what this rank last announced
        self.seq = 0
        self.peers: dict[int, dict[str, Any]] = {}  # rank -> last beats seen and when they last moved
        self.pending: dict[str, list[tuple[int, str]]] = {}  # vote series -> own ballot keys to delete
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is not None:
            return
        try:
            store = self.store.clone()  # its own connection: the main thread may be blocked in a wait
        except Exception:  # noqa: BLE001 - stores without clone(): share the main thread's client
            store = self.store
        key = f"{_PREFIX}/beat/{self.rank}"

        def beat() -> None:
            while not self.stop.is_set():
                try:
                    store.add(key, 1)
                except Exception:  # noqa: BLE001 - the group is gone: nothing left to tell
                    return
                self.stop.wait(BEAT_S)

        self.thread = threading.Thread(target=beat, name="fsmoe-heartbeat", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        watcher = self.scratch.get("_watcher")
        if watcher is not None:
            with watcher.cond:
                watcher.cond.notify_all()
        for t in (self.thread, getattr(watcher, "thread", None)):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=2 * BEAT_S + 1)
        self.thread = None

    def announce(self, state: str, at: str = "", what: str = "") -> None:
        self.state = (state, at, what)
        self.seq += 1
        try:
            self.store.set(f"{_PREFIX}/state/{self.rank}", pickle.dumps((self.seq, state, at, what)))
        except Exception:  # noqa: BLE001 - announcing is best effort (the group may be going down)
            pass


_plane: list[_Plane | None] = [None]
_single_scratch: dict[str, Any] = {}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _current() -> _Plane | None:
    """The plane of the current default group (made and its heartbeat started on first use), or None alone."""
    if not _distributed():
        return None
    plane = _plane[0]
    if plane is None or plane.group is not dist.group.WORLD:
        if plane is not None:
            plane.close()
        plane = _plane[0] = _Plane()
        plane.start()
    return plane


def start() -> None:
    """Start this rank's heartbeat now (the backend calls it when it first compiles)."""
    _current()


def local(name: str, factory: Any) -> Any:
    """Process-local state that lives as long as the current process group (``factory()`` makes it)."""
    plane = _current()
    scratch = plane.scratch if plane is not None else _single_scratch
    if name not in scratch:
        scratch[name] = factory()
    return scratch[name]


def reset() -> None:
    """Forget the waited total, the liveness thread and every :func:`local` state.

    For a process that leaves its process group and joins a new one, whose
    store starts empty (the ranks of ``fsmoe_compiler.launch.RankPool`` do this
    between jobs).
    """
    _waited[0] = 0.0
    if _plane[0] is not None:
        _plane[0].close()
    _plane[0] = None
    _single_scratch.clear()


@atexit.register
def _at_exit() -> None:
    plane = _plane[0]
    if plane is not None:
        plane.announce("exited")
        plane.close()


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def announce(state: str, at: str = "", what: str = "") -> None:
    """Tell the other ranks what this rank does now: ``compiling``, ``call``, ``outside``, ``failed``...

    ``at`` names the agreement instance it belongs to (a call's vote instance),
    ``what`` says it in words for error messages.
    """
    plane = _current()
    if plane is not None:
        plane.announce(state, at, what)


@contextmanager
def doing(state: str, at: str = "", what: str = "", fail: bool = True) -> Iterator[None]:
    """Announce ``state`` for the duration of the block, then what was announced before.

    With ``fail``, an exception escaping the block is announced as ``failed``
    (with the error), so ranks waiting for this one stop at once instead of
    waiting for it; without, the state before is announced again.
    """
    plane = _current()
    if plane is None:
        yield
        return
    before = plane.state
    plane.announce(state, at, what)
    try:
        yield
    except BaseException as exc:
        if fail:
            plane.announce("failed", at, f"{what}: {type(exc).__name__}: {exc}"[:2000])
        else:
            plane.announce(*before)
        raise
    plane.announce(*before)


# ---------------------------------------------------------------------------------------------------
# waiting for the others


def _peer(plane: _Plane, r: int, store: Any = None) -> tuple[str, str, str, float | None]:
    """(state, at, what, seconds since its heartbeat last moved or None if never seen) of rank ``r``."""
    store = plane.store if store is None else store
    now = time.monotonic()
    try:
        beats = int(store.add(f"{_PREFIX}/beat/{r}", 0))
    except Exception:  # noqa: BLE001
        beats = 0
    seen = plane.peers.setdefault(r, {"beats": beats, "moved": now, "first": now})
    if beats != seen["beats"]:
        seen["beats"], seen["moved"] = beats, now
    quiet = (now - seen["moved"]) if beats > 0 else None
    state, at, what = "unknown", "", ""
    key = f"{_PREFIX}/state/{r}"
    try:
        if store.check([key]):
            seq, state, at, what = pickle.loads(store.get(key))
            if seen.get("seq") != seq:
                seen["seq"], seen["since"] = seq, now
    except Exception:  # noqa: BLE001
        pass
    if state == "unknown":
        seen.setdefault("since", seen["first"])
    return state, at, what, quiet


def _since(plane: _Plane, r: int) -> float:
    """Seconds this rank has seen rank ``r`` in its current announced state."""
    return time.monotonic() - plane.peers.get(r, {}).get("since", time.monotonic())


def _my_key_at(plane: _Plane, state: str, at: str, store: Any) -> bool:
    """Has this rank posted at the agreement instance ``at`` a peer is in (so the peer does not wait for it)?"""
    if state == "vote" or state == "call":
        key = f"{_PREFIX}/vote/{at}/{plane.rank}"
    elif state == "meet":
        key = f"{_PREFIX}/meet/{at}/{plane.rank}"
    else:
        return True
    try:
        return bool(store.check([key]))
    except Exception:  # noqa: BLE001
        return True


def _describe(r: int, state: str, at: str, what: str) -> str:
    text = {"compiling": "compiling", "call": "running", "call-alone": "running, without the other ranks,",
            "vote": "waiting to agree on", "meet": "waiting at",
            "outside": "outside fsmoe (eager code, data loading, or Dynamo tracing)", "failed": "failed",
            "exited": "exited", "unknown": "not yet seen by fsmoe (no state announced)"}.get(state, state)
    detail = what or at
    return f"rank {r} {text}" + (f" {detail}" if detail and state not in ("outside", "unknown") else "") + (
        f" (after {detail})" if detail and state == "outside" else "")


def _judge(plane: _Plane, r: int, absent_s: float, store: Any) -> tuple[str, str]:
    """Why rank ``r`` has not posted yet: ("dead" | "failed" | "elsewhere" | "absent" | "busy", description)."""
    state, at, what, quiet = _peer(plane, r, store)
    desc = _describe(r, state, at, what)
    if quiet is not None and quiet > DEAD_S:
        return "dead", f"rank {r} stopped responding (no heartbeat for {quiet:.0f} s); last seen: {desc}"
    if state == "exited":
        return "dead", f"rank {r} exited; last seen: {desc}"
    if state == "failed":
        return "failed", desc
    if state in ("vote", "meet", "call") and not _my_key_at(plane, state, at, store):
        return "elsewhere", desc  # it waits where it needs this rank, or runs something this rank is not in
    if state == "call-alone":
        return "elsewhere", desc
    if state in ("outside", "unknown") and _since(plane, r) > absent_s:
        return "absent", f"{desc} for {_since(plane, r):.0f} s"
    return "busy", desc


class _Watcher:
    """While the main thread blocks in ``store.wait`` (no polling, so it wakes the moment the last key is set),
    this thread looks at the missing ranks every ``POLL_S`` and, when one is not coming, writes a marker
    into its key (``compare_set``: only if it is still missing), which wakes the main thread."""

    def __init__(self, plane: _Plane) -> None:
        self.plane = plane
        try:
            self.store = plane.store.clone()
        except Exception:  # noqa: BLE001
            self.store = plane.store
        self.cond = threading.Condition()
        self.job: tuple[list[str], Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fsmoe-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.plane.stop.is_set():
            with self.cond:
                while self.job is None and not self.plane.stop.is_set():
                    self.cond.wait(timeout=1.0)
                job = self.job
                if job is None:
                    continue
                self.cond.wait(timeout=POLL_S)  # a poll, unless the main thread ends the job first
                if self.job is not job:
                    continue
            keys, decide = job
            try:
                missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
                for r in missing:
                    marker = decide(r)
                    if marker is not None:
                        self.store.compare_set(keys[r], "", pickle.dumps(marker))
            except Exception as exc:  # noqa: BLE001 - the group is going down; the main thread's wait says so
                self.error = exc

    @contextmanager
    def watching(self, keys: list[str], decide: Any) -> Iterator[None]:
        with self.cond:
            self.job = (keys, decide)
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.job = None
                self.cond.notify_all()


def _watcher(plane: _Plane) -> _Watcher:
    w = plane.scratch.get("_watcher")
    if w is None:
        w = plane.scratch["_watcher"] = _Watcher(plane)
    return w


def _store_timeout_s(plane: _Plane) -> float:
    try:
        return float(plane.store.timeout.total_seconds())
    except Exception:  # noqa: BLE001
        return 1800.0


def _gather(plane: _Plane, keys: list[str], label: str, decide: Any, timeout_s: float | None) -> list[Any]:
    """Every key's value (unpickled) once all exist; ``decide(r)`` (on the watcher thread) may mark a
    missing rank's key. Waits ``timeout_s`` at most (default: the store's timeout)."""
    store = plane.store
    t0 = time.perf_counter()
    try:
        if not store.check(keys):
            with _watcher(plane).watching(keys, decide):
                timeout = timedelta(seconds=timeout_s if timeout_s is not None else _store_timeout_s(plane))
                try:
                    store.wait(keys, timeout)
                except Exception as exc:  # noqa: BLE001 - the store raises RuntimeError/DistStoreError
                    missing = [r for r, k in enumerate(keys) if not store.check([k])]
                    states = "; ".join(_describe(r, *_peer(plane, r)[:3]) for r in missing)
                    raise ExchangeTimeout(f"{label}: rank(s) {missing} did not arrive in time "
                                          f"({type(exc).__name__}: {exc}; {states})") from exc
    finally:
        _waited[0] += time.perf_counter() - t0
    return [pickle.loads(v) for v in store.multi_get(keys)]


def meet(key: str, value: Any, *, timeout_s: float | None = None, what: str = "", strict: bool = True) -> list[Any]:
    """Every rank's ``value`` (picklable) for the agreement named ``key``, in rank order; ``[value]`` alone.

    ``key`` names what is agreed on and must be unique to it (e.g. a graph's
    digest, its planning epoch and the phase). Raises :class:`RankGone` if a
    missing rank is dead or failed, and :class:`ExchangeTimeout` if it is seen
    waiting or running elsewhere where it needs this rank, away for
    ``ABSENT_S``, or still missing after ``timeout_s`` (default: the store's).
    Without ``strict`` only a dead or failed rank ends the wait early.
    """
    plane = _current()
    if plane is None:
        return [value]
    base = f"{_PREFIX}/meet/{key}"
    keys = [f"{base}/{r}" for r in range(plane.world)]
    label = f"agreement {key!r}" + (f" ({what})" if what else "")
    mine = pickle.dumps(("value", value))
    got = plane.store.compare_set(keys[plane.rank], "", mine)
    if got != mine:
        _, verdict, by, desc = pickle.loads(got)
        _give_up(plane, key, ExchangeTimeout(f"{label}: rank {by} stopped waiting for this rank ({desc})"), strict)

    def decide(r: int) -> tuple | None:
        verdict, desc = _judge(plane, r, ABSENT_S, _watcher(plane).store)
        if verdict == "busy" or (not strict and verdict not in ("dead", "failed")):
            return None
        return ("missing", verdict, plane.rank, desc)

    try:
        with doing("meet", key, what, fail=False):
            values = _gather(plane, keys, label, decide, timeout_s)
    except ExchangeTimeout as exc:
        _give_up(plane, key, exc, strict)
    for r, v in enumerate(values):
        if v[0] == "missing":
            _, verdict, _, desc = v
            cls = RankGone if verdict in ("dead", "failed") else ExchangeTimeout
            hint = "" if cls is RankGone else "; the ranks disagree about what they compiled or run"
            _give_up(plane, key, cls(f"{label}: rank(s) [{r}] did not arrive: {desc}{hint}"), strict)
    return [v[1] for v in values]


def _give_up(plane: _Plane, key: str, exc: ExchangeTimeout, announce: bool) -> None:
    """Raise ``exc`` from a meet; a strict one (every rank needed it) is announced as ``failed`` first, so a rank
    waiting for this one there (or anywhere) stops at once with this rank's reason instead of waiting
    ``ABSENT_S`` for it. A non-strict one's caller (a :func:`meet` with a timeout) may go on."""
    if announce:
        plane.announce("failed", key, f"{type(exc).__name__}: {exc}"[:2000])
    raise exc


def vote(series: str, n: int, ballot: Any, *, what: str = "", absent_s: float | None = None) -> Verdict:
    """Every rank's ``ballot`` for instance ``n`` of ``series``, or a verdict that the instance was abandoned.

    Each instance is decided once: a rank that is not coming (dead or failed:
    :class:`RankGone`; waiting or running somewhere it needs this rank, or away
    for ``absent_s``: abandoned) has its ballot key marked, atomically, so
    every rank, late arrivals included, reads the same final keys and reaches
    the same verdict. ``[ballot]`` agreed without torch.distributed.
    """
    plane = _current()
    if plane is None:
        return Verdict(True, [ballot])
    absent_s = ABSENT_S if absent_s is None else absent_s
    store = plane.store
    inst = f"{series}/{n}"
    keys = [f"{_PREFIX}/vote/{inst}/{r}" for r in range(plane.world)]
    label = what or inst
    mine = pickle.dumps(("ballot", ballot))
    got = store.compare_set(keys[plane.rank], "", mine)
    if got != mine:  # another rank found this one missing and marked its ballot: the instance is abandoned
        _, verdict, by, why = pickle.loads(got)
        return Verdict(False, None, reason=f"rank {by} went on without this rank ({why})", absent=[plane.rank])

    def decide(r: int) -> tuple | None:
        store = _watcher(plane).store
        left = f"{_PREFIX}/left/{series}/{r}"
        if store.check([left]):  # it runs this series without the other ranks from some call on
            since, why = pickle.loads(store.get(left))
            if since <= n:
                return ("missing", "left", plane.rank, f"rank {r} runs these calls without the other ranks "
                        f"since call {since} ({why})")
        verdict, desc = _judge(plane, r, absent_s, store)
        return None if verdict == "busy" else ("missing", verdict, plane.rank, desc)

    with doing("vote", inst, what, fail=False):
        values = _gather(plane, keys, label, decide, None)
    gone = [(r, v[3]) for r, v in enumerate(values) if v[0] == "missing" and v[1] in ("dead", "failed")]
    if gone:
        raise RankGone(f"{label}: " + "; ".join(f"rank(s) [{r}] did not arrive: {d}" for r, d in gone))
    absent = [r for r, v in enumerate(values) if v[0] != "ballot"]
    if absent:
        reasons = "; ".join(str(values[r][3]) for r in absent)
        return Verdict(False, None, reason=f"rank(s) {absent} not here: {reasons}", absent=absent)
    _forget(plane, series, n, keys[plane.rank])
    return Verdict(True, [v[1] for v in values])


def leave(series: str, n: int, why: str) -> None:
    """This rank will not vote on ``series`` from instance ``n`` on (it runs those calls as traced, alone):
    a rank voting on such an instance abandons it at once instead of waiting to see this one away."""
    plane = _current()
    if plane is not None:
        plane.store.set(f"{_PREFIX}/left/{series}/{plane.rank}", pickle.dumps((n, why[:500])))


def _forget(plane: _Plane, series: str, n: int, key: str) -> None:
    """Delete this rank's ballot keys of ``series`` two instances back: every rank has read them by now
    (each posted at ``n``, which it does only after deciding ``n - 1``, which it read after ``n - 2``)."""
    pending = plane.pending.setdefault(series, [])
    pending.append((n, key))
    keep = []
    for m, k in pending:
        if m <= n - 2:
            try:
                plane.store.delete_key(k)
            except Exception:  # noqa: BLE001
                pass
        else:
            keep.append((m, k))
    plane.pending[series] = keep


def post(name: str, value: Any, first: bool = True) -> None:
    """Publish this rank's ``value`` under ``name`` without waiting for anyone (``first``: keep the first post)."""
    plane = _current()
    if plane is None:
        return
    key = f"{_PREFIX}/post/{name}/{plane.rank}"
    data = pickle.dumps(value)
    if first:
        plane.store.compare_set(key, "", data)
    else:
        plane.store.set(key, data)


def posted(name: str) -> dict[int, Any]:
    """The values the other ranks have published under ``name`` so far (rank -> value); never waits."""
    plane = _current()
    if plane is None:
        return {}
    out = {}
    for r in range(plane.world):
        key = f"{_PREFIX}/post/{name}/{r}"
        if r != plane.rank and plane.store.check([key]):
            out[r] = pickle.loads(plane.store.get(key))
    return out


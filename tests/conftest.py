"""Fixtures shared by the test modules.

Helper modules beside this file (imported by name; the directory is on
``sys.path`` under pytest): ``graph_capture`` (capture aot_autograd's graphs;
``captured``, the session-wide capture cache that module-level helpers call;
the fake process group), ``graph_builder``
(hand-built FX graphs and cost tables), ``moe_cases`` (the router × dispatch
cases) and ``moe_styles`` (third-party-style MoE blocks).

``rank_pool`` is one pool of 2 gloo ranks for the whole session
(``fsmoe_compiler.launch.RankPool``): started once collection shows that a
selected test uses it (its ranks import torch while the first tests run),
each job in a fresh process group with the process state reset. Tests that
kill, hang or crash ranks, or need another world size or environment, use
``run_ranks`` (fresh processes) instead.
"""

from __future__ import annotations

import pytest

import graph_capture
from fsmoe_compiler.launch import RankPool

_POOL: list[RankPool] = []  # the session's pool, once made


def _pool() -> RankPool:
    if not _POOL:
        _POOL.append(RankPool(2))
    return _POOL[0]


def pytest_collection_finish(session):
    """Start the ranks as soon as the selected tests are known to need them: they import torch meanwhile."""
    if session.config.option.collectonly:
        return
    if any("rank_pool" in getattr(item, "fixturenames", ()) for item in session.items):
        _pool().start()


def pytest_sessionfinish(session):
    if _POOL:
        _POOL[0].close()


@pytest.fixture(scope="session")
def rank_pool():
    """The session's 2 gloo ranks (1 thread each), reused by every multi-rank test that does not break ranks."""
    return _pool()


def pytest_terminal_summary(terminalreporter):
    """What the shared machinery saved: rank processes started and jobs run, graphs captured and reused."""
    stats = graph_capture.STATS
    parts = [f"graph captures {stats['captures']}, cache hits {stats['hits']}"]
    for pool in _POOL:
        parts.append(f"rank pool: {pool.started} processes started, {pool.jobs} jobs")
    terminalreporter.write_line("fsmoe tests: " + "; ".join(parts))

"""Fixtures shared by the test modules.

Helper modules beside this file (imported by name; the directory is on
``sys.path`` under pytest): ``graph_capture`` (capture aot_autograd's graphs,
the session's capture cache, the fake process group), ``graph_builder``
(hand-built FX graphs and cost tables), ``moe_cases`` (the router × dispatch
cases) and ``moe_styles`` (third-party-style MoE blocks).

``rank_pool`` is one pool of 2 gloo ranks for the whole session
(``fsmoe_compiler.launch.RankPool``): started by the first test that uses it,
each job in a fresh process group with the process state reset. Tests that
kill, hang or crash ranks, or need another world size or environment, use
``run_ranks`` (fresh processes) instead.
"""

from __future__ import annotations

import pytest

import graph_capture
from fsmoe_compiler.launch import RankPool

_POOLS: list[RankPool] = []


@pytest.fixture(scope="session")
def rank_pool():
    """The session's 2 gloo ranks (1 thread each), reused by every multi-rank test that does not break ranks."""
    pool = RankPool(2)
    _POOLS.append(pool)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def captured():
    """``graph_capture.captured``: the session-wide cache of aot_autograd graphs (shared: do not change them)."""
    return graph_capture.captured


def pytest_terminal_summary(terminalreporter):
    """What the shared machinery saved: rank processes started and jobs run, graphs captured and reused."""
    stats = graph_capture.STATS
    parts = [f"graph captures {stats['captures']}, cache hits {stats['hits']}"]
    for pool in _POOLS:
        parts.append(f"rank pool: {pool.started} processes started, {pool.jobs} jobs")
    terminalreporter.write_line("fsmoe tests: " + "; ".join(parts))

"""Fixtures shared by the test modules.

``rank_pool`` is one pool of 2 gloo ranks for the whole session
(``fsmoe_compiler.launch.RankPool``): started by the first test that uses it,
each job in a fresh process group with the process state reset. Tests that
kill, hang or crash ranks, or need another world size or environment, use
``run_ranks`` (fresh processes) instead.
"""

from __future__ import annotations

import pytest

from fsmoe_compiler.launch import RankPool

_POOLS: list[RankPool] = []


@pytest.fixture(scope="session")
def rank_pool():
    """The session's 2 gloo ranks (1 thread each), reused by every multi-rank test that does not break ranks."""
    pool = RankPool(2)
    _POOLS.append(pool)
    yield pool
    pool.close()


def pytest_terminal_summary(terminalreporter):
    """How many rank processes the session started, for how many jobs."""
    for pool in _POOLS:
        terminalreporter.write_line(f"fsmoe tests: rank pool: {pool.started} processes started, {pool.jobs} jobs")

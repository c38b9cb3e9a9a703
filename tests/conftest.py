"""Shared fixtures: the real stack on ephemeral loopback ports, real MQTT clients, simulated locks.

In CI (LATCH_REQUIRE_ALL set) a skipped test fails the run: nothing may
quietly not run because a dependency is missing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.dbs import TEST_DATABASE, drop_created, drop_template
from tests.support import REQUIRE_ALL, LiveStack, live_stack


def pytest_report_header(config: pytest.Config) -> str:
    return f"Latch state store for this run: {TEST_DATABASE} (LATCH_TEST_DATABASE)"


@pytest.fixture(autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """PostgreSQL databases made for a test are dropped after it (tests/dbs.py)."""
    yield
    drop_created()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    drop_template()
    if not REQUIRE_ALL:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        reporter.write_line(f"LATCH_REQUIRE_ALL: {skipped} test(s) skipped; skips are failures here", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LiveStack]:
    async with live_stack(tmp_path) as live:
        yield live

"""Shared fixtures: the real stack on ephemeral loopback ports, real MQTT clients, simulated locks.

In CI (LATCH_REQUIRE_ALL set) a skipped test fails the run: nothing may
quietly not run because a dependency is missing.

Under pytest-xdist (`./run test` passes `-n N --dist loadgroup`) the tests that load the machine most run one
at a time on one worker (GROUPS below), and the slow ones are handed out first, so that no worker is left
with a long test at the end. Every test is safe beside the others: ephemeral ports, its own tmp_path, its
own PostgreSQL database (tests/dbs.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.dbs import TEST_DATABASE, drop_created, drop_template
from tests.support import REQUIRE_ALL, LiveStack, live_stack


# nodeid prefix -> xdist group. "cpu": tests that keep both cores busy for seconds (fuzzing, a thousand
# connections, argon2 floods, kill -9 mid-stream) or that measure latency; "browser": Chromium + `latch serve`.
GROUPS: dict[str, str] = {
    "tests/fuzz/": "cpu",
    "tests/bench/test_chaos.py::test_a_short_chaos_run_keeps_every_promise": "cpu",
    "tests/device_sim/test_fleet.py::test_a_thousand_locks_come_online_and_answer": "cpu",
    "tests/api/test_longpoll.py::test_a_thousand_held_polls": "cpu",
    "tests/api/test_auth_limits.py::": "cpu",
    "tests/api/test_fleet.py::test_ten_thousand_devices_rollout": "cpu",
    "tests/broker/test_durability.py::test_kill_9_mid_stream": "cpu",
    "tests/firmware/test_fw_process.py::test_round_trip_latency": "cpu",
    "tests/pages/": "browser",
}
# Handed out after the groups and before everything else: modules whose tests take seconds each.
SLOW_FIRST = ("tests/firmware/", "tests/latch/", "tests/ops/", "tests/external/", "tests/broker/test_durability.py",
              "tests/api/test_group_commit.py", "tests/api/test_secrets.py", "tests/scale/", "tests/device_sim/")


def _xdist(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) or bool(os.environ.get("PYTEST_XDIST_WORKER"))


def _group(nodeid: str) -> str | None:
    return next((g for prefix, g in GROUPS.items() if nodeid.startswith(prefix)), None)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """--dist loadgroup with GROUPS: each group is one unit of work (one worker, one test at a time); every
    other test is a unit of its own. (xdist's own loadgroup reads xdist_group marks through item._nodeid,
    which pytest 9 no longer has: with pytest 9.2 and xdist 3.8 the marks group nothing.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid) or nodeid

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _xdist(config):
        return

    def rank(item: pytest.Item) -> int:
        group = _group(item.nodeid)
        if group is not None:
            return 0 if group == "cpu" else 1
        return 2 if item.nodeid.startswith(SLOW_FIRST) else 3

    items.sort(key=rank)   # stable: each rank keeps the collection order


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

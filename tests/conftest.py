"""Shared fixtures: the real stack on ephemeral loopback ports, real MQTT clients, simulated locks.

In CI (LATCH_REQUIRE_ALL set) a skipped test fails the run: nothing may
quietly not run because a dependency is missing.

Under pytest-xdist (`./run test` passes `-n N --dist loadgroup`) the tests that load the machine most run one
at a time on one worker (GROUPS below), and the slow ones are handed out first, so that no worker is left
with a long test at the end. Every test is safe beside the others: ephemeral ports, its own tmp_path, its
own PostgreSQL database (tests/dbs.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.dbs import TEST_DATABASE, drop_created, drop_template
from tests.support import REQUIRE_ALL, SECRETS, LiveStack, live_stack

# nodeid prefix -> xdist group: the tests of a group run one at a time, on one worker. "fuzz" and "cpu": tests
# that keep both cores busy for seconds (fuzzing; a thousand connections, argon2 floods, kill -9 mid-stream) or
# that measure latency; two groups, so that neither chain of tests is longer than a worker's share of the rest.
GROUPS: dict[str, str] = {
    "tests/fuzz/": "fuzz",
    "tests/bench/test_chaos.py::test_a_short_chaos_run_keeps_every_promise": "cpu",
    "tests/device_sim/test_fleet.py::test_a_thousand_locks_come_online_and_answer": "cpu",
    "tests/api/test_longpoll.py::test_a_thousand_held_polls": "cpu",
    "tests/api/test_auth_limits.py::": "cpu",
    "tests/api/test_fleet.py::test_ten_thousand_devices_rollout": "cpu",
    "tests/broker/test_durability.py::test_kill_9_mid_stream": "cpu",
    "tests/firmware/test_fw_process.py::test_round_trip_latency": "cpu",
}
# Handed out after the groups and before everything else: modules whose tests take seconds each (the browser
# tests first: Chromium and `latch serve` each, 5-45 s).
SLOW_FIRST = ("tests/pages/", "tests/firmware/", "tests/latch/", "tests/ops/", "tests/external/",
              "tests/broker/test_durability.py", "tests/api/test_group_commit.py", "tests/api/test_secrets.py",
              "tests/scale/", "tests/device_sim/")


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
        if _group(item.nodeid) is not None:
            return 0
        return 1 if item.nodeid.startswith(SLOW_FIRST) else 2

    items.sort(key=rank)   # stable: each rank keeps the collection order


def pytest_report_header(config: pytest.Config) -> str:
    return f"Latch state store for this run: {TEST_DATABASE} (LATCH_TEST_DATABASE)"


class _Records(logging.Handler):
    """Keeps the text of every log record (message and traceback) while a test runs."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:   # a record whose arguments do not format: its parts, then
            text = f"{record.msg} {record.args}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.texts.append(text)


@pytest.fixture(autouse=True)
def _no_secret_in_logs() -> Iterator[None]:
    """No log record of a test (Latch's loggers from INFO, every other from its level in force) holds a secret
    the test's stacks were given or handed out (tests/support.py SECRETS): tokens, device passwords, keys."""
    records, root, latch = _Records(), logging.getLogger(), logging.getLogger("latch")
    level = latch.level
    if latch.getEffectiveLevel() > logging.INFO:
        latch.setLevel(logging.INFO)
    root.addHandler(records)
    SECRETS.clear()
    try:
        yield
    finally:
        root.removeHandler(records)
        latch.setLevel(level)
    leaked = sorted({(secret[:6] + "...", text[:300]) for text in records.texts for secret in SECRETS
                     if secret in text})
    SECRETS.clear()
    assert not leaked, f"a secret in the log: {leaked}"


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

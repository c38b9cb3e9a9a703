"""Fixtures for the fuzz suite: one live stack per test, with an operator, a rider on a ride, and real ids.

Each test gets its own stack (tests/fuzz/live.py ThreadedStack): the operator's fuzzing deletes and
rotates devices, so the rider's run must not depend on what it left. The bike is called `fuzz-bike`,
not one of the schema's examples (`bike-0001`), so example-driven cases do not hit it by accident.

Deterministic enough for CI: Hypothesis runs derandomized (a fixed seed per test), without an example
database, with no deadline (a busy 2-core machine), and a bounded number of examples per operation
(FUZZ_MAX_EXAMPLES; raise it locally for a deeper run, e.g. LATCH_FUZZ_EXAMPLES=200).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.fuzz.live import RecordingLock, ThreadedStack
from tests.fuzz.report import FAILURES

BIKE = "fuzz-bike"
FUZZ_MAX_EXAMPLES = int(os.environ.get("LATCH_FUZZ_EXAMPLES", "20"))
# Shrinking a failure costs ~100-400 more requests per distinct bug; on a failing run that is minutes, past
# CI's budget. CI reports the smallest failing input it saw (tests/fuzz/report.py); LATCH_FUZZ_SHRINK=1
# shrinks each failure to a minimal one, for the developer fixing it.
FUZZ_SHRINK = os.environ.get("LATCH_FUZZ_SHRINK", "") not in ("", "0")

# Settings for every fuzz test: reproducible, no example database, no deadline.
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if FUZZ_SHRINK else [])],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)

# The stack's settings for fuzzing: the per-user command rate limit (tested in tests/api/test_ratelimit.py)
# would otherwise answer most of the rider's command cases with 429 before they reach the code under test.
STACK_OVERRIDES = dict(command_rate_per_s=10_000.0, command_burst=10_000)


@dataclass
class World:
    """A live stack with its actors and the ids of real resources (so cases reach past the 404s)."""
    ts: ThreadedStack
    admin_token: str
    rider_token: str
    rider_id: str
    ride_id: str
    lock: RecordingLock
    known: dict[str, list[str]] = field(default_factory=dict)   # path parameter name -> real ids


def _rider(url: str, email: str) -> tuple[str, str]:
    with httpx.Client(base_url=url, timeout=30) as anon:
        r = anon.post("/v1/auth/signup", json={"email": email, "password": "correct horse", "name": "Fuzz"})
        assert r.status_code == 201, r.text
        r = anon.post("/v1/auth/login", json={"email": email, "password": "correct horse"})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["access_token"], body["user"]["id"]


def build_world(ts: ThreadedStack) -> World:
    url = ts.url
    admin = ts.settings.admin_token or ""
    lock = ts.add_lock(BIKE)
    token, rider_id = _rider(url, "fuzz-rider@example.org")
    rider = {"Authorization": f"Bearer {token}"}
    op = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/rides", json={"bike_id": BIKE}, headers=rider)
        assert r.status_code == 201, r.text
        ride = r.json()
        unlock = http.get(f"/v1/commands/{ride['unlock_command_id']}", params={"wait": 10}, headers=rider).json()
        assert unlock["status"] == "succeeded", unlock
        locate = http.post(f"/v1/devices/{BIKE}/commands", params={"wait": 10}, json={"action": "locate"},
                           headers=rider)
        assert locate.status_code == 201, locate.text
        fleet = http.post("/v1/fleet/commands", json={"action": "locate", "target": {"devices": [BIKE]},
                                                      "rate_per_min": 600}, headers=op)
        assert fleet.status_code == 201, fleet.text
        # the rollout issues its command to the bike in the background: wait until it is done, or on a busy
        # machine that command is written during the first cases (and a refused case seems to write one)
        deadline = time.monotonic() + 60
        while http.get(f"/v1/fleet/commands/{fleet.json()['id']}", headers=op).json()["status"] == "running":
            assert time.monotonic() < deadline, "the world's fleet command still running after 60 s"
            time.sleep(0.05)
    known = {"device_id": [BIKE], "command_id": [ride["unlock_command_id"], locate.json()["id"]],
             "ride_id": [ride["id"]], "fleet_id": [fleet.json()["id"]], "user_id": [rider_id]}
    return World(ts, admin, token, rider_id, ride["id"], lock, known)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with ThreadedStack(tmp_path, **STACK_OVERRIDES) as ts:
        yield build_world(ts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fuzz failures, deduplicated, with the smallest input seen and the server's exception."""
    if FAILURES:
        terminalreporter.section("fuzz failures (deduplicated)")
        for line in FAILURES.lines():
            terminalreporter.write_line(line)

"""Fixtures for the differential broker-conformance suite.

* ``broker``: parametrized over every registered broker (``brokers.BROKERS``);
  yields ``(host, port)`` of a *fresh* broker for each test.  An unavailable
  broker is skipped, or fails the test when ``LATCH_REQUIRE_ALL`` is set.
* ``observe``: runs a scenario against the test's broker under an overall
  timeout and records the observation (printed in the report on failure;
  written as JSON lines to ``$LATCH_CONFORMANCE_REPORT`` if set).
* ``defect`` / ``not_applicable`` decorators (from ``known``) turn
  (test, broker[, variant]) into strict xfails / deselection at collection.
  Slow checks are deselected unless ``LATCH_CONFORMANCE_SLOW=1``.  Nothing
  here *skips* by design: with ``LATCH_REQUIRE_ALL`` the repo treats skips as
  failures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import pytest_asyncio

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import brokers  # noqa: E402
import scenarios  # noqa: E402

SCENARIO_TIMEOUT = 60.0
SLOW_SCENARIO_TIMEOUT = 200.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow_conformance: long-running conformance check, collected only "
                            "with LATCH_CONFORMANCE_SLOW=1")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker" in metafunc.fixturenames:
        metafunc.parametrize("broker", list(brokers.BROKERS), indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Apply known-defect xfails; *deselect* (not skip) non-applicable combos and, unless
    LATCH_CONFORMANCE_SLOW is set, slow checks -- the repo-wide LATCH_REQUIRE_ALL policy
    (tests/conftest.py) turns every skip into a failure, so by-design omissions must not be skips."""
    slow_enabled = bool(os.environ.get("LATCH_CONFORMANCE_SLOW"))
    require_all = "LATCH_REQUIRE_ALL" in os.environ
    missing = {name for name, spec in brokers.BROKERS.items() if require_all and spec.available()}
    kept: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "broker" not in callspec.params:
            kept.append(item)
            continue
        if item.get_closest_marker("slow_conformance") and not slow_enabled:
            deselected.append(item)
            continue
        broker = callspec.params["broker"]
        params = dict(callspec.params)
        fn = getattr(item, "function", None)
        applicable = True
        for entry in getattr(fn, "_known", ()):
            if broker not in entry.brokers or (entry.when is not None and not entry.when(params)):
                continue
            if entry.kind == "n/a":
                applicable = False
            elif broker not in missing:  # a required-but-missing broker must FAIL, not xfail
                item.add_marker(entry.mark())
        (kept if applicable else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


class Unavailable(str):
    """Stands in for (host, port) when a required broker is missing; the test body then FAILS."""


@pytest_asyncio.fixture
async def broker(request: pytest.FixtureRequest):
    spec = brokers.BROKERS[request.param]
    why_not = spec.available()
    if why_not:
        if "LATCH_REQUIRE_ALL" in os.environ:
            # fail in the call phase (a FAILED test, not a setup ERROR or a skip)
            yield Unavailable(f"broker {spec.name!r} unavailable and LATCH_REQUIRE_ALL is set: {why_not}")
            return
        pytest.skip(f"broker {spec.name!r} unavailable: {why_not}")
    async with spec.factory() as addr:
        yield addr


_REPORT = os.environ.get("LATCH_CONFORMANCE_REPORT")


@pytest.fixture
def observe(broker, request: pytest.FixtureRequest):
    """``await observe("scenario_name")`` -> observation dict for this test's broker."""
    broker_name = request.node.callspec.params["broker"]

    async def run(name: str, timeout: float = SCENARIO_TIMEOUT) -> dict:
        if isinstance(broker, Unavailable):
            pytest.fail(broker, pytrace=False)
        host, port = broker
        obs = await asyncio.wait_for(scenarios.SCENARIOS[name](host, port), timeout)
        text = json.dumps(obs, sort_keys=True, default=str)
        request.node.user_properties.append(("observation", f"{broker_name} {name}: {text}"))
        if _REPORT:
            with open(_REPORT, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"test": request.node.nodeid, "broker": broker_name, "scenario": name,
                                     "observation": obs}, default=str) + "\n")
        return obs

    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        for key, value in item.user_properties:
            if key == "observation":
                report.sections.append(("conformance observation", value))

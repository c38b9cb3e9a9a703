"""Helpers for tests: the live stack and its conveniences, polling with a deadline, require()."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_sim.lock import Behaviour, Credentials, SimulatedLock
from foundation.settings import Settings
from latch.stack import Stack

REQUIRE_ALL = bool(os.environ.get("LATCH_REQUIRE_ALL"))


# Secrets handed out during the current test (its stacks' tokens and keys, its devices' passwords and command
# keys): tests/conftest.py fails a test whose log records contain one of them (issue 17: no secret in a log).
SECRETS: set[str] = set()
SECRET_SETTINGS = ("admin_token", "service_secret", "jwt_secret", "command_key_secret", "broker_hook_secret",
                   "metrics_token")


def handed_out(*values: Any) -> None:
    SECRETS.update(v for v in values if isinstance(v, str) and len(v) >= 8)


def require(condition: bool, what: str) -> None:
    """Skip when `what` is missing locally; fail in CI."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required for this test and missing: {what}")
    pytest.skip(f"missing: {what}")


async def stop_process(proc: asyncio.subprocess.Process, deadline: float = 15.0) -> None:
    """SIGTERM, wait with a deadline, then SIGKILL (tests/conformance/brokers.py has its own copy,
    because those modules also run as plain scripts outside the `tests` package)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), deadline)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait_for(proc.wait(), deadline)


async def eventually(check: Callable[[], Awaitable[Any] | Any], timeout: float = 5.0,
                     interval: float = 0.01, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class LiveStack:
    """A started Stack plus the helpers tests use on it."""

    def __init__(self, stack: Stack, http: httpx.AsyncClient) -> None:
        self.stack = stack
        self.settings = stack.settings
        self.http = http
        self.api_url = stack.api_url
        self.admin_token = stack.settings.admin_token
        self.mqtt_host = stack.settings.host
        self.mqtt_port = stack.settings.mqtt_port
        self.locks: list[SimulatedLock] = []

    @property
    def runtime(self):  # type: ignore[no-untyped-def]
        return self.stack._server.config.app.state.runtime  # type: ignore[union-attr]

    async def register(self, device_id: str) -> dict:
        r = await self.http.post("/v1/devices", json={"id": device_id})
        assert r.status_code == 201, r.text
        handed_out(r.json().get("mqtt_password"), r.json().get("command_key"))
        return r.json()

    async def lock(self, device_id: str, behaviour: Behaviour | None = None, online: bool = True) -> SimulatedLock:
        """Register a device and run a simulated lock for it; waits until the API sees it online."""
        creds = Credentials.from_registration(await self.register(device_id))
        lock = SimulatedLock(creds, behaviour or Behaviour(actuation_delay_s=0.01))
        self.locks.append(lock)
        if online:
            await self.start_lock(lock)
        return lock

    async def start_lock(self, lock: SimulatedLock) -> None:
        await lock.start(self.mqtt_host, self.mqtt_port)
        await self.wait_presence(lock.device_id, True)

    async def wait_presence(self, device_id: str, online: bool) -> None:
        async def seen() -> bool:
            r = await self.http.get(f"/v1/devices/{device_id}")
            return r.json()["online"] is online
        await eventually(seen, what=f"{device_id} online={online}")

    async def command(self, device_id: str, action: str = "unlock", wait: float = 5, **body: Any) -> httpx.Response:
        return await self.http.post(f"/v1/devices/{device_id}/commands", params={"wait": wait},
                                    json={"action": action, **body})

    async def metrics(self) -> dict[str, int]:
        return (await self.http.get("/v1/metrics")).json()["counts"]


@contextlib.asynccontextmanager
async def live_stack(tmp_path: Path, **overrides: Any) -> AsyncIterator[LiveStack]:
    """A started stack with these settings (make_settings), an operator HTTP client, and its locks stopped after."""
    async with Stack(make_settings(tmp_path, **overrides)) as st:
        handed_out(*(getattr(st.settings, name, None) for name in SECRET_SETTINGS))
        async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {st.settings.admin_token}"}) as http:
            live = LiveStack(st, http)
            try:
                yield live
            finally:
                await asyncio.gather(*(lock.stop() for lock in live.locks), return_exceptions=True)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a stack on ephemeral loopback ports, on the database of this test run (tests/dbs.py)."""
    from tests.dbs import run_database_url

    # admit_max_queue_ms: the tests share 2 cores with each other (pytest-xdist, two passes at once) and maybe
    # with `./run serve`; on such a machine the database writer's queue can stand over the production 100 ms
    # for a while, and admission control then answers new commands 503 "busy" (by design: api/admission.py).
    # Only tests/api/test_admission.py tests that, with its own settings; elsewhere it would be a flake.
    values: dict[str, Any] = dict(data_dir=tmp_path / "data", http_port=0, mqtt_port=0, host="127.0.0.1",
                                  settle_grace_s=0.5, admin_token="test-admin-token", admit_max_queue_ms=5000.0)
    values.update(overrides)
    if "database_url" not in overrides:
        values["database_url"] = run_database_url()
    return Settings(**values)



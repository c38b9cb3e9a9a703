"""Helpers for the external-broker tests: recording MQTT clients whose messages can be awaited, and the
API (latch.stack.Stack without its embedded broker) in front of a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from api import schema
from api.db import Database
from api.registry import mosquitto_config
from foundation.settings import Settings
from latch.stack import Stack
from mqtt_client import MqttClient
from tests.external.mosquitto import Mosquitto, Tls, running_mosquitto
from tests.support import LiveStack, make_settings


class Recorder:
    """An MQTT message handler that keeps (topic, payload) pairs and lets a test await one."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._grew = asyncio.Event()

    async def __call__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.messages.append((topic, payload))
        self._grew.set()

    def topics(self) -> list[str]:
        return [t for t, _ in self.messages]

    async def wait_for(self, topic: str, payload: bytes | None = None, timeout: float = 10.0, after: int = 0) -> int:
        """The index of the first message (from index `after`) on `topic`, with `payload` if given; waits for it."""
        deadline = time.monotonic() + timeout
        while True:
            self._grew.clear()    # the handler runs only while we await: look, then wait for more
            for i in range(after, len(self.messages)):
                t, p = self.messages[i]
                if t == topic and (payload is None or p == payload):
                    return i
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message on {topic} {payload!r} within {timeout}s; got {self.messages}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._grew.wait(), remaining)


async def client(port: int, client_id: str, username: str, password: str, handler: Recorder | None = None,
                 **kw: Any) -> MqttClient:
    c = MqttClient(client_id, username=username, password=password, clean_session=True, handler=handler,
                   reconnect_delay=0.2, **kw)
    await c.connect("127.0.0.1", port)
    return c


async def prepared_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for an API in front of Mosquitto, with a migrated database and Latch's Mosquitto files
    written (the service user must be in them before Mosquitto starts)."""
    settings = make_settings(tmp_path, mosquitto_config_dir=tmp_path / "mosquitto" / "latch", **overrides)
    settings.ensure_secrets()
    db = Database(settings.resolved_database_url())
    try:
        await schema.upgrade(db)
        await mosquitto_config.generate(db, settings.service_secret or "", settings.mosquitto_config_dir)  # type: ignore[arg-type]
    finally:
        await db.close()
    return settings


@contextlib.asynccontextmanager
async def api_before_mosquitto(tmp_path: Path, *, tls: Tls | None = None,
                               broker_url: Callable[[Mosquitto], str] | None = None,
                               demo_fleet: int = 0, **overrides: Any) -> AsyncIterator[tuple[LiveStack, Mosquitto]]:
    """Mosquitto with Latch's generated files, and the real API (uvicorn on a real socket) using it as its
    broker; the API rewrites the files and SIGHUPs Mosquitto on every device change."""
    settings = await prepared_settings(tmp_path, **overrides)
    assert settings.mosquitto_config_dir is not None
    async with running_mosquitto(settings.mosquitto_config_dir, tls=tls) as mq:
        settings.mosquitto_pid_file = mq.pid_file
        settings.broker = broker_url(mq) if broker_url else mq.url
        async with Stack(settings, embedded_broker=False, demo_fleet=demo_fleet) as st:
            async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                         headers={"Authorization": f"Bearer {settings.admin_token}"}) as http:
                live = LiveStack(st, http)
                live.mqtt_port = mq.port           # simulated locks connect to Mosquitto, not to Latch's broker
                try:
                    yield live, mq
                finally:
                    await asyncio.gather(*(lock.stop() for lock in live.locks), return_exceptions=True)

"""Replica tests need PostgreSQL whatever the pass: they run once, in the PostgreSQL pass of ./run test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.dbs import ON_POSTGRES
from tests.natsserver import NatsServer


@pytest.fixture(params=["postgres-notify", "nats-jetstream"])
async def bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The replicas' environment for one way of carrying events between them: PostgreSQL NOTIFY under the
    ordering lock (api/pg_bus.py), or NATS JetStream (api/push/nats_bus.py) on a real nats-server. A test that
    takes `bus` runs against both (the shared suite of docs/scaling.md)."""
    if request.param == "postgres-notify":
        yield {}
        return
    server = await NatsServer(tmp_path / "nats").start()
    try:
        yield {"LATCH_NATS_URL": server.url}
    finally:
        await server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ON_POSTGRES:
        return
    mine = [i for i in items if "tests/scale/" in str(i.path).replace("\\", "/")]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]

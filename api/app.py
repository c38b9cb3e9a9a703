"""Builds the FastAPI app and the live parts behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.commands import CommandService
from api.db import Database
from api.devices import DeviceRegistry
from api.ingest import Ingest
from api.link import BrokerLink
from api.metrics import Metrics
from api.routes import commands, devices, health
from api.runtime import Runtime
from api.sweeper import Sweeper
from api.waiters import Waiters
from broker.identity import SERVICE_USERNAME
from latch.settings import Settings


def build_runtime(settings: Settings, db: Database) -> Runtime:
    assert settings.service_secret, "settings.ensure_secrets() first"
    metrics, waiters = Metrics(), Waiters()
    registry = DeviceRegistry(db)
    holder: list[Ingest] = []

    async def handle(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        await holder[0].handle(topic, payload, qos, retain)

    link = BrokerLink(settings.api_client_id, SERVICE_USERNAME, settings.service_secret, handle)
    commands_ = CommandService(db, settings, link, waiters, metrics)
    ingest = Ingest(registry, commands_, link, metrics)
    holder.append(ingest)
    return Runtime(settings=settings, db=db, registry=registry, commands=commands_, ingest=ingest, link=link,
                   sweeper=Sweeper(commands_), metrics=metrics, waiters=waiters)


def create_app(settings: Settings, db: Database | None = None) -> FastAPI:
    """The API. `db` may be shared with an embedded broker; otherwise one is made from the settings."""
    settings.ensure_secrets()
    own_db = db is None
    database = db or Database(settings.resolved_database_url())
    runtime = build_runtime(settings, database)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await database.create_schema()
        host, port = settings.broker_address()
        await runtime.link.start(host, port)
        runtime.sweeper.start()
        try:
            yield
        finally:
            await runtime.sweeper.stop()
            await runtime.link.stop()
            if own_db:
                await database.close()

    app = FastAPI(title="Latch", version="0.1.0", lifespan=lifespan,
                  description="Press Unlock, a lock opens, exactly once. Operator API: "
                              "`Authorization: Bearer <token>`.")
    app.state.runtime = runtime
    for r in (health.router, devices.router, commands.router):
        app.include_router(r)
    return app

"""Builds the FastAPI app and the live parts behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.commands import CommandService
from api.db import Database
from api.devices import DeviceRegistry
from api.events import EventLog, LiveEvent
from api.ingest import Ingest
from api.journal import Journal
from api.link import BrokerLink
from api.metrics import Metrics
from api.rides import RideService
from api.rights import Rights
from api.routes import commands, devices, events, health, pages, rides, users, ws
from api.runtime import Runtime
from api.sweeper import Sweeper
from api.users import UserService
from api.waiters import Waiters
from broker.identity import SERVICE_USERNAME
from latch.settings import Settings
from protocol import topics


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
    events_ = EventLog(db, settings, metrics)
    commands_.hooks = registry.hooks = Journal(events_, settings)

    def to_rider_topic(ev: LiveEvent) -> None:   # the MQTT transport: each rider's own topic
        if ev.audience is not None and link.is_connected:
            link.publish(topics.user_events_topic(ev.audience), ev.json, qos=1)

    events_.sinks.append(to_rider_topic)
    return Runtime(settings=settings, db=db, registry=registry, commands=commands_, ingest=ingest, link=link,
                   sweeper=Sweeper(commands_), metrics=metrics, waiters=waiters, events=events_,
                   rides=RideService(db, commands_, events_), rights=Rights(db, settings),
                   users=UserService(db, settings))


def create_app(settings: Settings, db: Database | None = None) -> FastAPI:
    """The API. `db` may be shared with an embedded broker; otherwise one is made from the settings."""
    settings.ensure_secrets()
    own_db = db is None
    database = db or Database(settings.resolved_database_url())
    runtime = build_runtime(settings, database)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await database.create_schema()
        await runtime.events.start()   # before the broker link: presence arrives as soon as it connects
        host, port = settings.broker_address()
        await runtime.link.start(host, port)
        runtime.sweeper.start()
        try:
            yield
        finally:
            runtime.events.close_all("server shutting down")
            await runtime.sweeper.stop()
            await runtime.link.stop()
            if own_db:
                await database.close()

    app = FastAPI(title="Latch", version="0.1.0", lifespan=lifespan,
                  description="Press Unlock, a lock opens, exactly once. Operator API: "
                              "`Authorization: Bearer <token>`.")
    app.state.runtime = runtime
    for r in (health.router, devices.router, commands.router, users.router, rides.router, events.router, ws.router,
              pages.router):
        app.include_router(r)
    pages.mount_static(app)
    return app

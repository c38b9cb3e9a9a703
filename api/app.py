"""Builds the FastAPI app and the live parts behind it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from api import errors, openapi_doc, pg_bus, runtime_metrics, schema, security_headers
from api.admission import Admission
from api.background import reraise_if_stopping
from api.boundary import BodyGuard, validation_error_handler
from api.commands import routes as command_routes
from api.commands.ingest import Ingest
from api.commands.log import CommandLog
from api.commands.service import CommandService
from api.commands.sweeper import Sweeper
from api.commands.waiters import Waiters
from api.db import Database
from api.fleet import routes as fleet_routes
from api.fleet.service import FleetService
from api.hooks import AllHooks
from api.journal import Journal
from api.lease import Lease
from api.link import BrokerLink
from api.metrics import HttpMetrics, Metrics
from api.notifications import routes as notification_routes
from api.notifications.service import NotificationService
from api.pg_bus import PgListener
from api.push import event_models as ek
from api.push import routes as push_routes
from api.push import wire, ws_routes
from api.push.events import EventLog, LiveEvent
from api.registry import broker_auth_routes
from api.registry import routes as device_routes
from api.registry.devices import REVOKED, ROTATED, DeviceRegistry
from api.request_id import RequestId
from api.riders import nearby_routes, ride_routes, user_routes
from api.riders.rides import RideService
from api.riders.users import UserService
from api.rights import Rights
from api.routes import health, pages, stats
from api.runtime import Runtime
from broker.identity import SERVICE_USERNAME
from foundation.settings import Settings
from protocol import messages, topics

log = logging.getLogger("latch.app")


def build_runtime(settings: Settings, db: Database) -> Runtime:
    assert settings.service_secret, "settings.ensure_secrets() first"
    metrics, waiters = Metrics(), Waiters()
    # one lease (api/lease.py) for every singleton job: device reports, the sweeper, fleet rollouts
    lease = Lease(db.url if db.is_postgres else None, eligible=settings.ingest)
    events_ = EventLog(db, settings, metrics)
    bus = events_.bus
    hooks = AllHooks(Journal(events_, settings), CommandLog())   # inside each change's transaction
    registry = DeviceRegistry(db, hooks=hooks)
    holder: list[Ingest] = []   # the link's handler is the ingest, which needs the link: bound once both exist

    async def handle(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        await holder[0].handle(topic, payload, qos, retain)

    link = BrokerLink(settings.api_client_id, SERVICE_USERNAME, settings.service_secret, handle,
                      ingest=settings.ingest, share_group=settings.share_group,
                      max_packet_size=settings.mqtt_max_packet_size)
    # with NATS, other replicas' answers wake waits here through it: while it is away a wait re-reads
    commands_ = CommandService(db, settings, link, waiters, metrics, hooks=hooks, sweeps_here=lambda: lease.held,
                               wakes_degraded=(lambda: not bus.connected) if bus is not None else None)

    def command_dropped(topic: str, payload: bytes) -> None:   # the link gave up on a sent command
        parsed = topics.parse(topic)
        if parsed is None or parsed[1] != topics.CMD:
            return
        try:
            command_id = messages.decode_downlink(payload).get("id")
        except messages.ProtocolError:
            return
        if isinstance(command_id, str):
            asyncio.get_running_loop().create_task(
                commands_.publish_refused(command_id, "the broker kept closing the connection on it"))

    link.on_dropped.append(command_dropped)

    async def send_queued() -> None:
        try:
            await commands_.dispatch_all_queued()
        except Exception:   # the next reconnect, or each device's next coming online, tries again
            reraise_if_stopping()
            log.exception("sending the commands queued while the broker link was down failed")

    sending: set[asyncio.Task[None]] = set()   # kept until done (the loop holds tasks only weakly)

    def on_reconnected() -> None:
        task = asyncio.get_running_loop().create_task(send_queued())
        sending.add(task)
        task.add_done_callback(sending.discard)

    link.on_reconnected.append(on_reconnected)
    lease.on_acquired.append(lambda: asyncio.get_running_loop().create_task(link.refresh_retained()))
    ingest = Ingest(registry, commands_, link, metrics, lease)
    holder.append(ingest)

    def to_rider_topic(ev: LiveEvent) -> None:   # the MQTT transport: each rider's own topic
        # only the process that made the event sends it, so a rider gets it once however many replicas;
        # an audience that is no user id (a fleet command's device commands: owner "fleet:<id>") has no topic
        if ev.audience is not None and ev.local and link.is_connected and topics.valid_device_id(ev.audience):
            link.publish(topics.user_events_topic(ev.audience), ev.json, qos=1)

    def wake_waiters(ev: LiveEvent) -> None:   # a command made final by another replica ends ?wait= here
        # (this process's own changes wake their waiters with the command in hand: CommandService._after_change)
        if ev.kind == ek.COMMAND and ev.data.get("final") and not ev.local:
            waiters.notify(ev.data["command_id"])

    fleet = FleetService(db, settings, commands_, lease, events_)   # shares the sweeper's lease

    def wake_fleet(ev: LiveEvent) -> None:   # a fleet made on another replica: the rollout worker looks now
        if ev.kind == ek.FLEET and not ev.local:
            fleet.wake()

    async def drop_connections(device_id: str, change: str) -> None:
        # Latch's broker closes a revoked or rotated device's open connections at once (broker/core.py
        # drop_device); an external Mosquitto drops them on the reload its files' rewrite causes
        # (api/registry/mosquitto_config.py), and this message is routed to nobody there
        if change in (ROTATED, REVOKED) and link.is_connected:
            link.publish(topics.drop_topic(device_id), change.encode(), qos=1)

    registry.after_change.append(drop_connections)
    users = UserService(db, settings)
    events_.confirm = users.sessions.confirm   # open streams re-check their session (api/push/events.py still_allowed)
    events_.sinks.append(wake_waiters)
    events_.sinks.append(wake_fleet)
    events_.sinks.append(to_rider_topic)
    notifications = NotificationService(db, settings, events_, link, lambda: lease.held)   # api/notifications
    events_.personalize = notifications.offer
    events_.plan = notifications.fanout.plan   # one decision for every rider with default preferences
    events_.sinks.append(notifications.mqtt_sink)
    return Runtime(settings=settings, db=db, registry=registry, commands=commands_, ingest=ingest, link=link,
                   sweeper=Sweeper(commands_, lease, acks_behind=ingest.ack_lag.behind), metrics=metrics,
                   waiters=waiters, events=events_,
                   rides=RideService(db, commands_, events_), rights=Rights(db, settings),
                   users=users,
                   fleet=fleet,
                   admission=Admission(db.write_delay, settings.admit_max_creating, settings.admit_max_queue_ms),
                   notifications=notifications)


def create_app(settings: Settings, db: Database | None = None) -> FastAPI:
    """The API. `db` may be shared with an embedded broker; otherwise one is made from the settings."""
    settings.ensure_secrets()
    own_db = db is None
    database = db or Database(settings.resolved_database_url(), sqlite_writer=settings.sqlite_writer)
    runtime = build_runtime(settings, database)
    runtime_metrics.watch(runtime)   # GET /metrics: queue depths, transaction times (api/runtime_metrics.py)

    def announce_dropped(device_id: str) -> None:   # the will an external broker may not send when it drops a device
        if runtime.link.is_connected:
            runtime.link.publish(topics.presence_topic(device_id), messages.OFFLINE, qos=1, retain=True)

    mosquitto = None
    if settings.mosquitto_config_dir is not None:   # an external Mosquitto reads the registry from files
        from api.registry.mosquitto_config import MosquittoSync

        mosquitto = MosquittoSync(database, settings)
        runtime.registry.after_change.append(mosquitto.device_changed)
        mosquitto.on_dropped = announce_dropped
    nats_auth = None
    if settings.nats_auth_url is not None:   # a NATS cluster asks this API who may log in (api/registry/nats_auth.py)
        from api.registry.nats_auth import NatsAuth

        nats_auth = NatsAuth(database, settings)
        runtime.registry.after_change.append(nats_auth.device_changed)
        nats_auth.on_dropped = announce_dropped

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # every part is stopped in the reverse order of its start, also when a later start fails (a broker that
        # cannot be reached must not leave the PostgreSQL listener, the NATS connections or the database open)
        async with AsyncExitStack() as parts:
            if own_db:
                parts.push_async_callback(database.close)
            await schema.check(database, settings.resolved_database_url())   # refuses an un-migrated database
            await runtime.registry.seal_plain_keys()   # command keys an older version stored in plain text
            if database.is_postgres:   # other replicas' changes (api/pg_bus.py); listening before reading the head
                channels = {pg_bus.DEADLINE: runtime.sweeper.on_notify}
                if runtime.events.bus is None:   # with NATS, events travel there (api/push/nats_bus.py)
                    channels[pg_bus.EVENTS] = runtime.events.on_notify
                listener = PgListener(database.url, channels, on_reconnect=runtime.events.resync)
                parts.push_async_callback(listener.stop)
                await listener.start()
            if nats_auth is not None:      # first: a NATS cluster asks it about this API's own logins (MQTT, events)
                parts.push_async_callback(nats_auth.stop)
                await nats_auth.start()
            parts.push_async_callback(runtime.events.stop)   # last of what writes events: with NATS it relays the rest
            await runtime.events.start()   # before the broker link: presence arrives as soon as it connects
            parts.push_async_callback(runtime.notifications.stop)   # flushes its counts
            await runtime.notifications.start()   # its index before any transport reads a notification
            if mosquitto is not None:      # before connecting: the service user must be in Mosquitto's files
                await mosquitto.sync("start-up")
            (host, port), *others = settings.broker_addresses()
            parts.push_async_callback(runtime.link.stop)
            await runtime.link.start(host, port, tls=settings.broker_tls(), fallbacks=others)
            parts.push_async_callback(runtime.sweeper.stop)
            runtime.sweeper.start()
            parts.push_async_callback(runtime.fleet.stop)   # before the sweeper releases the lease and the link stops
            runtime.fleet.start()   # after the sweeper: the rollout shares its lease
            parts.callback(runtime.events.close_all, "server shutting down")
            yield

    app = FastAPI(title="Latch", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Press Unlock, a lock opens, exactly once. Operator API: "
                              "`Authorization: Bearer <token>`.")
    app.state.runtime = runtime
    _map_errors(app)
    app.state.mosquitto = mosquitto
    app.state.nats_auth = nats_auth
    for r in (health.router, device_routes.router, command_routes.router, user_routes.router, ride_routes.router,
              push_routes.router, ws_routes.router, pages.router, broker_auth_routes.router, fleet_routes.router,
              nearby_routes.router, notification_routes.router, stats.router):
        app.include_router(r)
    pages.mount_static(app)
    openapi_doc.install(app)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetrics, metrics=runtime.metrics)   # outside BodyGuard: its 413s are timed too
    security_headers.install(app)    # added last, so outermost: BodyGuard's 413/422 get the headers too
    app.add_middleware(RequestId)    # outside that: every response carries X-Request-ID (api/request_id.py)
    wire.install(app)   # outermost: event streams written straight to their sockets (api/push/wire.py)
    return app


def _map_errors(app: FastAPI) -> None:
    """Errors the services raise, mapped to HTTP in one place."""
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    errors.install(app)   # every LatchError: its status, {"detail": why}, Retry-After where it has one

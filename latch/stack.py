"""Latch in one process: the embedded broker, the API under uvicorn, and optionally a demo fleet.

`latch serve` runs this, and the tests start the very same thing on
ephemeral loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

import uvicorn

from api import schema
from api.app import create_app
from api.db import Database
from api.models import DeviceCreate
from api.registry.credentials import SqlCredentialStore
from api.registry.devices import DeviceExists, DeviceRegistry
from broker.server import EmbeddedBroker, broker_options
from device_sim.fleet import Fleet
from device_sim.lock import Behaviour, Credentials
from device_sim.provision import sim_dir
from foundation.settings import Settings

log = logging.getLogger("latch")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket says TCP; without it every keep-alive response waited ~40 ms (Nagle x delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Stack:
    def __init__(self, settings: Settings, *, embedded_broker: bool = True, demo_fleet: int = 0,
                 fleet_behaviour: Behaviour | None = None, migrate: bool = True) -> None:
        """`migrate`: bring the database to the code's revision first (`latch serve`, which owns its
        database); otherwise only check it is there and refuse to start when it is not (`latch api`)."""
        settings.ensure_secrets()
        self.settings = settings
        self.embedded_broker = embedded_broker
        self.migrate = migrate
        self.demo_fleet = demo_fleet
        self.fleet_behaviour = fleet_behaviour
        self.db = Database(settings.resolved_database_url(), sqlite_writer=settings.sqlite_writer)
        self.broker: EmbeddedBroker | None = None
        self.fleet: Fleet | None = None
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self.http_port = 0

    @property
    def api_url(self) -> str:
        host = self.settings.host
        return f"http://[{host}]:{self.http_port}" if ":" in host else f"http://{host}:{self.http_port}"

    async def start(self) -> None:
        if self.migrate:
            await schema.upgrade(self.db)
        else:   # `latch api`: a fresh SQLite data dir is created, anything else must be migrated already
            await schema.prepare(self.db, self.settings.resolved_database_url())
        s = self.settings
        if self.embedded_broker:
            self.broker = EmbeddedBroker(
                broker_options(s),   # its store: DATA_DIR/broker.db
                SqlCredentialStore(self.db, s.service_secret or "", s.jwt_secret))
            await self.broker.start()
            s.mqtt_port = self.broker.port
        app = create_app(s, self.db)
        if self.broker is not None and s.metrics_port is None:
            # the embedded broker's families on the API's GET /metrics, unless they have their own listener
            from broker.metrics import BrokerCollector
            app.state.runtime.metrics.registry.register(BrokerCollector(self.broker))
        sock = bind_socket(s.host, s.http_port)
        self.http_port = sock.getsockname()[1]
        # ws_per_message_deflate off: a socket that negotiates permessage-deflate (every browser asks for it) keeps
        # two zlib contexts, ~37 KiB measured, more than the rest of a held /v1/ws socket; the events it carries
        # are small JSON, written uncompressed anyway (api/push/wire.py), and a detached socket (api/push/ws_detach.py)
        # reads no compressed frames (docs/notifications.md, "WebSocket memory")
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=2, ws_per_message_deflate=False))
        self._server_task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # uvicorn flips this after the lifespan startup completed
            if self._server_task.done():
                await self._server_task
                raise RuntimeError("the API server stopped during start-up")
            await asyncio.sleep(0.01)
        if self.demo_fleet:
            # the API's own registry: a registration then does what any other does (the event log, and an
            # external Mosquitto's password file rewritten and reloaded, so the demo locks may log in there)
            registry: DeviceRegistry = app.state.runtime.registry
            creds = await demo_credentials(registry, self.demo_fleet, s.data_dir / "demo-fleet.json")
            # the demo locks keep the firmware's once-only record on disk: a restarted `latch serve` answers a
            # replayed command from it instead of opening again (device_sim/store.py)
            self.fleet = Fleet(creds, self.fleet_behaviour, data_dir=sim_dir(s.data_dir))
            (host, port), *others = s.broker_addresses()
            await self.fleet.start(host, port, tls=s.broker_tls(), fallbacks=others)   # mqtts://: TLS, as the API

    async def stop(self) -> None:
        """In order: the demo fleet (its locks disconnect while the broker still answers), the API, the broker."""
        if self.fleet is not None:
            log.info("stopping %d simulated locks", len(self.fleet))
            await self.fleet.stop()
        if self._server is not None and self._server_task is not None:
            log.info("stopping the API")
            # end event streams and held polls now, or the server waits out its graceful-shutdown timeout
            self._server.config.app.state.runtime.events.close_all("server shutting down")
            self._server.should_exit = True
            await asyncio.gather(self._server_task, return_exceptions=True)
        if self.broker is not None:
            log.info("stopping the broker")
            await self.broker.stop()
        await self.db.close()

    async def __aenter__(self) -> "Stack":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def demo_credentials(registry: DeviceRegistry, n: int, path: Path) -> list[Credentials]:
    """bike-0001..bike-N, registered on first use; their secrets kept in `path` (mode 0600)."""
    saved: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    out: list[Credentials] = []
    changed = False
    for i in range(1, n + 1):
        device_id = f"bike-{i:04d}"
        entry = saved.get(device_id)
        if entry is None or await registry.get(device_id) is None:
            try:
                reg = await registry.register(DeviceCreate(id=device_id, name=f"Demo bike {i}"))
            except DeviceExists:
                reg = await registry.rotate(device_id)
                assert reg is not None
            entry = {"id": device_id, "mqtt_password": reg.mqtt_password, "command_key": reg.command_key}
            saved[device_id] = entry
            changed = True
        out.append(Credentials.from_registration(entry))
    if changed:
        path.touch(mode=0o600)
        path.write_text(json.dumps(saved, indent=1))
    return out

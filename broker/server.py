"""Builds, starts and stops Latch's MQTT broker: its core, its store and its listeners.

Listeners: plain TCP (always), TLS (``tls_cert`` + ``tls_key``; with
``tls_client_ca`` a client certificate signed by that CA is a device
identity, its subject CN being the device id) and MQTT over WebSocket
(``ws_port``, subprotocol ``mqtt``, binary frames; through the ``websockets``
library). All three feed the same ``broker.core.Connection``.

`latch broker` runs this alone (with uvloop when it is installed, see
``run``); `latch serve` embeds it in the API's process (latch/stack.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from broker.core import GONE, BrokerCore, Connection, Limits
from broker.credentials import CredentialStore
from broker.fence import Gatekeeper, TopicFence
from broker.store import MemoryStore, SqliteStore

log = logging.getLogger("latch.broker")

STORE_FILE = "broker.db"
LISTEN_BACKLOG = 4096
T = TypeVar("T")


@dataclass
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883                  # 0 = an ephemeral port
    ws_port: int | None = None        # MQTT over WebSocket, off unless set (0 = ephemeral)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int | None = None       # default 8883 (0 = ephemeral)
    tls_client_ca: Path | None = None  # accept client certificates signed by this CA as device identities
    allow_anonymous: bool = False
    data_dir: Path | None = None      # the store: DATA_DIR/broker.db; None = in memory (nothing survives)
    fsync: bool = False               # synchronous=FULL: survive power loss too, not only a killed process
    metrics_port: int | None = None   # Prometheus GET /metrics on host:metrics_port (broker/metrics.py); 0 = ephemeral
    limits: Limits = field(default_factory=Limits)


class WebSocketTransport:
    """The few transport methods Connection uses, over a `websockets` connection."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._out: list[bytes] = []
        self._wake = asyncio.Event()
        self._closing = False
        self.readable = asyncio.Event()      # cleared while the broker holds this client back
        self.readable.set()
        self.task = asyncio.get_running_loop().create_task(self._writer())

    async def _writer(self) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._out:
                    data = b"".join(self._out)
                    self._out.clear()
                    await self.ws.send(data)
                if self._closing:
                    await self.ws.close()
                    return
        except (ConnectionClosed, OSError):
            pass

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._out.append(data)
            self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def abort(self) -> None:
        self._closing = True
        self._out.clear()
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()
        self._wake.set()

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = getattr(self.ws, "transport", None)
        return transport.get_extra_info(name, default) if transport is not None else default

    def pause_reading(self) -> None:
        self.readable.clear()

    def resume_reading(self) -> None:
        self.readable.set()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raise NotImplementedError


class EmbeddedBroker:
    """Latch's broker in this event loop; `ports` ({"default", "tls", "ws"}) are known after start()."""

    def __init__(self, options: BrokerOptions, credentials: CredentialStore | None) -> None:
        self.options = options
        self.credentials = credentials
        self.core: BrokerCore | None = None
        self.ports: dict[str, int] = {}
        self._servers: list[Any] = []
        self._ws_server: Any = None
        self._metrics: Any = None

    @property
    def port(self) -> int:
        return self.ports["default"]

    def _tls_context(self) -> ssl.SSLContext | None:
        o = self.options
        if o.tls_cert is None and o.tls_key is None:
            return None
        if o.tls_cert is None or o.tls_key is None:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(o.tls_cert), str(o.tls_key))
        if o.tls_client_ca is not None:
            ctx.load_verify_locations(cafile=str(o.tls_client_ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL   # a certificate is an identity; username/password still work
        return ctx

    async def start(self) -> None:
        o = self.options
        loop = asyncio.get_running_loop()
        tls = self._tls_context()
        store: MemoryStore | SqliteStore
        if o.data_dir is not None:
            store = SqliteStore(Path(o.data_dir) / STORE_FILE, fsync=o.fsync, on_failure=self._store_failed)
        else:
            store = MemoryStore()
        core = self.core = BrokerCore(o.limits, Gatekeeper(self.credentials, o.allow_anonymous), TopicFence(),
                                      store, want_client_certs=o.tls_client_ca is not None)
        core.start(loop)
        try:
            tcp = await loop.create_server(lambda: Connection(core), o.host, o.port, backlog=LISTEN_BACKLOG)
            self._servers.append(tcp)
            self.ports["default"] = tcp.sockets[0].getsockname()[1]
            if tls is not None:
                port = 8883 if o.tls_port is None else o.tls_port
                server = await loop.create_server(lambda: Connection(core), o.host, port, ssl=tls,
                                                  backlog=LISTEN_BACKLOG,
                                                  ssl_handshake_timeout=o.limits.connect_timeout)
                self._servers.append(server)
                self.ports["tls"] = server.sockets[0].getsockname()[1]
            if o.ws_port is not None:
                await self._start_ws(core, tls=None)
            if o.metrics_port is not None:
                from broker.metrics import MetricsListener, broker_registry

                self._metrics = MetricsListener(broker_registry(self))
                await self._metrics.start(o.host, o.metrics_port)
                self.ports["metrics"] = self._metrics.port
        except BaseException:
            await self.stop()
            raise
        log.info("MQTT broker listening: %s", ", ".join(f"{k}={v}" for k, v in self.ports.items()))

    async def _start_ws(self, core: BrokerCore, tls: ssl.SSLContext | None) -> None:
        from websockets.asyncio.server import serve
        from websockets.exceptions import ConnectionClosed

        async def handler(ws: Any) -> None:
            conn = Connection(core)
            transport = WebSocketTransport(ws)
            conn.connection_made(transport)
            try:
                while True:
                    if not transport.readable.is_set():
                        await transport.readable.wait()
                    message = await ws.recv()
                    if isinstance(message, str):
                        conn.violation("text WebSocket frame (MQTT needs binary frames)")
                        break
                    conn.data_received(message)
                    if conn.state == GONE:
                        break
            except ConnectionClosed:
                pass
            finally:
                conn.connection_lost(None)
                transport.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.task, 5)

        o = self.options
        self._ws_server = await serve(handler, o.host, o.ws_port, subprotocols=["mqtt"], compression=None,
                                      max_size=o.limits.max_packet_size + 8, ping_interval=None,
                                      open_timeout=o.limits.connect_timeout, ssl=tls)
        self.ports["ws"] = self._ws_server.sockets[0].getsockname()[1]

    def _store_failed(self, error: BaseException) -> None:
        """A broker that cannot persist must not go on acknowledging: stop accepting and drop everyone."""
        log.critical("the broker store failed (%r): closing all MQTT listeners and connections", error)
        for server in self._servers:
            server.close()
        if self.core is not None:
            for c in list(self.core.conns):
                c.abort()

    async def stop(self) -> None:
        if self._metrics is not None:
            await self._metrics.stop()
        for server in self._servers:
            server.close()
        if self._ws_server is not None:
            self._ws_server.close()
        if self.core is not None:
            await self.core.stop()
        if self._ws_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws_server.wait_closed(), 5)
        self._servers.clear()

    def metrics(self) -> dict[str, Any]:
        return self.core.metrics() if self.core is not None else {}


def tune_gc() -> None:
    """For a process that is only the broker, once it has started: move everything allocated so far
    (imports, the loaded store) out of the collector's sight and collect the young generation less
    often. A full collection over a large heap is a stall of tens of milliseconds, which is what the
    round-trip p99 showed before; the broker's hot paths allocate no reference cycles."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run(main: Callable[[], Awaitable[T]]) -> T:
    """asyncio.run with uvloop when it is installed (25-80 % more throughput measured on amqtt)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def broker_options(settings: Any) -> BrokerOptions:
    """BrokerOptions from foundation.settings.Settings (`latch broker` and `latch serve` alike)."""
    d = Limits()
    limits = Limits(
        connect_timeout=getattr(settings, "mqtt_connect_timeout_s", d.connect_timeout),
        max_packet_size=getattr(settings, "mqtt_max_packet_size", d.max_packet_size),
        max_inflight=getattr(settings, "mqtt_max_inflight", d.max_inflight),
        max_queued=getattr(settings, "mqtt_max_queued", d.max_queued),
        queue_policy=getattr(settings, "mqtt_queue_policy", d.queue_policy),
        session_expiry=getattr(settings, "mqtt_session_expiry_s", d.session_expiry),
    )
    return BrokerOptions(host=settings.host, port=settings.mqtt_port, ws_port=settings.ws_port,
                         tls_cert=settings.tls_cert, tls_key=settings.tls_key, tls_port=settings.tls_port,
                         tls_client_ca=getattr(settings, "tls_client_ca", None),
                         allow_anonymous=bool(settings.allow_anonymous), data_dir=settings.data_dir,
                         fsync=bool(getattr(settings, "mqtt_fsync", False)), limits=limits,
                         metrics_port=getattr(settings, "metrics_port", None))

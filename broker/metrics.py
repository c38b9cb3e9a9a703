"""The broker's Prometheus metrics and its small /metrics HTTP listener (`latch broker --metrics-port N`).

The hot paths only bump plain ints (BrokerCore.stats, rx_qos, tx_qos; the store's commits and ops); this
module turns them, and the sizes of the broker's tables, into metric families when Prometheus scrapes:
nothing is maintained per message here. The listener runs on the broker's event loop, so a scrape reads the
tables between two packets, never while they change. It speaks just enough HTTP/1.1 for a scraper
(GET /metrics, one request per connection); the exposition itself is prometheus_client's.

`latch serve` adds the same collector to the API's registry, so its GET /metrics carries both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE  # what every Prometheus reads
from prometheus_client.registry import Collector

from broker.identity import Role

if TYPE_CHECKING:
    from broker.core import BrokerCore


class Observed(Protocol):
    """What the collector reads of a broker (broker/server.py Observed): its core, None while stopped.
    A protocol, not the class, so this module does not import the server that starts it."""

    core: BrokerCore | None

log = logging.getLogger("latch.broker.metrics")

MAX_REQUEST = 8192        # bytes of request line and headers a scraper may send
READ_TIMEOUT_S = 5.0

# BrokerCore.stats key -> (family, help) for plain counters
_COUNTERS = {
    "connections_total": ("latch_broker_connections_opened", "TCP/TLS/WebSocket connections accepted"),
    "connects_refused": ("latch_broker_connects_refused", "CONNECTs refused (bad credentials, not allowed)"),
    "protocol_violations": ("latch_broker_protocol_violations", "Connections closed for a protocol violation"),
    "keepalive_timeouts": ("latch_broker_keepalive_timeouts", "Connections closed: silent past their keep-alive"),
    "connect_timeouts": ("latch_broker_connect_timeouts", "Connections closed: no CONNECT in time"),
    "takeovers": ("latch_broker_session_takeovers", "Connections replaced by a new one with the same client id"),
    "sessions_expired": ("latch_broker_sessions_expired", "Persistent sessions expired"),
    "wills_published": ("latch_broker_wills_published", "Last wills published"),
    "publishers_throttled": ("latch_broker_publishers_throttled", "Publishers paused for a slow subscriber"),
    "connections_dropped_on_revoke": ("latch_broker_connections_dropped_on_revoke",
                                      "Connections closed because their device was revoked or rotated"),
}
# dropped messages, by reason
_DROPPED = {"queue_full": "dropped_queue_full", "slow_consumer": "dropped_slow_consumer",
            "denied": "publishes_denied"}


class BrokerCollector(Collector):
    """Everything about one broker (an EmbeddedBroker), read at scrape time."""

    def __init__(self, broker: Observed) -> None:
        self.broker = broker

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        core = self.broker.core
        if core is None:
            return
        stats = core.stats
        for key, (name, doc) in _COUNTERS.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], stats.get(key, 0))
            yield c
        rx = CounterMetricFamily("latch_broker_messages_received", "PUBLISH packets received, by QoS", labels=["qos"])
        tx = CounterMetricFamily("latch_broker_messages_sent", "PUBLISH packets sent to subscribers, by QoS",
                                 labels=["qos"])
        for qos in range(3):
            rx.add_metric([str(qos)], core.rx_qos[qos])
            tx.add_metric([str(qos)], core.tx_qos[qos])
        yield rx
        yield tx
        dropped = CounterMetricFamily("latch_broker_messages_dropped", "Messages not delivered, by reason "
                                      "(queue_full, slow_consumer, denied by the topic fence)", labels=["reason"])
        for reason, key in _DROPPED.items():
            dropped.add_metric([reason], stats.get(key, 0))
        yield dropped

        by_role = dict.fromkeys((r.value for r in Role), 0)
        for c in core.conns:
            ident = c.identity
            if ident is not None:
                by_role[ident.role.value] += 1
        conns = GaugeMetricFamily("latch_broker_connections", "Open connections (before CONNECT: role none)",
                                  labels=["role"])
        for role, n in by_role.items():
            conns.add_metric([role], n)
        conns.add_metric(["none"], len(core.conns) - sum(by_role.values()))
        yield conns
        yield GaugeMetricFamily("latch_broker_devices_connected", "Devices with an open, logged-in connection",
                                value=by_role[Role.DEVICE.value])
        sessions = list(core.sessions.values())
        yield GaugeMetricFamily("latch_broker_sessions", "Sessions (connected or persistent)", value=len(sessions))
        yield GaugeMetricFamily("latch_broker_messages_queued", "QoS 1/2 messages queued for sessions",
                                value=sum(len(s.queue) for s in sessions))
        yield GaugeMetricFamily("latch_broker_messages_inflight", "QoS 1/2 messages sent, not yet acknowledged",
                                value=sum(len(s.inflight) for s in sessions))
        yield GaugeMetricFamily("latch_broker_retained", "Retained messages", value=len(core.retained))
        yield GaugeMetricFamily("latch_broker_subscriptions", "Subscriptions",
                                value=sum(len(v) for v in core.index.exact.values()) + core.index.wildcards)
        store = core.store
        commits = CounterMetricFamily("latch_broker_store_commits", "Store transactions committed (batches)")
        commits.add_metric([], getattr(store, "commits", 0))
        yield commits
        ops = CounterMetricFamily("latch_broker_store_ops", "Store operations written; ops / commits = batch size")
        ops.add_metric([], getattr(store, "ops_written", 0))
        yield ops


def broker_registry(broker: Observed) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    ProcessCollector(registry=registry)   # this process's CPU, memory, open files
    return registry


class MetricsListener:
    """GET /metrics over plain HTTP on host:port, answered on the broker's event loop."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                return
            if len(head) > MAX_REQUEST:
                return
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if path != "/metrics":
                status, ctype, body = "404 Not Found", "text/plain; charset=utf-8", b"only /metrics here\n"
            elif method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain; charset=utf-8", b"GET /metrics\n"
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE, generate_latest(self.registry)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b""))
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()

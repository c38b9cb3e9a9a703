"""Queue depths and live state of one API process, exposed on its metrics registry (api/metrics.py) and read only
when Prometheus scrapes, never maintained on a hot path.

Apart from api/metrics.py because it reads the whole runtime (database, event log, link, admission, sweeper),
and everything the runtime holds counts its events through api/metrics.py: one module would tie them in a circle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from api.metrics import time_transactions
from api.runtime import Runtime


def watch(rt: Runtime) -> None:
    """Expose `rt`'s queue depths and timings on its metrics registry: its database's transactions from now on."""
    rt.metrics.registry.register(RuntimeCollector(rt))
    time_transactions(rt.db.engine, rt.metrics)
    if rt.db.async_engine is not None:
        time_transactions(rt.db.async_engine.sync_engine, rt.metrics)


class RuntimeCollector(Collector):
    """Queue depths and live state of one API process, read when Prometheus scrapes (on the event loop)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[Any]:
        rt = self.rt

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("latch_db_write_queue", "Writes waiting for a database writer", _write_queue(rt.db))
        yield gauge("latch_db_write_standing_delay_seconds",
                    "How long a rider's write has stood in the write queue lately (admission control refuses "
                    "new commands above LATCH_ADMIT_MAX_QUEUE_MS)", rt.db.write_delay.standing_s())
        subs = list(rt.events._operators) + [s for v in rt.events._riders.values() for s in v]
        yield gauge("latch_push_subscribers", "Live event subscriptions (SSE, WebSocket, long polls)", len(subs))
        yield gauge("latch_push_buffered_events", "Events buffered for subscribers, not yet written to them",
                    sum(len(s._buf) for s in subs))
        yield gauge("latch_push_buffer_fullest_ratio",
                    "The fullest subscriber buffer, as a share of LATCH_SUBSCRIBER_BUFFER (1 = cut off next)",
                    max((len(s._buf) for s in subs), default=0) / max(1, rt.events.buffer))
        yield gauge("latch_waiting_requests", "HTTP requests held waiting for a command to be final (?wait=)",
                    len(rt.waiters))
        yield gauge("latch_commands_being_created", "Commands being created in this process now",
                    rt.admission.creating)
        refused = CounterMetricFamily("latch_admission_refused", "New commands refused with 503 (overloaded)")
        refused.add_metric([], rt.admission.refused)
        yield refused
        yield gauge("latch_broker_link_connected", "1 while the API's MQTT link to the broker is up",
                    1 if rt.link.is_connected else 0)
        yield gauge("latch_mqtt_outgoing_unacked", "QoS 1 messages the API published that the broker has not "
                    "acknowledged yet", _unacked(rt))
        yield gauge("latch_singleton_lease_held", "1 when this process runs the sweeper, rollouts and reports",
                    1 if rt.sweeper.lease.held else 0)
        if rt.metrics.devices_online is not None:
            yield gauge("latch_devices_online", "Devices the registry marks online (the same in every replica)",
                        rt.metrics.devices_online)

    def describe(self) -> Iterable[Any]:
        return []   # its families depend on the runtime: not checked at registration


def _write_queue(db: Any) -> int:
    pool = getattr(db, "_writer", None)
    if pool is not None:
        q = getattr(pool, "_q", None)   # a thread's queue, or the loop writer's own length
        return q.qsize() if q is not None else len(pool)
    gate = getattr(db, "_write_gate", None)
    return len(gate._waiters) if gate is not None else 0


def _unacked(rt: Runtime) -> int:
    storage = getattr(getattr(rt.link.client, "_client", None), "_persistent_storage", None)
    messages = getattr(storage, "_messages", None)
    return len(messages) if messages is not None else 0

"""Everything a device says, turned into state: acks, state reports, presence, telemetry, clock sync.

A message that is malformed, oversized, from an unknown device or about
another device's command is logged, counted and dropped; nothing a device
sends can stop the API serving the others.

Order: the MQTT client hands messages over concurrently, but one device's messages are applied one
after another, in the order they arrived (an "offline" must not overtake the "online" sent after it).
With several API replicas (PostgreSQL), every replica applies acks — each state change is a
conditional UPDATE, so exactly one applies — while presence, state, telemetry and clock sync are
applied by the holder of the singleton lease only (api/lease.py): one process, so in order. A replica
taking the lease re-subscribes to the retained presence and state to start from each device's latest.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from collections.abc import Awaitable, Callable

from api.clock import now_ms
from api.commands.service import CommandService, ForeignCommand, Publisher
from api.commands.states import Event
from api.lease import Lease
from api.metrics import Metrics
from api.registry.devices import DeviceRegistry
from protocol import messages, topics

log = logging.getLogger("latch.ingest")

ACK_EVENTS = {
    messages.RECEIVED: Event.DEVICE_RECEIVED,
    messages.SUCCEEDED: Event.DEVICE_SUCCEEDED,
    messages.FAILED: Event.DEVICE_FAILED,
    messages.REJECTED: Event.DEVICE_REJECTED,
}


class InOrder:
    """Runs the work for one key after the previous work for that key, in call order; keys run concurrently."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        prev = self._tails.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine                 # before any await: the call order is the queue order
        try:
            if prev is not None:
                await prev
            await work()
        finally:
            mine.set_result(None)
            if self._tails.get(key) is mine:
                del self._tails[key]

    def __len__(self) -> int:
        return len(self._tails)


class AckLag:
    """How far behind the devices this process applies acks: now minus each ack's own `ts` (the lock's
    clock, synced to the server's), the median of the last WINDOW acks.

    The sweeper asks `behind()` before it times a command out. Measured in bench/chaos.py on a starved
    machine: the API was ~40 s behind its acks (they waited at the broker), timed commands out whose
    `succeeded` was already queued, and 5 riders were told "timed out" for a lock that had opened.
    A median, so one ack a lock re-sends after a long offline spell does not count as the API lagging;
    stale (no ack for IDLE_S) counts as caught up, since nothing is then arriving to be behind on."""

    WINDOW = 16
    BEHIND_MS = 2_000
    IDLE_S = 10.0

    def __init__(self) -> None:
        self._lags: list[int] = []
        self._at = 0.0

    def record(self, ts: int | None, now: int) -> None:
        if ts is None or not 0 <= now - ts <= 3_600_000:   # no clock, or an implausible one
            return
        self._lags.append(now - ts)
        if len(self._lags) > self.WINDOW:
            del self._lags[0]
        self._at = time.monotonic()

    def median_ms(self) -> int:
        return sorted(self._lags)[len(self._lags) // 2] if self._lags else 0

    def behind(self) -> bool:
        if not self._lags or time.monotonic() - self._at > self.IDLE_S:
            return False
        return self.median_ms() > self.BEHIND_MS


REPEAT_WINDOW_S = 5.0   # a state report this soon after an ack that carried the same state repeats it


def _fields(state: dict) -> dict:
    return {k: state[k] for k in ("locked", "battery", "pos") if k in state}


class Ingest:
    def __init__(self, registry: DeviceRegistry, commands: CommandService, publisher: Publisher,
                 metrics: Metrics, lease: Lease | None = None) -> None:
        self.registry = registry
        self.commands = commands
        self.publisher = publisher
        self.metrics = metrics
        self.lease = lease or Lease(None)
        self._in_order = InOrder()
        self.ack_lag = AckLag()
        # the state each device's latest ack carried, merged in that ack's transaction: the retained state
        # report the lock sends right after repeats it, and needs no transaction of its own (docs/performance.md)
        self._merged: dict[str, tuple[dict, float]] = {}

    async def handle(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        parsed = topics.parse(topic)
        if parsed is None:
            self._drop("unknown_topic", topic, "not a Latch device topic")
            return
        device_id, kind = parsed
        if kind != topics.ACK and not self.lease.held:
            self.metrics.inc("reports_left_to_lease_holder")   # another replica applies them, in order
            return
        await self._in_order.run(device_id, lambda: self._apply(topic, payload, device_id, kind))

    async def _apply(self, topic: str, payload: bytes, device_id: str, kind: str) -> None:
        try:
            if kind == topics.ACK:
                await self._ack(device_id, messages.decode_ack(payload))
            elif kind == topics.STATE:
                await self._state(device_id, messages.decode_state(payload))
            elif kind == topics.PRESENCE:
                await self._presence(device_id, payload)
            elif kind == topics.TELEMETRY:
                await self._telemetry(device_id, messages.decode_telemetry(payload))
            elif kind == topics.SYNC:
                await self._sync(device_id, messages.decode_sync(payload))
            else:
                self._drop("unexpected_kind", topic, f"devices do not publish {kind}")
        except messages.ProtocolError as e:
            self._drop("malformed", topic, str(e))

    def _drop(self, counter: str, topic: str, why: str) -> None:
        self.metrics.inc(f"dropped_{counter}")
        log.warning("dropped message on %s: %s", topic, why)

    async def _ack(self, device_id: str, ack: dict) -> None:
        self.ack_lag.record(ack.get("ts"), now_ms())
        detail = f"device says {ack['result']}" + (f": {ack['reason']}" if ack.get("reason") else "")
        try:
            out = await self.commands.transition(ack["id"], ACK_EVENTS[ack["result"]], reason=ack.get("reason"),
                                                 detail=detail, device_id=device_id, reported=ack.get("state"))
        except ForeignCommand as e:
            # the broker fences topics, so this is a device naming another device's command
            self._drop("foreign_ack", topics.ack_topic(device_id),
                       f"command {ack['id']} belongs to {e.args[0]}, not {device_id}")
            return
        if out is None:
            self._drop("unknown_command", topics.ack_topic(device_id), f"no command {ack['id']!r}")
            return
        if ack.get("state"):
            self._merged[device_id] = (_fields(ack["state"]), time.monotonic())
        self.metrics.inc(f"acks_{ack['result']}")

    async def _state(self, device_id: str, state: dict) -> None:
        fields = _fields(state)
        merged = self._merged.pop(device_id, None)
        if merged is not None and merged[0] == fields and time.monotonic() - merged[1] < REPEAT_WINDOW_S:
            self.metrics.inc("state_reports_repeating_an_ack")   # already merged with the ack: no write
            return
        if not await self.registry.merge_reported(device_id, fields):
            self._drop("unknown_device", topics.state_topic(device_id), "not in the registry")

    async def _telemetry(self, device_id: str, tel: dict) -> None:
        fields = {k: tel[k] for k in ("battery", "rssi") if tel.get(k) is not None}
        if not await self.registry.merge_reported(device_id, fields):
            self._drop("unknown_device", topics.telemetry_topic(device_id), "not in the registry")

    async def _presence(self, device_id: str, payload: bytes) -> None:
        online = messages.decode_presence(payload) == "online"
        device = await self.registry.set_presence(device_id, online)
        if device is None:
            self._drop("unknown_device", topics.presence_topic(device_id), "not in the registry")
            return
        if online:
            await self.commands.dispatch_queued(device)

    async def _sync(self, device_id: str, req: dict) -> None:
        device = await self.registry.get(device_id)
        if device is None:
            self._drop("unknown_device", topics.sync_topic(device_id), "not in the registry")
            return
        reply = messages.make_time_reply(device_id, req["t0"], now_ms(), binascii.unhexlify(device.command_key))
        self.publisher.publish(topics.cmd_topic(device_id), messages.encode_command(reply), qos=0)

"""A simulated lock's outgoing QoS 1 queue: the firmware MQTT client's rules (firmware/mqtt.py), over gmqtt.

firmware/mqtt.py cannot run under CPython (it reads MicroPython's ticks_ms), so its queue rules are
mirrored here, one for one:
- a QoS 1 message stays queued until its PUBACK, also across a lost link, and is sent again
  (DUP) after every reconnect, whether or not the broker kept the session;
- published while the link is down, it is queued and sent after the next connect;
- a newer retained message supersedes a queued one on the same topic, sent or not (the broker keeps only
  the newest retained message anyway);
- the queue is bounded (MAX_QUEUED, the firmware's _MAX_QUEUED): when full, the oldest goes.
  (A bound in bytes as well, `max_bytes`, is there for when the firmware gets one: it was tried
  in firmware/mqtt.py during issue 12 and is off, None, as the firmware has none today);
- QoS 0 is sent when connected, else dropped.

Packet ids: a queued message's id is released when its copy can no longer be acknowledged (the
connection it went out on is gone). One superseded or pushed out while its PUBACK may still come on
this connection keeps its id until that PUBACK or the next connect, so a late PUBACK can never be
taken for the acknowledgement of a newer message that reused the id.

gmqtt keeps its own resend store, but replays it only when the broker kept the session and empties
it otherwise, so this queue sends through gmqtt's connection directly and learns of PUBACKs by
standing in for gmqtt's store (`_AckHook`): a message gmqtt itself stores (a test publishing on
the lock's client) is kept and replayed by gmqtt as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gmqtt
from gmqtt.storage import PersistentStorage

from mqtt_client import MqttClient, MqttError, publish_packet_size

log = logging.getLogger("latch.sim")

MAX_QUEUED = 4    # firmware/mqtt.py _MAX_QUEUED


@dataclass
class _Queued:
    topic: str
    payload: bytes
    retain: bool
    size: int           # bytes of its PUBLISH packet
    mid: int = 0        # packet id of the copy last sent on the current connection; 0: not sent on it
    sent: bool = False  # sent at least once (any later copy carries DUP)


class _AckHook(PersistentStorage):
    """gmqtt's resend store, which also tells the outbox of every PUBACK."""

    def __init__(self, outbox: "Outbox") -> None:
        super().__init__()
        self._outbox = outbox

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self._outbox.acked(mid)


class Outbox:
    def __init__(self, max_queued: int = MAX_QUEUED, max_bytes: int | None = None) -> None:
        self.max_queued = max_queued
        self.max_bytes = max_bytes
        self.pending: list[_Queued] = []
        self.dropped = 0           # queued messages pushed out by newer ones (a full queue)
        self.client: MqttClient | None = None
        self._orphans: set[int] = set()   # ids of copies no longer queued whose PUBACK may still come

    def attach(self, client: MqttClient) -> None:
        """Use `client` from now on (a new one per start); the queue carries over."""
        self.client = client
        client._client._persistent_storage = _AckHook(self)
        self._orphans.clear()      # the old client's ids mean nothing to the new one
        for q in self.pending:
            q.mid = 0

    def _ids(self):  # type: ignore[no-untyped-def]
        return self.client._client._package_handler.id_generator if self.client else None

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if not qos:
            if self.client is not None and self.client.is_connected:
                try:
                    self.client.publish(topic, payload, qos=0, retain=retain)
                except MqttError as e:   # the link went between the check and the send: QoS 0 is lost
                    log.debug("%s: QoS 0 message dropped: %r", self.client.client_id, e)
            return
        queue = self.pending
        if retain:
            for old in queue:
                if old.retain and old.topic == topic:
                    queue.remove(old)      # superseded, sent or not: the broker keeps only the newest retained
                    self._orphan(old)
                    break
        q = _Queued(topic, payload, retain, publish_packet_size(topic, payload, 1))
        n = q.size + sum(old.size for old in queue)
        while queue and (len(queue) >= self.max_queued or (self.max_bytes is not None and n > self.max_bytes)):
            old = queue.pop(0)             # the oldest goes
            n -= old.size
            self._orphan(old)
            self.dropped += 1
        queue.append(q)
        self._send(q)

    def resend(self) -> int:
        """After a connect: send every unacknowledged message again, oldest first. Returns how many."""
        ids = self._ids()
        if ids is not None:
            for mid in self._orphans:      # their connection is gone: no PUBACK will come for them
                ids.free_id(mid)
        self._orphans.clear()
        n = 0
        for q in list(self.pending):
            if q.mid and ids is not None:
                ids.free_id(q.mid)
            q.mid = 0
            n += self._send(q)
        return n

    def acked(self, mid: int) -> None:
        self._orphans.discard(mid)
        for q in self.pending:
            if q.mid == mid:
                self.pending.remove(q)
                return

    def _send(self, q: _Queued) -> bool:
        c = self.client
        if c is None or not c.is_connected:
            return False
        msg = gmqtt.Message(q.topic, q.payload, qos=1, retain=q.retain)
        msg.dup = q.sent
        try:
            q.mid, _ = c._client._connection.publish(msg)
        except Exception as e:   # the link died under us: it stays queued for the next connect
            log.debug("%s: send failed, kept queued: %r", c.client_id, e)
            q.mid = 0
            return False
        q.sent = True
        return True

    def _orphan(self, q: _Queued) -> None:
        """`q` leaves the queue; a copy of it on this connection keeps its id until its PUBACK or the next connect."""
        if q.mid:
            self._orphans.add(q.mid)
            q.mid = 0

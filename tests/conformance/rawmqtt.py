"""A tiny raw-socket asyncio MQTT 3.1.1 client for broker conformance tests.

Why raw: the conformance scenarios must see the exact bits the broker puts on
the wire (DUP / QoS / RETAIN flags, packet ids), must be able to *not*
acknowledge a delivery, go silent on an open socket, or send malformed bytes.
A real client library hides or "fixes" all of that.

Model
-----
``RawClient`` owns one TCP connection.  A background reader task decodes every
incoming packet and

* appends PUBLISH packets to ``client.publishes`` (and wakes waiters),
* resolves futures for CONNACK / SUBACK / UNSUBACK / PUBACK / PUBREC /
  PUBREL / PUBCOMP / PINGRESP that a caller is waiting for,
* if ``auto_ack`` is true, acknowledges incoming QoS 1/2 PUBLISH and PUBREL,
* records EOF / reset as ``closed_at`` (monotonic time) and sets ``closed``.

Reading from a socket is invisible to the peer, so the reader task keeps
running even when the client "goes silent": ``go_silent()`` only stops every
*write* (including automatic acks) so that, from the broker's point of view,
the client has vanished on a half-open connection while we can still observe
the broker closing the socket.

Every wait in this module takes a timeout; nothing blocks unboundedly.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Any

# Control packet types (MQTT 3.1.1 section 2.2.1)
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

TYPE_NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}

DEFAULT_TIMEOUT = 5.0
DEFAULT_USERNAME = "conformance"  # sent unless a scenario asks for an anonymous CONNECT
_UNSET: Any = object()
MAX_REMAINING_LENGTH = 268_435_455


class MQTTTimeout(AssertionError):
    """An expected packet did not arrive before its deadline."""


class MQTTClosed(AssertionError):
    """The broker closed the connection while we were waiting for a packet."""


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def encode_remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length out of range: {n}")
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            byte |= 0x80
        out.append(byte)
        if not n:
            return bytes(out)


def encode_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    """Frame ``body`` with a fixed header.  ``flags`` is the low nibble, sent verbatim."""
    return bytes([(ptype << 4) | (flags & 0x0F)]) + encode_remaining_length(len(body)) + body


def encode_connect(
    client_id: str = "",
    *,
    clean_session: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
    username: str | None = None,
    password: bytes | str | None = None,
    protocol_name: str = "MQTT",
    protocol_level: int = 4,
) -> bytes:
    flags = 0
    if clean_session:
        flags |= 0x02
    payload = encode_str(client_id)
    if will is not None:
        w_topic, w_payload, w_qos, w_retain = will
        flags |= 0x04 | ((w_qos & 0x03) << 3) | (0x20 if w_retain else 0)
        payload += encode_str(w_topic) + encode_str(w_payload)
    if username is not None:
        flags |= 0x80
        payload += encode_str(username)
    if password is not None:
        flags |= 0x40
        payload += encode_str(password)
    vh = encode_str(protocol_name) + bytes([protocol_level, flags]) + struct.pack("!H", keepalive)
    return packet(CONNECT, 0, vh + payload)


def publish_flags(qos: int = 0, retain: bool = False, dup: bool = False) -> int:
    return (0x08 if dup else 0) | ((qos & 0x03) << 1) | (0x01 if retain else 0)


def encode_publish(
    topic: str,
    payload: bytes = b"",
    *,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
) -> bytes:
    body = encode_str(topic)
    if qos > 0:
        if packet_id is None:
            raise ValueError("QoS>0 PUBLISH needs a packet id")
        body += struct.pack("!H", packet_id)
    body += bytes(payload)
    return packet(PUBLISH, publish_flags(qos, retain, dup), body)


def encode_ack(ptype: int, packet_id: int) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP / UNSUBACK-style 2-byte packet-id packets."""
    flags = 0x02 if ptype == PUBREL else 0  # [MQTT-3.6.1-1]
    return packet(ptype, flags, struct.pack("!H", packet_id))


def encode_subscribe(packet_id: int, topics: list[tuple[str, int]], *, flags: int = 0x02) -> bytes:
    body = struct.pack("!H", packet_id)
    for topic, qos in topics:
        body += encode_str(topic) + bytes([qos])
    return packet(SUBSCRIBE, flags, body)


def encode_unsubscribe(packet_id: int, topics: list[str], *, flags: int = 0x02) -> bytes:
    body = struct.pack("!H", packet_id)
    for topic in topics:
        body += encode_str(topic)
    return packet(UNSUBSCRIBE, flags, body)


def encode_pingreq() -> bytes:
    return packet(PINGREQ, 0, b"")


def encode_disconnect() -> bytes:
    return packet(DISCONNECT, 0, b"")


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


@dataclass
class Packet:
    """A decoded incoming packet.  ``t`` is the monotonic receive time."""

    type: int
    flags: int
    body: bytes
    t: float = 0.0
    packet_id: int | None = None
    topic: str | None = None
    payload: bytes | None = None
    return_codes: list[int] = field(default_factory=list)
    session_present: bool | None = None
    return_code: int | None = None

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type, f"TYPE{self.type}")

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view used in scenario observations."""
        if self.type == PUBLISH:
            return {
                "topic": self.topic,
                "payload": self.payload.decode("utf-8", "replace") if self.payload is not None else None,
                "qos": self.qos,
                "retain": self.retain,
                "dup": self.dup,
                "packet_id": self.packet_id,
            }
        return {"type": self.name, "flags": self.flags, "packet_id": self.packet_id}


def decode(first_byte: int, body: bytes, t: float = 0.0) -> Packet:
    ptype, flags = first_byte >> 4, first_byte & 0x0F
    p = Packet(ptype, flags, body, t)
    if ptype == PUBLISH:
        (tlen,) = struct.unpack_from("!H", body, 0)
        p.topic = body[2 : 2 + tlen].decode("utf-8")
        pos = 2 + tlen
        if p.qos > 0:
            (p.packet_id,) = struct.unpack_from("!H", body, pos)
            pos += 2
        p.payload = body[pos:]
    elif ptype == CONNACK:
        p.session_present = bool(body[0] & 0x01)
        p.return_code = body[1]
    elif ptype == SUBACK:
        (p.packet_id,) = struct.unpack_from("!H", body, 0)
        p.return_codes = list(body[2:])
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK):
        (p.packet_id,) = struct.unpack_from("!H", body, 0)
    return p


async def read_packet(reader: asyncio.StreamReader) -> Packet:
    """Read one packet; raises ``asyncio.IncompleteReadError`` on EOF."""
    first = (await reader.readexactly(1))[0]
    mult, length = 1, 0
    for _ in range(4):
        b = (await reader.readexactly(1))[0]
        length += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    else:
        raise ValueError("malformed remaining length from broker")
    body = await reader.readexactly(length) if length else b""
    return decode(first, body, time.monotonic())


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------


class RawClient:
    """One raw MQTT connection.  Create with ``await RawClient.open(host, port)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = "") -> None:
        self.name = name
        self.default_username: str | None = DEFAULT_USERNAME
        self._reader = reader
        self._writer = writer
        self.auto_ack = True
        self.silent = False
        self.publishes: list[Packet] = []
        self.received: list[Packet] = []  # every packet, in order
        self.closed = asyncio.Event()
        self.closed_at: float | None = None
        self.opened_at = time.monotonic()
        self._changed = asyncio.Event()  # pulsed on every received packet / close
        self._waiters: dict[tuple[int, int | None], asyncio.Future[Packet]] = {}
        self._next_id = 0
        self._task = asyncio.create_task(self._read_loop(), name=f"rawmqtt-reader-{name}")

    @classmethod
    async def open(cls, host: str, port: int, name: str = "", timeout: float = DEFAULT_TIMEOUT) -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer, name)

    # ---------------------------------------------------------------- reader

    async def _read_loop(self) -> None:
        try:
            while True:
                p = await read_packet(self._reader)
                self.received.append(p)
                if p.type == PUBLISH:
                    self.publishes.append(p)
                    if self.auto_ack and not self.silent:
                        if p.qos == 1:
                            self._write(encode_ack(PUBACK, p.packet_id))
                        elif p.qos == 2:
                            self._write(encode_ack(PUBREC, p.packet_id))
                elif p.type == PUBREL and self.auto_ack and not self.silent:
                    self._write(encode_ack(PUBCOMP, p.packet_id))
                key = (p.type, p.packet_id)
                fut = self._waiters.pop(key, None) or self._waiters.pop((p.type, None), None)
                if fut is not None and not fut.done():
                    fut.set_result(p)
                self._pulse()
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, struct.error):
            pass
        except asyncio.CancelledError:
            raise
        finally:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
            self.closed.set()
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(MQTTClosed(f"{self.name}: connection closed by broker"))
            self._waiters.clear()
            self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ---------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        if self.closed.is_set() or self._writer.is_closing():
            return
        try:
            self._writer.write(data)
        except (ConnectionError, OSError, RuntimeError):
            pass

    async def send_raw(self, data: bytes) -> None:
        """Send arbitrary bytes (ignores ``silent``: it's an explicit action)."""
        self._write(data)
        try:
            await asyncio.wait_for(self._writer.drain(), DEFAULT_TIMEOUT)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass

    def next_packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _expect(self, ptype: int, packet_id: int | None = None) -> asyncio.Future[Packet]:
        fut: asyncio.Future[Packet] = asyncio.get_running_loop().create_future()
        if self.closed.is_set():
            fut.set_exception(MQTTClosed(f"{self.name}: connection already closed"))
        else:
            self._waiters[(ptype, packet_id)] = fut
        return fut

    async def _await(self, fut: asyncio.Future[Packet], what: str, timeout: float) -> Packet:
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise MQTTTimeout(f"{self.name}: no {what} within {timeout}s") from None

    # ---------------------------------------------------------------- MQTT verbs

    async def connect(
        self,
        client_id: str = "",
        *,
        clean_session: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes, int, bool] | None = None,
        username: str | None = _UNSET,
        password: bytes | str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Packet:
        """CONNECT and wait for CONNACK.  ``username`` defaults to ``default_username``;
        pass ``username=None`` for a truly anonymous CONNECT (no username flag)."""
        if username is _UNSET:
            username = self.default_username
        fut = self._expect(CONNACK)
        await self.send_raw(
            encode_connect(
                client_id,
                clean_session=clean_session,
                keepalive=keepalive,
                will=will,
                username=username,
                password=password,
            )
        )
        return await self._await(fut, "CONNACK", timeout)

    async def subscribe(
        self, topics: list[tuple[str, int]] | str, qos: int = 0, *, flags: int = 0x02, timeout: float = DEFAULT_TIMEOUT
    ) -> Packet:
        if isinstance(topics, str):
            topics = [(topics, qos)]
        pid = self.next_packet_id()
        fut = self._expect(SUBACK, pid)
        await self.send_raw(encode_subscribe(pid, topics, flags=flags))
        return await self._await(fut, "SUBACK", timeout)

    async def unsubscribe(self, topics: list[str] | str, *, timeout: float = DEFAULT_TIMEOUT) -> Packet:
        if isinstance(topics, str):
            topics = [topics]
        pid = self.next_packet_id()
        fut = self._expect(UNSUBACK, pid)
        await self.send_raw(encode_unsubscribe(pid, topics))
        return await self._await(fut, "UNSUBACK", timeout)

    async def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        *,
        retain: bool = False,
        dup: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Publish and, for QoS>0, complete the acknowledgement flow (bounded by ``timeout``)."""
        if isinstance(payload, str):
            payload = payload.encode()
        if qos == 0:
            await self.send_raw(encode_publish(topic, payload, retain=retain, dup=dup))
            return
        pid = self.next_packet_id()
        fut = self._expect(PUBACK if qos == 1 else PUBREC, pid)
        await self.send_raw(encode_publish(topic, payload, qos=qos, retain=retain, dup=dup, packet_id=pid))
        await self._await(fut, "PUBACK" if qos == 1 else "PUBREC", timeout)
        if qos == 2:
            fut = self._expect(PUBCOMP, pid)
            await self.send_raw(encode_ack(PUBREL, pid))
            await self._await(fut, "PUBCOMP", timeout)

    async def ping(self, timeout: float = DEFAULT_TIMEOUT) -> Packet:
        fut = self._expect(PINGRESP)
        await self.send_raw(encode_pingreq())
        return await self._await(fut, "PINGRESP", timeout)

    async def ack(self, p: Packet) -> None:
        """Manually acknowledge a delivery (for ``auto_ack = False``)."""
        if p.qos == 1:
            await self.send_raw(encode_ack(PUBACK, p.packet_id))
        elif p.qos == 2:
            await self.send_raw(encode_ack(PUBREC, p.packet_id))

    def go_silent(self) -> None:
        """Stop writing anything (no pings, no acks); keep the socket open and keep observing."""
        self.silent = True

    # ---------------------------------------------------------------- observing

    async def wait_for(self, predicate, timeout: float):
        """Wait (bounded) until ``predicate()`` is truthy; returns its value or None on deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return predicate() or None

    async def wait_publishes(self, count: int, timeout: float = DEFAULT_TIMEOUT,
                             topic: str | None = None) -> list[Packet]:
        """Wait until at least ``count`` PUBLISHes (optionally on ``topic``) arrived; return them (maybe fewer)."""

        def matching() -> list[Packet]:
            return [p for p in self.publishes if topic is None or p.topic == topic]

        await self.wait_for(lambda: len(matching()) >= count, timeout)
        return matching()

    async def wait_publish(self, topic: str, payload: bytes | None = None,
                           timeout: float = DEFAULT_TIMEOUT) -> Packet | None:
        def find() -> Packet | None:
            for p in self.publishes:
                if p.topic == topic and (payload is None or p.payload == payload):
                    return p
            return None

        return await self.wait_for(find, timeout)

    async def wait_closed(self, timeout: float) -> float | None:
        """Seconds from ``open`` until the broker closed the socket, or None if still open at the deadline."""
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        return self.closed_at - self.opened_at

    @property
    def is_closed(self) -> bool:
        return self.closed.is_set()

    # ---------------------------------------------------------------- teardown

    async def disconnect(self, wait_close: float = 2.0) -> float | None:
        """Graceful MQTT DISCONNECT; wait (bounded) for the broker to close its side, which
        shows it has processed the DISCONNECT; then close.  Returns seconds until the broker
        closed, or None if it had not within ``wait_close``."""
        t0 = time.monotonic()
        await self.send_raw(encode_disconnect())
        closed = await self.wait_closed(wait_close)
        await self.close()
        return None if closed is None else self.closed_at - t0

    def abort(self) -> None:
        """Abrupt close: no DISCONNECT; the transport is torn down (RST when data is unread)."""
        transport = self._writer.transport
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        await self._stop_reader()

    async def _stop_reader(self) -> None:
        if not self._task.done():
            self._task.cancel()
        try:
            await asyncio.wait_for(asyncio.gather(self._task, return_exceptions=True), 2.0)
        except asyncio.TimeoutError:
            pass

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()
        await self._stop_reader()


async def wait_until(predicate, clients: list[RawClient], timeout: float):
    """Bounded wait until ``predicate()`` is truthy, re-checking whenever any of
    ``clients`` receives a packet or is closed.  Returns the value or None."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        waits = [asyncio.ensure_future(c._changed.wait()) for c in clients]
        try:
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


class ClientSet:
    """Tracks every client a scenario opens so all are torn down, whatever happens."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.clients: list[RawClient] = []

    async def open(self, name: str) -> RawClient:
        c = await RawClient.open(self.host, self.port, name)
        self.clients.append(c)
        return c

    async def connect(self, name: str, client_id: str | None = None, **kw: Any) -> tuple[RawClient, Packet]:
        c = await self.open(name)
        connack = await c.connect(name if client_id is None else client_id, **kw)
        return c, connack

    async def __aenter__(self) -> ClientSet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            c.abort()
        await asyncio.gather(*(c._stop_reader() for c in self.clients), return_exceptions=True)

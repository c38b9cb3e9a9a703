"""A loopback TCP proxy between the firmware process and the real broker that understands MQTT
framing: the test's man in the middle (an attacker on the lock's route, or a slow link).

It forwards whole packets both ways and lets a test
- see every packet (`up`: lock -> broker, `down`: broker -> lock),
- drop or rewrite them (`up_filter` / `down_filter`: return the packet, another one, or None),
- inject packets toward the lock (`inject_down`),
- withhold the broker's PUBACKs to the lock (`hold_pubacks`): the lock's QoS 1 messages arrive,
  but the lock never hears that they did, as on a link that loses the way back,
- stall the lock's uplink entirely (`stall_up()`, `unstall_up()`): the proxy stops reading from the lock, so its
  socket buffers fill and its writes block, as on a link that has stopped moving.

Bounded: one listening socket, one connection pair per accepted lock connection, every queue
is the asyncio stream's own; `close()` ends everything.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

PUBLISH, PUBACK = 0x30, 0x40

Filter = Callable[[bytes], "bytes | None"]


async def read_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole MQTT packet (fixed header included); IncompleteReadError at EOF."""
    first = await reader.readexactly(1)
    header = bytearray(first)
    n = shift = 0
    while True:
        b = (await reader.readexactly(1))[0]
        header.append(b)
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
        if shift > 21:
            raise ValueError("malformed remaining length")
    return bytes(header) + (await reader.readexactly(n) if n else b"")


def _body(packet: bytes) -> bytes:
    i = 1
    while packet[i] & 0x80:
        i += 1
    return packet[i + 1:]


def publish_parts(packet: bytes) -> tuple[str, int, int | None, bytes] | None:
    """(topic, qos, packet id, payload) of a PUBLISH packet, None for any other packet."""
    if packet[0] & 0xF0 != PUBLISH:
        return None
    body = _body(packet)
    n = (body[0] << 8) | body[1]
    topic = body[2:2 + n].decode()
    qos = (packet[0] >> 1) & 3
    i = 2 + n
    pid = None
    if qos:
        pid = (body[i] << 8) | body[i + 1]
        i += 2
    return topic, qos, pid, body[i:]


def publish_packet(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH (what the API sends time replies as)."""
    t = topic.encode()
    body = bytes((len(t) >> 8, len(t) & 0xFF)) + t + payload
    n = len(body)
    header = bytearray((PUBLISH,))
    while True:
        header.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(header) + body


def json_payload(packet: bytes) -> dict | None:
    parts = publish_parts(packet)
    if parts is None:
        return None
    try:
        return json.loads(parts[3])
    except ValueError:
        return None


class MqttProxy:
    """`await start()`, point the firmware at `port`, read `up`/`down`, set the knobs."""

    def __init__(self, broker_host: str, broker_port: int) -> None:
        self.broker = (broker_host, broker_port)
        self.port = 0
        self.up: list[bytes] = []            # lock -> broker, as the lock sent them
        self.down: list[bytes] = []          # broker -> lock, as the broker sent them
        self.up_filter: Filter | None = None
        self.down_filter: Filter | None = None
        self.hold_pubacks = False
        self.held: list[bytes] = []          # PUBACKs withheld while hold_pubacks
        self.flowing = asyncio.Event()       # cleared (stall_up()): stop reading from the lock
        self.flowing.set()
        self.connections = 0
        self.changed = asyncio.Event()       # set whenever a packet was seen
        self._server: asyncio.AbstractServer | None = None
        self._lock_writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> "MqttProxy":
        """Listen on `port` (0: an ephemeral one; a closed proxy's port: the same node back)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, lock_r: asyncio.StreamReader, lock_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            broker_r, broker_w = await asyncio.wait_for(asyncio.open_connection(*self.broker), 10)
        except (OSError, asyncio.TimeoutError):
            lock_w.close()
            return
        self._lock_writers.append(lock_w)
        up = asyncio.ensure_future(self._pump(lock_r, broker_w, upward=True))
        down = asyncio.ensure_future(self._pump(broker_r, lock_w, upward=False))
        self._tasks.update((up, down))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            for w in (lock_w, broker_w):
                w.close()
            if lock_w in self._lock_writers:
                self._lock_writers.remove(lock_w)
            self._tasks.difference_update((up, down))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upward: bool) -> None:
        try:
            while True:
                if upward:
                    await self.flowing.wait()
                packet = await read_packet(reader)
                (self.up if upward else self.down).append(packet)
                self.changed.set()
                if not upward and packet[0] & 0xF0 == PUBACK and self.hold_pubacks:
                    self.held.append(packet)
                    continue
                f = self.up_filter if upward else self.down_filter
                out = f(packet) if f else packet
                if out:
                    writer.write(out)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return

    def stall_up(self) -> None:
        self.flowing.clear()

    def unstall_up(self) -> None:
        self.flowing.set()

    def inject_down(self, packet: bytes) -> None:
        """Send `packet` to every connected lock, as if the broker had sent it."""
        for w in self._lock_writers:
            w.write(packet)

    def drop_lock_connections(self) -> None:
        for w in list(self._lock_writers):
            w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_lock_connections()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

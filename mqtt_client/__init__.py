"""The thin MQTT 3.1.1 client the API and the simulator share, over gmqtt.

gmqtt defaults to MQTT 5, which Latch's broker refuses (CONNACK 1, after which
gmqtt would retry with 3.1.1), so every connection here is MQTT 3.1.1 from the
start. Inbound QoS 1 messages are acknowledged only after the handler returns:
a message the handler did not finish is redelivered by the broker, never lost.
TLS (an mqtts:// broker) is an ``ssl.SSLContext`` passed to ``connect``; reconnects reuse it.

Outbound QoS 1/2 messages are replayed by gmqtt after a reconnect until acknowledged. Two guards keep
one bad message from wedging the shared connection (a broker closes a connection on a packet over its
limit, and MQTT 3.1.1 has no negative ack, so the replay would close it again, forever):
a publish over ``max_packet_size`` raises PublishRefused and is never queued; and a message replayed
``max_replays`` times without being acknowledged (each time the connection died with it in flight; times
the number of nodes for a clustered broker, whose failover alone ends connections a few times in a row)
is dropped from the queue and handed to ``on_dropped(topic, payload)``.

Flow control: MQTT gives one connection 65,535 packet ids, one per unacknowledged QoS 1/2 message; gmqtt
raises OverflowError past that. A bulk sender (a notification to every rider, one QoS 1 message each)
waits with ``room(limit)`` until fewer than ``limit`` are unacknowledged, so it never takes the ids the
connection's other traffic (commands) needs; ``publish`` past the last id raises MqttError, not gmqtt's
OverflowError.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv311
from gmqtt.storage import PersistentStorage

log = logging.getLogger("latch.mqtt")

Handler = Callable[[str, bytes, int, bool], Awaitable[None]]


class MqttError(Exception):
    """Base of this module's errors."""


class MqttConnectError(MqttError):
    """The broker could not be reached or refused the login."""


class LoginRefused(MqttConnectError):
    """The broker answered, and refused this client (CONNACK with a non-zero code)."""


class PublishRefused(MqttError):
    """The message was not queued: the broker would refuse it (too large)."""


def publish_packet_size(topic: str, payload: bytes, qos: int) -> int:
    """Bytes of the PUBLISH packet for `topic` and `payload`, fixed header included."""
    body = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    length_bytes = 1 if body < 128 else 2 if body < 16_384 else 3 if body < 2_097_152 else 4
    return 1 + length_bytes + body


def parse_publish(packet: bytes) -> tuple[str, bytes]:
    """(topic, payload) of a raw QoS 1/2 PUBLISH packet, as gmqtt stores it for replay."""
    i, length, shift = 1, 0, 0
    while True:
        b = packet[i]
        length |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            break
    tlen = int.from_bytes(packet[i:i + 2], "big")
    topic = packet[i + 2:i + 2 + tlen].decode()
    return topic, bytes(packet[i + 2 + tlen + 2:])


class InFlight(PersistentStorage):
    """gmqtt's store of unacknowledged outgoing messages, which also wakes those waiting for room in it."""

    def __init__(self) -> None:
        super().__init__()
        self._room: list[tuple[int, asyncio.Future[None]]] = []   # (limit, waiter)

    def __len__(self) -> int:
        return len(self._messages)

    def __bool__(self) -> bool:   # gmqtt takes `persistent_storage or PersistentStorage()`: never falsy
        return True

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        if self._room:
            self._wake()

    def clear(self) -> None:
        super().clear()
        self._wake()

    def _wake(self) -> None:
        n, waiting = len(self._messages), self._room
        self._room = [(limit, fut) for limit, fut in waiting if n >= limit and not fut.done()]
        for limit, fut in waiting:
            if n < limit and not fut.done():
                fut.set_result(None)

    async def room(self, limit: int) -> None:
        while len(self._messages) >= limit:
            fut = asyncio.get_running_loop().create_future()
            self._room.append((limit, fut))
            await fut


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttClient:
    def __init__(
        self,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = False,
        will: Will | None = None,
        handler: Handler | None = None,
        keepalive: int = 30,
        reconnect_delay: float = 1.0,
        max_packet_size: int | None = None,
        max_replays: int = 3,
        on_dropped: Callable[[str, bytes], None] | None = None,
    ) -> None:
        will_message = None
        if will is not None:
            will_message = gmqtt.Message(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._in_flight = InFlight()
        self._client = gmqtt.Client(client_id, clean_session=clean_session, persistent_storage=self._in_flight,
                                    optimistic_acknowledgement=False, will_message=will_message)
        if username is not None:
            self._client.set_auth_credentials(username, password)
        self._client.set_config({"reconnect_retries": -1, "reconnect_delay": reconnect_delay})
        self._handler = handler
        self._keepalive = keepalive
        self._subscribed: dict[int, asyncio.Future[list[int]]] = {}
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()   # set when a connection ends (the broker closed it, or we did)
        self.client_id = client_id
        self.on_connect_callbacks: list[Callable[[bool], None]] = []
        self._refused: int | None = None
        self.max_packet_size = max_packet_size
        self.max_replays = max_replays
        self._replay_limit = max_replays   # max_replays per node of the broker (connect)
        self.on_dropped = on_dropped
        self._replays: dict[int, int] = {}     # mid -> times replayed after a reconnect, unacknowledged
        self._addresses: list[tuple[str, int]] = []   # the broker's nodes (connect's fallbacks), and which one
        self._at = 0
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe

    async def connect(self, host: str, port: int, *, tls: ssl.SSLContext | bool = False,
                      timeout: float = 10.0, fallbacks: Sequence[tuple[str, int]] = ()) -> None:
        """Connect to `host:port`. `fallbacks`: other nodes of the same (clustered) broker, which keeps this
        client's session: tried in order when the first cannot be reached, and, once connected, moved to one
        after another whenever the node of a lost connection does not take it back (gmqtt's reconnect loop
        tries the next address after each failed attempt). A refused login is not a node's failure: raised."""
        self._addresses = [(host, port), *fallbacks]
        # on a cluster, one node's death ends the connection several times in a row whatever is in flight (NATS,
        # measured: 3+ times in the ~9 s its JetStream takes to elect new leaders, each a QoS 1 publish that
        # could not be stored): a message counts as the cause only after max_replays deaths per node
        self._replay_limit = self.max_replays * len(self._addresses)
        failed: list[str] = []
        for i, (h, p) in enumerate(self._addresses):
            try:
                await self._connect_one(h, p, tls, timeout)
            except MqttConnectError as e:
                if isinstance(e, LoginRefused) or i == len(self._addresses) - 1:
                    if failed:
                        raise MqttConnectError(f"{e}; also tried: {'; '.join(failed)}") from e
                    raise
                failed.append(str(e))
                continue
            self._at = i
            break
        if len(self._addresses) > 1:
            self._fail_over_on_reconnect()

    def _fail_over_on_reconnect(self) -> None:
        create = self._client._create_connection

        async def create_or_move_on(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
            try:
                return await create(host, port, *args, **kwargs)
            except OSError:
                self._at = (self._at + 1) % len(self._addresses)
                self._client._host, self._client._port = self._addresses[self._at]
                log.info("%s: broker node %s:%d does not answer; next: %s:%d", self.client_id, host, port,
                         *self._addresses[self._at])
                raise

        self._client._create_connection = create_or_move_on   # type: ignore[method-assign]

    @property
    def address(self) -> tuple[str, int]:
        """The broker address this client connects (or reconnects) to now."""
        return self._addresses[self._at]

    async def _connect_one(self, host: str, port: int, tls: ssl.SSLContext | bool, timeout: float) -> None:
        try:
            await asyncio.wait_for(
                self._client.connect(host, port, ssl=tls, keepalive=self._keepalive, version=MQTTv311),
                timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise MqttConnectError(f"cannot connect to MQTT broker at {host}:{port}: {e!r}") from e
        except Exception as e:  # gmqtt raises its own types for a refused CONNACK
            raise LoginRefused(f"MQTT broker at {host}:{port} refused {self.client_id!r}: {e}") from e
        if self._refused:
            raise LoginRefused(f"MQTT broker at {host}:{port} refused {self.client_id!r} (code {self._refused})")

    async def disconnect(self) -> None:
        self.connected.clear()
        try:
            await self._client.disconnect()
        except Exception:  # already gone: nothing left to close
            log.debug("disconnect of %s failed", self.client_id, exc_info=True)

    async def subscribe(self, filters: list[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        """Subscribe and wait for the SUBACK; returns the granted QoS per filter (128 = refused)."""
        subs = [gmqtt.Subscription(t, qos=q) for t, q in filters]
        mid = self._client.subscribe(subs)
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._subscribed[mid] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._subscribed.pop(mid, None)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; PublishRefused when it is larger than the broker takes, MqttError when the
        client is not connected (nothing queued either way)."""
        if self.max_packet_size is not None:
            size = publish_packet_size(topic, payload, qos)
            if size > self.max_packet_size:
                raise PublishRefused(f"a {size}-byte message is over the broker's {self.max_packet_size}-byte "
                                     f"packet limit")
        if self._client._connection is None:
            raise MqttError("not connected to the broker")
        try:
            self._client.publish(topic, payload, qos=qos, retain=retain)
        except OverflowError as e:   # gmqtt: no packet id left
            raise MqttError(f"{len(self._in_flight)} messages already wait for the broker's acknowledgement, the "
                            f"most one MQTT connection can have; nothing was queued") from e

    @property
    def in_flight(self) -> int:
        """Outgoing QoS 1/2 messages not yet acknowledged by the broker (kept across a reconnect)."""
        return len(self._in_flight)

    async def room(self, limit: int) -> None:
        """Return once fewer than `limit` messages are unacknowledged (at once when they already are)."""
        await self._in_flight.room(limit)

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected

    # gmqtt callbacks
    def _on_connect(self, client: gmqtt.Client, flags: int, rc: int, properties: dict) -> None:
        _cork(client)
        self.disconnected.clear()
        self.connected.set()
        if flags:   # session present: gmqtt replays the unacknowledged messages right after this
            self._drop_poison()
        for cb in self.on_connect_callbacks:
            cb(bool(flags))

    def _on_disconnect(self, client: gmqtt.Client, packet: bytes | None, exc: Exception | None = None) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _drop_poison(self) -> None:
        """Count this replay for every unacknowledged message; drop those replayed max_replays times."""
        storage = self._client._persistent_storage
        inflight = dict(storage.get_all())
        for mid in list(self._replays):
            if mid not in inflight:     # acknowledged since
                del self._replays[mid]
        for mid, packet in inflight.items():
            n = self._replays[mid] = self._replays.get(mid, 0) + 1
            if n <= self._replay_limit:
                continue
            storage.remove_message_by_mid(mid)
            del self._replays[mid]
            try:
                topic, payload = parse_publish(packet)
            except (IndexError, UnicodeDecodeError):
                topic, payload = "", b""
            log.warning("dropped a message on %r: the connection died %d times with it unacknowledged",
                        topic, self._replay_limit)
            if self.on_dropped is not None and topic:
                self.on_dropped(topic, payload)

    def _on_subscribe(self, client: gmqtt.Client, mid: int, qos: tuple[int, ...], properties: dict) -> None:
        fut = self._subscribed.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(list(qos))

    async def _on_message(self, client: gmqtt.Client, topic: str, payload: bytes, qos: int,
                          properties: dict) -> int:
        if self._handler is not None:
            try:
                await self._handler(topic, payload, qos, bool(properties.get("retain")))
            except Exception:
                # one bad message must not wedge the session by being redelivered forever
                log.exception("handler failed for a message on %s", topic)
        return 0


class CorkedTransport:
    """The connection's transport, with every packet written during one loop iteration sent in one write.

    gmqtt writes each packet (a PUBACK per message received, each PUBLISH) with its own `transport.write`,
    a send() system call each; profiled on the API's command path these were a quarter of its samples.
    Packets keep their order; they leave at the end of the loop iteration that made them (microseconds
    later), so nothing waits on a timer."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._buffer:
            self._loop.call_soon(self.flush)
        self._buffer.append(data)

    def flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._buffer = []
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> object:   # is_closing, abort, get_extra_info ...: the transport's
        return getattr(self.transport, name)


def _cork(client: gmqtt.Client) -> None:
    """Put the connection on a CorkedTransport (once per connection: a reconnect makes a new one). The
    connection's own reference too, so its close() sends what is corked (a DISCONNECT) before closing."""
    connection = getattr(client, "_connection", None)
    protocol = getattr(connection, "_protocol", None)
    transport = getattr(protocol, "_transport", None)
    if transport is not None and not isinstance(transport, CorkedTransport):
        corked = CorkedTransport(transport, asyncio.get_running_loop())
        protocol._transport = corked
        if getattr(connection, "_transport", None) is transport:
            connection._transport = corked


def drop_connection(client: MqttClient) -> None:
    """Cut the TCP connection without a DISCONNECT, as a lock losing power would (the will fires)."""
    gm = client._client
    gm._is_active = False          # no automatic reconnect after this
    conn = gm._connection
    if conn is not None:
        conn._transport.abort()
    client.connected.clear()

"""Latch's MQTT 3.1.1 broker core: sessions, routing, delivery, retained messages, wills, limits.

This replaces amqtt's broker core (``amqtt.broker.Broker``, its session
manager, protocol handlers and plugins) rather than patching it; see
docs/broker.md for why and for what each amqtt defect became. Nothing here
imports amqtt.

Shape of the code
-----------------
* ``Connection`` is an ``asyncio.Protocol``: bytes in, complete packets cut
  from the buffer and handled synchronously in ``data_received``. No task per
  connection or per packet; the only task a connection may start is the
  credential lookup of its CONNECT.
* Output is batched: packets for a connection are collected during one loop
  iteration and written with one ``transport.write`` at its end.
* ``BrokerCore`` owns the sessions, the subscription index (broker/index.py),
  the retained messages and the store (broker/store.py). Everything that tells
  a client "done" (CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK) or hands a
  message to a subscriber goes through ``store.after``: it happens once the
  state change behind it is durable, in the order it was decided.
* A timer every ``SWEEP_S`` closes connections that did not CONNECT within
  ``connect_timeout`` or were silent for 1.5 x their keepalive (their will is
  published), and expires persistent sessions.

Delivery semantics (MQTT 3.1.1, matching Mosquitto 2.0 where the spec leaves room)
-------------------------------------------------------------------------------
* delivered QoS = min(publish QoS, granted QoS); one copy per session at the
  highest QoS among its matching filters; RETAIN=1 only for retained messages
  sent because of a new subscription;
* QoS 1/2 messages for a session go through its queue (bounded by
  ``max_queued``, policy ``drop-new`` or ``drop-oldest``) into its in-flight
  window (``max_inflight``); unacknowledged ones are resent with DUP=1 and
  the same packet id when the session resumes; QoS 0 is never queued for an
  offline session;
* a persistent session's packet id for a queued message is
  ``seq % 65535 + 1``, fixed when the message is queued and stored with it,
  so a redelivery after a crash carries the id the receiver may have seen.

Why one module of ~1,050 lines, for now: ``Connection`` and ``BrokerCore`` use about twenty of each other's
members on every packet, and the broker's speed rests on those being plain attribute reads; issue 16 asks for a
split along connection handling, session state and routing, which needs a protocol on one side to keep the
imports acyclic without costing a lookup per packet. It is the next step there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from broker import codec
from broker import store as st
from broker.codec import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    ProtocolError,
    encode_ack,
    encode_connack,
    encode_publish,
    encode_suback,
)
from broker.fence import Gatekeeper, TopicFence, may_own
from broker.identity import Identity, Role
from broker.index import SubscriptionIndex, is_wildcard, topic_matches
from protocol import topics

log = logging.getLogger("latch.broker")

SWEEP_S = 0.5
SESSION_SWEEP_S = 60.0
KEEPALIVE_FACTOR = 1.5
THROTTLE_OVERSHOOT = 10


@dataclass
class Limits:
    """The broker's fences. Each is also a `latch broker` option (see docs/broker.md)."""

    connect_timeout: float = 10.0        # seconds from TCP accept to a CONNECT that was answered
    max_packet_size: int = 1 << 20       # bytes (whole packet); bigger -> connection closed
    max_inflight: int = 100              # unacknowledged QoS 1/2 messages per session (outgoing)
    max_queued: int = 1000               # QoS 1/2 messages waiting behind the in-flight window
    service_max_inflight: int = 1000     # the same two for the service identity (the API): it consumes
    service_max_queued: int = 1_000_000  # every device's uplink through one session
    queue_policy: str = "drop-new"       # when the queue is full: "drop-new" or "drop-oldest"
    max_qos2_in: int = 1000              # incoming QoS 2 messages awaiting PUBREL per session
    max_subscriptions: int = 1000        # filters per session; more -> SUBACK failure (0x80)
    session_expiry: float = 7 * 86400.0  # seconds a disconnected persistent session is kept (0 = forever)
    write_buffer_high: int = 512 * 1024  # bytes buffered for a slow reader before QoS 0 to it is dropped
    sys_interval: float = 10.0           # seconds between $SYS/broker/... updates (0 = none)
    throttle_timeout: float = 5.0        # longest a publisher waits for a full online queue (0 = never: drop)

    def __post_init__(self) -> None:
        if self.queue_policy not in ("drop-new", "drop-oldest"):
            raise ValueError("queue_policy must be 'drop-new' or 'drop-oldest'")
        for n in (self.max_inflight, self.service_max_inflight):
            if not 0 < n <= 30000:
                raise ValueError("an in-flight window must be 1..30000 (packet ids are 16 bits)")
        if self.max_queued < 0 or self.service_max_queued < 0:
            raise ValueError("a queue limit cannot be negative")


class Delivery:
    """A QoS 1/2 message on its way to one session."""

    __slots__ = ("seq", "pid", "topic", "topic_b", "payload", "qos", "retain", "dup", "state", "ready")

    def __init__(self, seq: int, topic: str, topic_b: bytes, payload: bytes, qos: int, retain: bool,
                 ready: int) -> None:
        self.seq = seq
        self.pid = seq % 65535 + 1
        self.topic = topic
        self.topic_b = topic_b
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = False
        self.state = 0          # 0: PUBLISH sent / to send; 1: PUBREC received, PUBREL sent
        self.ready = ready      # the store batch that must be durable before it is sent


class Session:
    __slots__ = ("client_id", "persistent", "identity", "receive_check", "subs", "conn", "queue", "inflight",
                 "next_seq", "qos2_in", "expires_at", "dropped", "pump_pending", "max_inflight", "max_queued",
                 "throttled", "throttle_since", "stuck")

    def __init__(self, client_id: str, persistent: bool, identity: Identity | None, fence: TopicFence,
                 limits: Limits) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.identity = identity
        self.receive_check = fence.receive_check(identity) if identity is not None else _deny_all
        self.max_inflight = self.max_queued = 0
        self.set_limits(limits)
        self.subs: dict[str, int] = {}
        self.conn: Connection | None = None
        self.queue: deque[Delivery] = deque()
        self.inflight: dict[int, Delivery] = {}
        self.next_seq = 0
        self.qos2_in: set[int] = set()
        self.expires_at: float | None = None
        self.dropped = 0
        self.pump_pending = False
        self.throttled: set[Connection] | None = None   # publishers paused until this queue drains
        self.throttle_since = 0.0
        self.stuck = False      # its consumer did not drain the queue in time: the drop policy applies

    def set_limits(self, limits: Limits) -> None:
        if self.identity is not None and self.identity.role is Role.SERVICE:
            self.max_inflight, self.max_queued = limits.service_max_inflight, limits.service_max_queued
        else:
            self.max_inflight, self.max_queued = limits.max_inflight, limits.max_queued


def _deny_all(topic: str) -> bool:
    return False


NEW, AUTH, CONNECTED, GONE = 0, 1, 2, 3


class Connection(asyncio.Protocol):
    """One client connection (TCP, TLS or WebSocket through a transport shim)."""

    __slots__ = ("core", "transport", "state", "buf", "out", "session", "identity", "keepalive", "last_rx",
                 "opened", "will", "graceful", "paused", "cert_name", "clean", "peer", "throttles")

    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self.transport: Any = None
        self.state = NEW
        self.buf = b""
        self.out: list[bytes] = []
        self.session: Session | None = None
        self.identity: Identity | None = None
        self.keepalive = 0
        self.last_rx = self.opened = time.monotonic()
        self.will: tuple[str, bytes, int, bool] | None = None
        self.graceful = False
        self.paused = False
        self.cert_name: str | None = None
        self.clean = True
        self.peer: Any = None
        self.throttles = 0      # online sessions whose full queue this publisher is waiting for

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        core = self.core
        core.conns.add(self)
        core.stats["connections_total"] += 1
        try:
            transport.set_write_buffer_limits(high=core.limits.write_buffer_high)
        except (AttributeError, NotImplementedError):
            pass
        if core.want_client_certs:
            self.cert_name = _cert_common_name(transport.get_extra_info("peercert"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._gone()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        s = self.session
        if s is not None and s.conn is self:
            self.core.pump(s)

    def data_received(self, data: bytes) -> None:
        if self.state == GONE:
            return
        self.last_rx = time.monotonic()
        if self.buf:
            data = self.buf + data
            self.buf = b""
        try:
            self._parse(data)
        except ProtocolError as e:
            self.violation(str(e))
        except Exception:   # a bug here must cost one connection, not the broker
            log.exception("closing %s after an internal error", self._name())
            self.abort()

    # ------------------------------------------------------------------ parsing

    def _parse(self, data: bytes) -> None:
        n = len(data)
        i = 0
        max_size = self.core.limits.max_packet_size
        while i < n:
            state = self.state
            if state == AUTH or self.throttles:
                break           # not now: after the CONNACK, or once the queue it fills has drained
            if state == GONE:
                return
            first = data[i]
            if state == NEW and first >> 4 != CONNECT:
                raise ProtocolError("first packet is not CONNECT")  # [MQTT-3.1.0-1]
            j = i + 1
            rl = 0
            shift = 0
            while True:
                if j >= n:
                    self.buf = data[i:]
                    return
                b = data[j]
                j += 1
                rl |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
                if shift == 28:
                    raise ProtocolError("remaining length longer than 4 bytes")
            if rl + (j - i) > max_size:
                raise ProtocolError(f"packet of {rl + j - i} bytes exceeds the {max_size} byte limit")
            end = j + rl
            if end > n:
                self.buf = data[i:]
                return
            self._handle(first, data[j:end])
            i = end
        if i < n:
            self.buf = data[i:]
            if len(self.buf) > 2 * max_size:   # a client racing ahead of its own CONNACK
                self.transport.pause_reading()

    def _handle(self, first: int, body: bytes) -> None:
        ptype = first >> 4
        flags = first & 0x0F
        if ptype == PUBLISH:
            if flags & 0x06 == 0x06:
                raise ProtocolError("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
            self._on_publish(flags, body)
            return
        want = codec.CLIENT_FLAGS.get(ptype)
        if want is None:
            raise ProtocolError(f"packet type {ptype} not allowed from a client")
        if flags != want:
            raise ProtocolError(f"reserved flags {flags:#06b} on packet type {ptype}")  # [MQTT-2.2.2-2]
        if ptype == PUBACK:
            self.core.on_puback(self.session, codec.decode_packet_id(body))
        elif ptype == PUBREC:
            self.core.on_pubrec(self, codec.decode_packet_id(body))
        elif ptype == PUBREL:
            self._on_pubrel(codec.decode_packet_id(body))
        elif ptype == PUBCOMP:
            self.core.on_pubcomp(self.session, codec.decode_packet_id(body))
        elif ptype == PINGREQ:
            if body:
                raise ProtocolError("PINGREQ with a body")
            self.core.after(self.send, codec.PINGRESP_BYTES)
        elif ptype == SUBSCRIBE:
            pid, filters = codec.decode_subscribe(body)
            self.core.subscribe(self, pid, filters)
        elif ptype == UNSUBSCRIBE:
            pid, filters = codec.decode_unsubscribe(body)
            self.core.unsubscribe(self, pid, filters)
        elif ptype == DISCONNECT:
            if body:
                raise ProtocolError("DISCONNECT with a body")
            self.graceful = True
            self.will = None
            self.close()
        elif ptype == CONNECT:
            if self.state != NEW:
                raise ProtocolError("second CONNECT")  # [MQTT-3.1.0-2]
            self._on_connect(body)

    # ------------------------------------------------------------------ packets

    def _on_connect(self, body: bytes) -> None:
        c = codec.decode_connect(body)
        if c.level != codec.PROTOCOLS[c.protocol_name]:
            self._refuse(codec.REFUSED_PROTOCOL_VERSION)  # [MQTT-3.1.2-2]
            return
        client_id = c.client_id
        if not client_id:
            if not c.clean_session:
                self._refuse(codec.REFUSED_IDENTIFIER)  # [MQTT-3.1.3-8]
                return
            client_id = "auto-" + uuid.uuid4().hex
        self.keepalive = c.keepalive
        self.clean = c.clean_session
        self.state = AUTH
        gate = self.core.gatekeeper
        verdict = gate.check_now(client_id, c.username, c.password, self.cert_name)
        if verdict is None:
            task = asyncio.get_running_loop().create_task(self._check(gate, client_id, c))
            self.core.tasks.add(task)
            task.add_done_callback(self.core.tasks.discard)
        else:
            self._admit(client_id, c, verdict)

    async def _check(self, gate: Gatekeeper, client_id: str, c: codec.Connect) -> None:
        try:
            verdict: Identity | int = await gate.check(client_id, c.username, c.password, self.cert_name)
        except Exception:
            log.exception("credential check failed")
            verdict = codec.REFUSED_UNAVAILABLE
        self._admit(client_id, c, verdict)

    def _admit(self, client_id: str, c: codec.Connect, verdict: Identity | int) -> None:
        if self.state != AUTH:
            return
        if isinstance(verdict, int):
            self._refuse(verdict)
            return
        core = self.core
        if c.will_topic is not None:
            if not core.fence.may_publish(verdict, c.will_topic) or c.will_topic.startswith("$SYS"):
                self._refuse(codec.REFUSED_NOT_AUTHORIZED)
                return
            self.will = (c.will_topic, c.will_payload, c.will_qos, c.will_retain)
        self.identity = verdict
        refusal = core.attach(self, client_id, verdict, c.clean_session)
        if refusal:
            self.will = None
            self._refuse(refusal)

    def connected(self, session_present: bool) -> None:
        """Runs once the session's state is durable: CONNACK, then what the session owes the client."""
        if self.state != AUTH:
            return
        self.state = CONNECTED
        self.send(encode_connack(session_present, 0))
        s = self.session
        if s is not None:
            self.core.resume(s)
        if self.buf and self.state == CONNECTED:
            data, self.buf = self.buf, b""
            self.transport.resume_reading()
            try:
                self._parse(data)
            except ProtocolError as e:
                self.violation(str(e))

    def taken_over(self) -> None:
        """Another connection took this session: publish this one's will, close, let go of the session."""
        s = self.session
        self.session = None
        if s is not None and s.conn is self:
            s.conn = None
        if self.will is not None and not self.graceful:
            self.core.publish_will(self)
        self.close()

    def _refuse(self, rc: int) -> None:
        self.core.stats["connects_refused"] += 1
        self.send(encode_connack(False, rc))
        self.graceful = True
        self.close()

    def _on_publish(self, flags: int, body: bytes) -> None:
        if self.state != CONNECTED:
            raise ProtocolError("PUBLISH before CONNACK")
        topic, pid, payload = codec.decode_publish(flags, body)
        qos = (flags >> 1) & 3
        core = self.core
        s = self.session
        if qos == 2:
            assert s is not None
            if pid in s.qos2_in:        # a resent QoS 2 PUBLISH we already routed: acknowledge only
                core.after(self.send, encode_ack(PUBREC, pid))
                return
            if len(s.qos2_in) >= core.limits.max_qos2_in:
                raise ProtocolError(f"more than {core.limits.max_qos2_in} QoS 2 messages awaiting PUBREL")
            s.qos2_in.add(pid)
            if s.persistent:
                core.store.op(st.QOS2_IN_INSERT, (s.client_id, pid))
        core.stats["messages_received"] += 1
        core.rx_qos[qos] += 1
        assert self.identity is not None
        if self.identity.role is Role.SERVICE and topic.startswith(topics.SVC_PREFIX):
            core.service_request(topic, payload)   # to the broker itself: never routed
        elif core.fence.may_publish(self.identity, topic) and not topic.startswith("$SYS"):
            core.publish(topic, payload, qos, bool(flags & 1), self)
        else:
            core.stats["publishes_denied"] += 1
        if qos == 1:
            core.after(self.send, encode_ack(PUBACK, pid))
        elif qos == 2:
            core.after(self.send, encode_ack(PUBREC, pid))

    def _on_pubrel(self, pid: int) -> None:
        s = self.session
        if s is None or self.state != CONNECTED:
            raise ProtocolError("PUBREL before CONNACK")
        if pid in s.qos2_in:
            s.qos2_in.discard(pid)
            if s.persistent:
                self.core.store.op(st.QOS2_IN_DELETE, (s.client_id, pid))
        self.core.after(self.send, encode_ack(PUBCOMP, pid))

    # ------------------------------------------------------------------ output and closing

    def send(self, data: bytes) -> None:
        if self.state == GONE:
            return
        out = self.out
        if not out:
            self.core.dirty(self)
        out.append(data)

    def flush(self) -> None:
        out = self.out
        if out and self.state != GONE:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        self.out = []

    def violation(self, why: str) -> None:
        """A protocol violation: close the connection (the will is published)."""
        self.core.stats["protocol_violations"] += 1
        if log.isEnabledFor(logging.INFO):
            log.info("closing %s: %s", self._name(), why)
        self.close()

    def close(self) -> None:
        if self.state == GONE:
            return
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out = []
        self.transport.close()
        self._gone()

    def abort(self) -> None:
        if self.state == GONE:
            return
        self.out = []
        self.transport.abort()
        self._gone()

    def _gone(self) -> None:
        if self.state == GONE:
            return
        self.state = GONE
        self.out = []
        core = self.core
        core.conns.discard(self)
        s = self.session
        self.session = None
        if s is not None and s.conn is self:
            core.detach(s, self)

    def _name(self) -> str:
        s = self.session
        if s is not None:
            return f"client {s.client_id!r}"
        try:
            return f"connection from {self.transport.get_extra_info('peername')}"
        except Exception:  # noqa: BLE001
            return "a connection"


def _cert_common_name(cert: Any) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class BrokerCore:
    def __init__(self, limits: Limits, gatekeeper: Gatekeeper, fence: TopicFence,
                 store: st.MemoryStore | st.SqliteStore, *, want_client_certs: bool = False) -> None:
        self.limits = limits
        self.gatekeeper = gatekeeper
        self.fence = fence
        self.store = store
        self.after = store.after
        self.want_client_certs = want_client_certs
        self.sessions: dict[str, Session] = {}
        self.index = SubscriptionIndex()
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.conns: set[Connection] = set()
        self.throttling: set[Session] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stats: dict[str, int] = dict.fromkeys((
            "connections_total", "connects_refused", "messages_received", "messages_sent", "publishes_denied",
            "dropped_queue_full", "dropped_slow_consumer", "protocol_violations", "keepalive_timeouts",
            "connect_timeouts", "takeovers", "sessions_expired", "wills_published", "publishers_throttled",
            "connections_dropped_on_revoke"), 0)
        self.rx_qos = [0, 0, 0]   # PUBLISH received / sent by QoS (broker/metrics.py reads them)
        self.tx_qos = [0, 0, 0]
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._next_session_sweep = 0.0
        self._next_sys = 0.0
        self.started_at = time.time()

    # ------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._load(self.store.load())
        self.store.start(loop)
        self._next_session_sweep = time.monotonic() + SESSION_SWEEP_S
        self._next_sys = time.monotonic() + self.limits.sys_interval if self.limits.sys_interval else float("inf")
        self.expire_sessions()
        self._timer = loop.call_later(SWEEP_S, self._sweep)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self.tasks):
            task.cancel()
        for c in list(self.conns):
            c.will = None          # a broker shutting down is not the clients' fault
            c.close()
        self._flush()
        await self.store.close()

    def _load(self, snap: st.Snapshot) -> None:
        fence = self.fence
        for client_id, expires_at, role, name in snap.sessions:
            identity = Identity(Role(role), name) if role else None
            s = Session(client_id, True, identity, fence, self.limits)
            s.expires_at = expires_at if expires_at is not None else time.time() + self._expiry()
            self.sessions[client_id] = s
        for client_id, flt, qos in snap.subscriptions:
            s = self.sessions.get(client_id)
            if s is not None:
                s.subs[flt] = qos
                self.index.add(flt, s, qos)
        for client_id, seq, topic, payload, qos, state in snap.queue:
            s = self.sessions.get(client_id)
            if s is None:
                continue
            d = Delivery(seq, topic, topic.encode(), bytes(payload or b""), qos, False, 0)
            if state == 1:
                d.state = 1
                d.dup = True
                s.inflight[d.pid] = d
            else:
                d.dup = len(s.queue) < s.max_inflight   # may have been sent before the restart
                s.queue.append(d)
            s.next_seq = seq + 1
        for client_id, pid in snap.qos2_in:
            s = self.sessions.get(client_id)
            if s is not None:
                s.qos2_in.add(pid)
        for topic, payload, qos in snap.retained:
            self.retained[topic] = (bytes(payload), qos)
        if snap.sessions or snap.retained:
            log.info("broker store: %d persistent sessions, %d queued messages, %d retained messages loaded",
                     len(snap.sessions), len(snap.queue), len(snap.retained))

    def _expiry(self) -> float:
        return self.limits.session_expiry or float("inf")

    # ------------------------------------------------------------------ output batching

    def dirty(self, c: Connection) -> None:
        self._dirty.append(c)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for c in dirty:
            c.flush()

    # ------------------------------------------------------------------ sessions

    def attach(self, conn: Connection, client_id: str, identity: Identity, clean: bool) -> int:
        """Bind `conn` to its session (new, resumed or taken over); 0 or a CONNACK refusal code."""
        store = self.store
        old = self.sessions.get(client_id)
        present = False
        if old is not None and old.conn is None and old.expires_at is not None and old.expires_at <= time.time():
            self.stats["sessions_expired"] += 1
            self.discard(old)
            old = None
        if old is not None:
            verdict = may_own(old.identity, identity)
            if verdict is False:
                log.info("refused %r: client id %r belongs to another identity", identity.name, client_id)
                return codec.REFUSED_IDENTIFIER
            if old.conn is not None:
                self.stats["takeovers"] += 1
                old.conn.taken_over()
            if verdict is None or clean or not old.persistent:
                self.discard(old)
                old = None
        if old is not None:
            s = old
            present = True
            s.identity = identity
            s.receive_check = self.fence.receive_check(identity)
            s.set_limits(self.limits)
        else:
            s = Session(client_id, not clean, identity, self.fence, self.limits)
            self.sessions[client_id] = s
        s.conn = conn
        s.expires_at = None
        conn.session = s
        if s.persistent:
            store.op(st.SESSION_UPSERT, (client_id, None, identity.role.value, identity.name))
        self.after(conn.connected, present)
        return 0

    def resume(self, s: Session) -> None:
        """After CONNACK: resend what is in flight (DUP=1, same packet ids), then the queue."""
        c = s.conn
        if c is None:
            return
        for d in s.inflight.values():
            if d.state == 1:
                c.send(encode_ack(PUBREL, d.pid))
            else:
                c.send(encode_publish(d.topic_b, d.payload, d.qos, d.retain, True, d.pid))
                d.dup = True
        self.pump(s)

    def detach(self, s: Session, c: Connection) -> None:
        """The session's connection is gone (not by takeover)."""
        s.conn = None
        if s.throttled is not None:
            self._release(s, force=True)
        if c.will is not None and not c.graceful:
            self.publish_will(c)
        if s.persistent:
            s.expires_at = time.time() + self._expiry()
            ident = s.identity
            self.store.op(st.SESSION_UPSERT, (s.client_id, s.expires_at if s.expires_at != float("inf") else None,
                                              ident.role.value if ident else None, ident.name if ident else None))
        else:
            self.discard(s)

    def discard(self, s: Session) -> None:
        if s.throttled is not None:
            self._release(s, force=True)
        for flt in s.subs:
            self.index.remove(flt, s)
        s.subs = {}
        s.queue.clear()
        s.inflight.clear()
        if self.sessions.get(s.client_id) is s:
            del self.sessions[s.client_id]
        if s.persistent:
            self.store.op(st.SESSION_DELETE, (s.client_id,))

    def expire_sessions(self) -> None:
        now = time.time()
        for s in [s for s in self.sessions.values()
                  if s.conn is None and s.expires_at is not None and s.expires_at <= now]:
            self.stats["sessions_expired"] += 1
            self.discard(s)

    def service_request(self, topic: str, payload: bytes) -> None:
        """The API's requests to the broker (protocol/topics.py, latch/v1/svc/...)."""
        device_id = topics.parse_drop_topic(topic)
        if device_id is None:
            log.warning("ignored an unknown service request on %r", topic[:120])
            return
        self.drop_device(device_id, payload.decode(errors="replace")[:40] or "revoked")

    def drop_device(self, device_id: str, why: str) -> int:
        """Close every connection logged in as `device_id` (its credentials were revoked or rotated, so
        its next login is refused or needs the new secret). The will is published, as for any
        connection lost without DISCONNECT: the device shows offline. Returns how many were closed."""
        dropped = [s.conn for s in self.sessions.values()
                   if s.conn is not None and s.identity is not None and s.identity.role is Role.DEVICE
                   and s.identity.name == device_id]
        for conn in dropped:
            log.info("closing %s: credentials %s", conn._name(), why)
            conn.close()
        self.stats["connections_dropped_on_revoke"] += len(dropped)
        return len(dropped)

    def publish_will(self, c: Connection) -> None:
        will, c.will = c.will, None
        if will is None:
            return
        self.stats["wills_published"] += 1
        topic, payload, qos, retain = will
        self.publish(topic, payload, qos, retain)

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, c: Connection, pid: int, filters: list[tuple[str, int]]) -> None:
        s = c.session
        if s is None or c.state != CONNECTED:
            raise ProtocolError("SUBSCRIBE before CONNACK")
        codes = []
        granted = []
        fence = self.fence
        identity = c.identity
        assert identity is not None
        for flt, qos in filters:
            if not fence.may_subscribe(identity, flt) or (
                    flt not in s.subs and len(s.subs) >= self.limits.max_subscriptions):
                codes.append(codec.SUBACK_FAILURE)
                continue
            s.subs[flt] = qos
            self.index.add(flt, s, qos)
            if s.persistent:
                self.store.op(st.SUB_UPSERT, (s.client_id, flt, qos))
            codes.append(qos)
            granted.append((flt, qos))
        self.after(c.send, encode_suback(pid, codes))
        for flt, qos in granted:      # [MQTT-3.3.1-6]: retained messages for each new subscription
            self._send_retained(s, flt, qos)

    def _send_retained(self, s: Session, flt: str, granted: int) -> None:
        if not self.retained:
            return
        if is_wildcard(flt):
            found = [(t, v) for t, v in self.retained.items() if topic_matches(flt, t)]
        else:
            v = self.retained.get(flt)
            found = [(flt, v)] if v is not None else []
        check = s.receive_check
        for topic, (payload, qos) in found:
            if check is not None and not check(topic):
                continue
            q = qos if qos < granted else granted
            self.deliver(s, topic, topic.encode(), payload, q, True)

    def unsubscribe(self, c: Connection, pid: int, filters: list[str]) -> None:
        s = c.session
        if s is None or c.state != CONNECTED:
            raise ProtocolError("UNSUBSCRIBE before CONNACK")
        for flt in filters:
            if s.subs.pop(flt, None) is not None:
                self.index.remove(flt, s)
                if s.persistent:
                    self.store.op(st.SUB_DELETE, (s.client_id, flt))
        self.after(c.send, encode_ack(UNSUBACK, pid))

    # ------------------------------------------------------------------ routing and delivery

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, origin: Connection | None = None) -> None:
        if retain:
            sys = topic.startswith("$SYS")
            if payload:
                self.retained[topic] = (payload, qos)
                if not sys:
                    self.store.op(st.RETAIN_SET, (topic, payload, qos))
            elif self.retained.pop(topic, None) is not None and not sys:
                self.store.op(st.RETAIN_DELETE, (topic,))
        matches = self.index.match(topic)
        if not matches:
            return
        topic_b = topic.encode()
        pkt0: bytes | None = None
        after = self.after
        for s, granted in matches.items():
            check = s.receive_check
            if check is not None and not check(topic):
                continue
            q = qos if qos < granted else granted
            if q:
                self.deliver(s, topic, topic_b, payload, q, False, origin)
                continue
            c = s.conn
            if c is None or c.state != CONNECTED:
                continue          # QoS 0 is not queued for an offline session
            if c.paused:
                self.stats["dropped_slow_consumer"] += 1
                continue
            if pkt0 is None:
                pkt0 = encode_publish(topic_b, payload, 0, False, False, 0)
            self.stats["messages_sent"] += 1
            self.tx_qos[0] += 1
            after(c.send, pkt0)

    def deliver(self, s: Session, topic: str, topic_b: bytes, payload: bytes, qos: int, retain: bool,
                origin: Connection | None = None) -> None:
        if qos == 0:
            c = s.conn
            if c is None or c.state != CONNECTED:
                return
            if c.paused:
                self.stats["dropped_slow_consumer"] += 1
                return
            self.stats["messages_sent"] += 1
            self.tx_qos[0] += 1
            self.after(c.send, encode_publish(topic_b, payload, 0, retain, False, 0))
            return
        store = self.store
        queue = s.queue
        limit = s.max_queued
        if s.conn is not None and not s.stuck and self.limits.throttle_timeout > 0:
            # online and draining: its publishers are being slowed down (see _throttle); a burst from
            # many publishers at once may overshoot the limit before each is paused, up to a hard cap
            limit *= THROTTLE_OVERSHOOT
        if len(queue) >= limit:
            s.dropped += 1
            self.stats["dropped_queue_full"] += 1
            policy = self.limits.queue_policy
            if s.dropped == 1 or s.dropped % 1000 == 0:
                log.warning("session %r: queue full (%d), %d message(s) dropped so far (policy %s)",
                            s.client_id, s.max_queued, s.dropped, policy)
            if policy == "drop-new" or not queue:
                return
            old = queue.popleft()
            if s.persistent:
                store.op(st.QUEUE_DELETE, (s.client_id, old.seq))
        seq = s.next_seq
        s.next_seq = seq + 1
        if s.persistent:
            store.op(st.QUEUE_INSERT, (s.client_id, seq, topic, payload, qos))
        queue.append(Delivery(seq, topic, topic_b, payload, qos, retain, store.token()))
        if s.conn is not None:
            if not s.pump_pending:
                s.pump_pending = True
                self.after(self.pump, s)
            if (origin is not None and len(queue) > s.max_queued >> 1 and origin is not s.conn
                    and not s.stuck and self.limits.throttle_timeout > 0):
                self._throttle(origin, s)

    def _throttle(self, origin: Connection, s: Session) -> None:
        """Flow control instead of loss: a publisher filling an *online* session's queue past half
        its limit stops being read until that queue is down to a quarter. Offline sessions never
        hold publishers back (their queue limit and policy apply), nor is the service identity (the
        API) ever held back by one slow device."""
        ident = origin.identity
        if ident is None or ident.role is Role.SERVICE or origin.state != CONNECTED:
            return
        if s.throttled is None:
            s.throttled = set()
            s.throttle_since = time.monotonic()
            self.throttling.add(s)
        elif origin in s.throttled:
            return
        s.throttled.add(origin)
        origin.throttles += 1
        if origin.throttles == 1:
            self.stats["publishers_throttled"] += 1
            origin.transport.pause_reading()

    def _release(self, s: Session, force: bool = False) -> None:
        drained = len(s.queue) <= s.max_queued >> 2
        if drained:
            s.stuck = False
        throttled = s.throttled
        if throttled is None or not (force or drained):
            return
        s.throttled = None
        self.throttling.discard(s)
        now = time.monotonic()
        for c in throttled:
            c.throttles -= 1
            if c.throttles == 0 and c.state != GONE:
                c.last_rx = now
                c.transport.resume_reading()
                if c.buf:
                    self._loop.call_soon(c.data_received, b"")  # type: ignore[union-attr]

    def pump(self, s: Session) -> None:
        """Move queued messages into the in-flight window and send them."""
        s.pump_pending = False
        c = s.conn
        if c is None or c.state != CONNECTED or c.paused:
            return
        queue = s.queue
        inflight = s.inflight
        limit = s.max_inflight
        done = self.store.done_no
        sent = 0
        tx_qos = self.tx_qos
        while queue and len(inflight) < limit:
            d = queue[0]
            if d.ready > done:          # its store write is not durable yet: after it is
                s.pump_pending = True
                self.after(self.pump, s)
                break
            queue.popleft()
            if d.pid in inflight:
                log.warning("client %r left packet id %d unacknowledged for 65535 messages; disconnecting",
                            s.client_id, d.pid)
                queue.appendleft(d)
                c.violation("packet id still in flight")
                return
            inflight[d.pid] = d
            c.send(encode_publish(d.topic_b, d.payload, d.qos, d.retain, d.dup, d.pid))
            d.dup = True
            sent += 1
            tx_qos[d.qos] += 1
        self.stats["messages_sent"] += sent
        if s.throttled is not None or s.stuck:
            self._release(s)

    def on_puback(self, s: Session | None, pid: int) -> None:
        if s is None:
            raise ProtocolError("PUBACK before CONNACK")
        d = s.inflight.get(pid)
        if d is None or d.qos != 1:
            return          # unknown or stale packet id: nothing to do (not a violation)
        del s.inflight[pid]
        if s.persistent:
            self.store.op(st.QUEUE_DELETE, (s.client_id, d.seq))
        if s.queue:
            self.pump(s)

    def on_pubrec(self, c: Connection, pid: int) -> None:
        s = c.session
        if s is None:
            raise ProtocolError("PUBREC before CONNACK")
        d = s.inflight.get(pid)
        if d is None or d.qos != 2:
            self.after(c.send, encode_ack(PUBREL, pid))   # tolerate: let the client finish its flow
            return
        if d.state == 0:
            d.state = 1
            d.payload = b""
            if s.persistent:
                self.store.op(st.QUEUE_RELEASED, (s.client_id, d.seq))
        self.after(c.send, encode_ack(PUBREL, pid))

    def on_pubcomp(self, s: Session | None, pid: int) -> None:
        if s is None:
            raise ProtocolError("PUBCOMP before CONNACK")
        d = s.inflight.get(pid)
        if d is None or d.state != 1:
            return
        del s.inflight[pid]
        if s.persistent:
            self.store.op(st.QUEUE_DELETE, (s.client_id, d.seq))
        if s.queue:
            self.pump(s)

    # ------------------------------------------------------------------ timers

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            now = time.monotonic()
            timeout = self.limits.connect_timeout
            for c in [c for c in self.conns if _overdue(c, now, timeout)]:
                if c.state == CONNECTED:
                    self.stats["keepalive_timeouts"] += 1
                    if log.isEnabledFor(logging.INFO):
                        log.info("closing %s: silent for 1.5 x keepalive %d s", c._name(), c.keepalive)
                else:
                    self.stats["connect_timeouts"] += 1
                c.abort()
            if self.throttling:
                limit = self.limits.throttle_timeout
                for s in [s for s in self.throttling if now - s.throttle_since > limit]:
                    log.warning("session %r did not drain its queue within %.1f s: releasing %d publisher(s); "
                                "its queue policy (%s) applies until it catches up", s.client_id, limit,
                                len(s.throttled or ()), self.limits.queue_policy)
                    s.stuck = True
                    self._release(s, force=True)
            if now >= self._next_session_sweep:
                self._next_session_sweep = now + SESSION_SWEEP_S
                self.expire_sessions()
            if now >= self._next_sys:
                self._next_sys = now + self.limits.sys_interval
                self.publish_sys()
        except Exception:
            log.exception("broker sweep failed")
        self._timer = loop.call_later(SWEEP_S, self._sweep)

    def metrics(self) -> dict[str, Any]:
        queued = sum(len(s.queue) for s in self.sessions.values())
        inflight = sum(len(s.inflight) for s in self.sessions.values())
        return {
            **self.stats,
            "connections": len(self.conns),
            "sessions": len(self.sessions),
            "sessions_persistent": sum(1 for s in self.sessions.values() if s.persistent),
            "messages_queued": queued,
            "messages_inflight": inflight,
            "retained": len(self.retained),
            "subscriptions_exact": sum(len(v) for v in self.index.exact.values()),
            "subscriptions_wildcard": self.index.wildcards,
            "store_commits": getattr(self.store, "commits", 0),
        }

    def publish_sys(self) -> None:
        """$SYS/broker/<metric>, retained, like Mosquitto's; never written to the store."""
        m = self.metrics()
        m["uptime"] = int(time.time() - self.started_at)
        for key, value in m.items():
            self.publish(f"$SYS/broker/{key}", str(value).encode(), 0, True)


def _overdue(c: Connection, now: float, connect_timeout: float) -> bool:
    state = c.state
    if state == CONNECTED:
        if c.throttles:
            return False        # we stopped reading it: its silence is ours
        return bool(c.keepalive) and now - c.last_rx > c.keepalive * KEEPALIVE_FACTOR
    if state == GONE:
        return False
    return now - c.opened > connect_timeout


"""The firmware's own small asyncio MQTT 3.1.1 client (QoS 0 and 1), for MicroPython.

What it does, and why:
- One write per packet: every packet is built whole, then written with one
  call, so packets from concurrent tasks never interleave. Most go out at
  once (`put()`); only when the socket has no room does `send()` wait for it
  to drain, one drain at a time, nothing written meanwhile.
- Connection errors that only surface at the first write (a refused
  non-blocking connect, a failed TLS handshake) are raised from `connect()`.
- After a CONNACK with session-present=0 (the broker kept no session, so
  our subscriptions went with it) it subscribes again; then it sends the
  unacknowledged QoS 1 messages again, with DUP (MQTT 3.1.1 section 4.4).
- `close()` closes the socket itself: MicroPython's Stream.close() does not,
  and a connection left open looks alive to the broker, which then has two
  connections for one client id.
- An incoming QoS 1 PUBLISH is acknowledged (PUBACK) only after the handler
  returned: a command is persisted before the broker forgets it. A handler
  that raises leaves it unacknowledged and drops the link (redelivery).
- Outgoing QoS 1 messages stay queued until their PUBACK, also across a
  lost link. A newer retained message supersedes an unsent one on the same
  topic; the queue is bounded (the oldest goes).
- Keepalive: a PINGREQ when the link has been quiet; the link is declared
  dead when nothing at all arrived for a keepalive period (a half-open TCP
  connection or a frozen broker never says goodbye).
- Messages on topics it did not subscribe to are dropped; the RETAIN flag is
  passed on but gives a message no special treatment here.

Reconnecting (with backoff) is the caller's job: see firmware/app.py.

Written for a small heap: on MicroPython every distinct attribute, function
and parameter name is an interned string in RAM, so names here reuse ones
the interpreter already has (stream, lock, task, reason, ticks, put, push,
flush, ...) and private constants use const().

And for a fragmenting one: what a command makes is garbage the heap must find
contiguous room for, again and again, beside what stays. So a packet is one
allocation of its exact size, a queued message keeps only its packet (DUP is
set in place), and writing one makes no task, no lock and, when the socket
takes it at once, no coroutine either. Measured on the 64 KiB Unix-port heap
(tests/firmware/test_fw_process.py, PUBACKs withheld, 24 commands): before,
each write went through an asyncio.Lock and wait_for_ms() (a task, a
cancellation) and one command allocated ~33 KB in all; now ~21 KB, and
asyncio's lock module (0.8 KB) is never imported. No memory for a packet just
now is not a broken link either (see `push()`).
"""

import asyncio
from time import ticks_diff, ticks_ms

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBACK = const(0x90)
_MAX_PACKET = const(8192)  # larger incoming packets end the connection
# Unacknowledged QoS 1 messages kept for resending: one command makes three (received, the final ack, state),
# so 4 keeps the last command's answers whole. On a link that loses PUBACKs this is what piles up (issue 12,
# defect 14): at 16 the 64 KiB heap fragmented until a 232-byte packet could not be allocated; at 8 it still
# did in 3 of 6 runs; at 4 it held through 24 commands in every run, also with both cores busy, until CI on
# 2026-12-07 saw 1 run in ~10 fail all the same (a 200-byte allocation with ~8 KB free, in holes). A queued
# message is now its packet alone (~200 bytes, one allocation, DUP set in place) and a command makes ~21 KB of
# garbage instead of ~33 KB (see above): 15 runs of that test out of 15 passed, 7 of them with 3 CPU burners,
# no MemoryError and no packet put off, min free after a command 7616 (the free figure itself barely moved:
# see firmware/tools/build.py). When full the oldest goes: its PUBACK is the one most likely lost.
_MAX_QUEUED = const(4)
# indexes into self.ticks: when a byte last arrived, when one was last sent, last PINGREQ
_RX = const(0)
_TX = const(1)
_PING = const(2)
# a queued outgoing message: [packet id, its PUBLISH packet (None until built), topic, payload, retain]; once
# built it holds only the packet (DUP set after its first send) and, when retained, the topic
_ID = const(0)
_PKT = const(1)
_TOPIC = const(2)
_DATA = const(3)
_RETAIN = const(4)


class MQTTError(OSError):
    pass


class RefusedError(MQTTError):
    """The broker answered CONNACK with a non-zero return code (4: bad credentials, 5: not authorized; 1, 2);
    3 (server unavailable) raises a plain MQTTError: that node's trouble, not a refusal."""


def _packet(first, parts):
    """A whole MQTT packet: `first` (type and flags), the remaining length, then `parts`: bytes-likes, and
    ints, each a two-byte field (a length, a packet id). Built in one allocation of its exact size: no
    concatenations, whose pieces fragment a small heap (CI on 2026-12-07: a 200-byte PUBLISH could not be
    had with ~8 KB free)."""
    n = 0
    for x in parts:
        n += 2 if isinstance(x, int) else len(x)
    p = bytearray(n + (2 if n < 128 else 3 if n < 16384 else 4))
    p[0] = first
    i = 1
    while True:
        p[i] = (n & 0x7F) | (0x80 if n > 0x7F else 0)
        i += 1
        n >>= 7
        if not n:
            break
    for x in parts:
        if isinstance(x, int):
            p[i] = x >> 8
            p[i + 1] = x & 0xFF
            i += 2
        else:
            p[i:i + len(x)] = x
            i += len(x)
    return p


def _publish(pid, topic, payload, retain):
    """A PUBLISH packet: QoS 1 when `pid` (0: QoS 0)."""
    topic = topic.encode() if isinstance(topic, str) else topic
    if pid:
        return _packet(_PUBLISH | 2 | retain, (len(topic), topic, pid, payload))
    return _packet(_PUBLISH | retain, (len(topic), topic, payload))


class MQTTClient:
    def __init__(self, client_id, host, port, user, password, keepalive, will, ssl=None, server_hostname=None,
                 timeout=10000, log=None):
        self.client_id = client_id
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive  # seconds
        self.will = will            # (topic, payload, qos, retain) or None
        self.ssl = ssl              # an ssl.SSLContext or None
        self.server_hostname = server_hostname
        self.timeout = timeout      # ms for TCP + TLS + CONNACK, a SUBACK, and any one write
        self.log = log or print
        self.handler = None         # async def (topic, payload, retained)
        self.topics = []            # subscribed, exactly; anything else is dropped
        self.connected = False
        self.stream = None
        self.lock = 0               # the stream while a send() drains it: nothing may be written to it then
        self.id = 0                 # the last packet id used
        self.pending = []           # outgoing QoS 1 messages not yet acknowledged
        self.wait = None            # [packet id, granted QoS] while a SUBSCRIBE waits
        self.task = None            # the reader
        self.reason = None          # why the link died, once it has
        self.ticks = [0, 0, 0]

    def _pid(self):
        while True:
            self.id = self.id % 65535 + 1
            for m in self.pending:
                if m[_ID] == self.id:
                    break
            else:
                return self.id

    def put(self, data):
        """Write one whole packet now, without waiting: 1 when the socket took it all, 2 when some of it
        waits in the stream for send() to drain, 0 when it was not written because a drain is under way
        (drain() would drop it: the caller must `await send()`). Raises when the link is gone.
        Stream.write() hands a packet to the socket or, when the socket has no room, keeps all of it, in
        order, behind what already waits: packets never interleave."""
        s = self.stream
        if s is None:
            raise MQTTError("not connected")
        if self.lock is s:
            return 0
        s.write(data)
        self.ticks[_TX] = ticks_ms()
        return 2 if s.out_buf else 1

    async def send(self, data, r=0):
        """Write one whole packet (`r`: what put() already did with it), then wait until the socket took
        all that waits, one drain at a time, bounded by `timeout`; raises when the link is gone. Most
        packets go out whole at once, without a task, a lock or even this coroutine (put()): on the
        64 KiB heap those were ~2.5 KB of garbage per packet."""
        s = self.stream
        while not r:
            if s is not self.stream:
                raise MQTTError("not connected")
            r = self.put(data)
            if not r:
                await asyncio.sleep_ms(10)
        if r > 1:
            self.lock = s
            try:
                await asyncio.wait_for_ms(s.drain(), self.timeout)
            finally:
                if self.lock is s:  # (a drain of an earlier connection ending late leaves a newer one's alone)
                    self.lock = 0

    async def read(self):
        """One packet: (first byte, body)."""
        r = self.stream
        first = (await r.readexactly(1))[0]
        n = shift = 0
        while True:
            b = (await r.readexactly(1))[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift > 21:
                raise MQTTError("malformed length")
        if n > _MAX_PACKET:
            raise MQTTError("packet too large: %d" % n)
        data = await r.readexactly(n) if n else b""
        self.ticks[_RX] = ticks_ms()
        return first, data

    def close(self, reason=None):
        """Drop the link now, without DISCONNECT (so the broker publishes the will)."""
        if reason is not None and self.reason is None:
            self.reason = reason
            self.log("mqtt: link lost: %r" % (reason,))
        self.connected = False
        s, t = self.stream, self.task
        self.stream = self.task = self.wait = None
        if t is not None and t is not asyncio.current_task():
            t.cancel()
        if s is not None:
            try:
                s.s.close()  # MicroPython's Stream.close() is a no-op: close the socket itself
            except Exception:
                pass

    async def connect(self):
        """Connect, subscribe, resend what is unacknowledged. Returns session-present."""
        self.close()
        self.reason = None
        if self.ssl:
            conn = asyncio.open_connection(self.host, self.port, ssl=self.ssl, server_hostname=self.server_hostname)
        else:
            conn = asyncio.open_connection(self.host, self.port)
        self.stream = (await asyncio.wait_for_ms(conn, self.timeout))[0]
        try:
            flags = 0  # clean session off: the broker keeps our subscription and QoS 1 messages
            w = self.will
            if w:
                flags |= 0x04 | (w[2] << 3) | (0x20 if w[3] else 0)
            if self.user is not None:
                flags |= 0x80
            if self.password is not None:
                flags |= 0x40
            # protocol name and level (4), flags, keepalive; then each field present, with its length
            parts = [4, b"MQTT", bytes((4, flags)), self.keepalive]
            for data in (self.client_id, w and w[0], w and w[1], self.user, self.password):
                if data is not None:
                    data = data.encode() if isinstance(data, str) else data
                    parts.append(len(data))
                    parts.append(data)
            # a refused connect or a failed TLS handshake surfaces here, at the first write
            await self.send(_packet(0x10, parts))
            first, data = await asyncio.wait_for_ms(self.read(), self.timeout)
            if first != _CONNACK or len(data) != 2:
                raise MQTTError("expected CONNACK, got 0x%02x" % first)
            if data[1]:
                # 3 (server unavailable) is this node's trouble, not ours: another node may take us
                raise (MQTTError if data[1] == 3 else RefusedError)("connection refused, code %d" % data[1])
        except BaseException:
            self.close()
            raise
        self.connected = True
        now = ticks_ms()
        self.ticks = [now, now, now]
        self.task = asyncio.create_task(self.run())
        present = data[0] & 1
        for topic in () if present else self.topics:
            pid = self._pid()
            self.wait = w = [pid, None]
            t = topic.encode()
            await self.send(_packet(0x82, (pid, len(t), t, b"\x01")))
            while w[1] is None:
                if self.reason or ticks_diff(ticks_ms(), now) > self.timeout:
                    raise MQTTError("no SUBACK")
                await asyncio.sleep_ms(10)
            if w[1] == 0x80:
                raise MQTTError("subscription refused: " + topic)
        for m in list(self.pending):
            r = self.push(m)
            if r != 1:
                await self.flush(m, r)
        if self.reason:
            raise self.reason
        return present

    async def publish(self, topic, payload, qos=0, retain=False):
        """QoS 0: sent if connected, else dropped. QoS 1: queued until its PUBACK, sent
        now if connected, else after the next connect."""
        m = [0, None, topic, payload, 1 if retain else 0]
        if qos:
            for old in self.pending:
                if retain and old[_RETAIN] and old[_TOPIC] == topic:
                    self.pending.remove(old)  # superseded: the broker keeps only the newest retained anyway
                    break
            if len(self.pending) >= _MAX_QUEUED:
                self.pending.pop(0)
            m[_ID] = self._pid()
            self.pending.append(m)
        if self.connected:
            r = self.push(m)
            if r != 1:
                await self.flush(m, r)

    def push(self, m):
        """Write a queued message now, without waiting, its packet built on first use; put()'s answer, or 1
        when nothing is left to do: also when the link just broke (closed here) or when there is no memory
        for the packet just now. That is not a broken link: a QoS 1 message stays queued, unbuilt, for
        `loop()` to try again; a QoS 0 one is dropped."""
        p = m[_PKT]
        if p is None:
            try:
                p = m[_PKT] = _publish(m[_ID], m[_TOPIC], m[_DATA], m[_RETAIN])
            except MemoryError:
                self.log("mqtt: no memory for a %d-byte message now: %s" % (
                    len(m[_DATA]), "kept queued" if m[_ID] else "dropped"))
                return 1
            m[_DATA] = None  # the packet holds it now
            if not m[_RETAIN]:
                m[_TOPIC] = None
        try:
            r = self.put(p)
        except Exception as e:
            self.close(e)
            return 1
        if r:
            p[0] |= 8  # from here on it may have left: any later copy carries DUP
        return r

    async def flush(self, m, r):
        """What push() left to send() (rarely anything: only when the socket had no room)."""
        p = m[_PKT]
        try:
            await self.send(p, r)
        except Exception as e:
            self.close(e)
        p[0] |= 8

    async def loop(self, period=200):
        """Keep the link alive until it dies; raises the reason."""
        ka = self.keepalive * 1000
        t = self.ticks
        while self.reason is None and self.connected:
            now = ticks_ms()
            idle = ticks_diff(now, t[_RX])
            if idle > ka:
                self.close(MQTTError("receive timeout: nothing for %d ms" % idle))
                break
            if ticks_diff(now, t[_PING]) >= ka // 2 and (idle >= ka // 2 or ticks_diff(now, t[_TX]) >= ka * 3 // 4):
                t[_PING] = now
                try:
                    await self.send(b"\xc0\x00")  # PINGREQ
                except Exception as e:
                    self.close(e)
                    break
            for m in self.pending:
                if m[_PKT] is None:  # queued while there was no memory for its packet
                    r = self.push(m)
                    if r != 1:
                        await self.flush(m, r)
                    break
            await asyncio.sleep_ms(period)
        raise self.reason or MQTTError("closed")

    async def stop(self):
        """A polite goodbye (DISCONNECT: no will), then close."""
        try:
            await self.send(b"\xe0\x00")
        except Exception:
            pass
        self.close()

    async def run(self):
        """The reader: dispatches packets until the link dies."""
        try:
            while True:
                first, data = await self.read()
                kind = first & 0xF0
                if kind == _PUBLISH:
                    qos = (first >> 1) & 3
                    n = (data[0] << 8) | data[1]
                    topic = bytes(data[2:2 + n]).decode()
                    n += 2
                    if qos:
                        pid = (data[n] << 8) | data[n + 1]
                        n += 2
                    if qos > 1:
                        # never subscribed above QoS 1: a broker that sends QoS 2 is broken
                        self.log("mqtt: dropped a QoS 2 message")
                    elif topic in self.topics and self.handler:
                        await self.handler(topic, data[n:], first & 1)
                    else:
                        self.log("mqtt: dropped a message on unsubscribed topic " + topic)
                    if qos == 1:
                        b = bytes((_PUBACK, 2, pid >> 8, pid & 0xFF))
                        r = self.put(b)
                        if r != 1:
                            await self.send(b, r)
                elif kind == _PUBACK:
                    pid = (data[0] << 8) | data[1]
                    for m in self.pending:
                        if m[_ID] == pid:
                            self.pending.remove(m)
                            break
                elif kind == _SUBACK:
                    w = self.wait
                    if w and w[0] == (data[0] << 8) | data[1]:
                        w[1] = data[2]
                # PINGRESP and anything else: that it arrived was the point
        except asyncio.CancelledError:
            pass
        except Exception as e:
            self.close(e)

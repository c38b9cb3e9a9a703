"""The firmware's own small asyncio MQTT 3.1.1 client (QoS 0 and 1), for MicroPython.

What it does, and why:
- One write per packet: every packet is built whole, then written with one
  call under a lock, so packets from concurrent tasks never interleave.
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
the interpreter already has (stream, lock, task, reason, ticks, ...) and
private constants use const().
"""

import asyncio
from time import ticks_ms, ticks_diff

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
# did in 3 of 6 runs; at 4 it held through 24 commands in every run, also with both cores busy. When full the
# oldest goes: its PUBACK is the one most likely lost, not the message.
_MAX_QUEUED = const(4)
# indexes into self.ticks: when a byte last arrived, when one was last sent, last PINGREQ
_RX = const(0)
_TX = const(1)
_PING = const(2)
# a queued outgoing message: [packet id, topic, payload, retain, sent once]
_ID = const(0)
_TOPIC = const(1)
_SENT = const(4)


class MQTTError(OSError):
    pass


class RefusedError(MQTTError):
    """The broker answered CONNACK with a non-zero return code (4: bad credentials, 5: not authorized)."""


def _str(data):
    if isinstance(data, str):
        data = data.encode()
    return bytes((len(data) >> 8, len(data) & 0xFF)) + data


def _packet(flags, data):
    """A whole MQTT packet: fixed header (type and flags, remaining length) and `data`."""
    n = len(data)
    hdr = bytearray((flags,))
    while True:
        hdr.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(hdr) + data


def _publish(message):
    """The PUBLISH packet of a queued message; DUP once it was sent before."""
    pid, topic, payload, retain, sent = message
    payload = payload.encode() if isinstance(payload, str) else payload
    if pid:
        return _packet(_PUBLISH | 2 | (8 if sent else 0) | retain, _str(topic) + bytes((pid >> 8, pid & 0xFF)) + payload)
    return _packet(_PUBLISH | retain, _str(topic) + payload)


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
        self.lock = asyncio.Lock()
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

    async def send(self, data):
        """Write one whole packet; raises when the link is gone."""
        s = self.stream
        if s is None:
            raise MQTTError("not connected")
        async with self.lock:
            if s is not self.stream:
                raise MQTTError("not connected")
            s.write(data)
            await asyncio.wait_for_ms(s.drain(), self.timeout)
            self.ticks[_TX] = ticks_ms()

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
            data = _str(self.client_id)
            w = self.will
            if w:
                flags |= 0x04 | (w[2] << 3) | (0x20 if w[3] else 0)
                data += _str(w[0]) + _str(w[1])
            if self.user is not None:
                flags |= 0x80
                data += _str(self.user)
            if self.password is not None:
                flags |= 0x40
                data += _str(self.password)
            k = self.keepalive
            # a refused connect or a failed TLS handshake surfaces here, at the first write
            await self.send(_packet(0x10, _str("MQTT") + bytes((4, flags, k >> 8, k & 0xFF)) + data))
            first, data = await asyncio.wait_for_ms(self.read(), self.timeout)
            if first != _CONNACK or len(data) != 2:
                raise MQTTError("expected CONNACK, got 0x%02x" % first)
            if data[1]:
                raise RefusedError("connection refused, code %d" % data[1])
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
            await self.send(_packet(0x82, bytes((pid >> 8, pid & 0xFF)) + _str(topic) + b"\x01"))
            while w[1] is None:
                if self.reason or ticks_diff(ticks_ms(), now) > self.timeout:
                    raise MQTTError("no SUBACK")
                await asyncio.sleep_ms(10)
            if w[1] == 0x80:
                raise MQTTError("subscription refused: " + topic)
        for m in list(self.pending):
            p = _publish(m)
            m[_SENT] = 1  # from here on it may have left: any later copy carries DUP
            await self.send(p)
        return present

    async def publish(self, topic, payload, qos=0, retain=False):
        """QoS 0: sent if connected, else dropped. QoS 1: queued until its PUBACK, sent
        now if connected, else after the next connect."""
        m = [0, topic, payload, 1 if retain else 0, 0]
        if qos:
            for old in self.pending:
                if retain and old[3] and old[_TOPIC] == topic:
                    self.pending.remove(old)  # superseded: the broker keeps only the newest retained anyway
                    break
            if len(self.pending) >= _MAX_QUEUED:
                self.pending.pop(0)
            m[_ID] = self._pid()
            self.pending.append(m)
        if self.connected:
            p = _publish(m)
            m[_SENT] = 1  # from here on it may have left: any later copy carries DUP
            try:
                await self.send(p)
            except Exception as e:
                self.close(e)

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
                        await self.send(bytes((_PUBACK, 2, pid >> 8, pid & 0xFF)))
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

"""A /v1/ws subscriber after its ASGI call ended: the socket handed from uvicorn to a lean protocol of our own.

Why: a WebSocket held by uvicorn's sans-I/O protocol for its whole life costs ~38 KiB (measured with 1,000
sockets, docs/notifications.md): the ASGI task and the coroutine frames of every middleware (~16 KiB), and
uvicorn's protocol with websockets' ServerProtocol, the parsed request and its headers, a queue, events and
timers (~17 KiB). Once a subscription is direct (api/push/wire.py: the event log writes the frames to the socket
itself) none of that is needed any more, as for a detached SSE stream (api/push/events.py EventLog.detach).

This module owns:
- `DetachableWsWire`: the WsWire of a socket served by uvicorn's sans-I/O protocol. `detach()` (called by
  EventLog.detach) hands the socket to a `DetachedSocket` when uvicorn's protocol has nothing in hand (no
  message queued for the app, no partial frame in its parser, no extension negotiated); otherwise it says no
  and the connection stays on its task, as before. It takes uvicorn's place in the server's connection set
  (shutdown), stops uvicorn's pings, gives uvicorn's protocol a transport that goes nowhere (so that the ASGI
  call, woken with a disconnect, ends without closing the socket) and from then on answers the event log:
  keep-alive pings, a pong overdue, and the close frame that says why the subscription ended (`finish`).
- `DetachedSocket`: the asyncio protocol of a detached socket. It parses client frames (masked; RFC 6455):
  ping -> pong, pong, close -> close back and the connection ends, text messages -> `respond` (the route's
  handling, one message at a time in order, as the ASGI path did; reading pauses when messages pile up).
  A message over MAX_MESSAGE bytes is dropped as it arrives and answered with the route's error (as before);
  invalid UTF-8 closes with 1007, binary messages with 1003, protocol errors with 1002.

Not detached (and kept on their task): the legacy websockets and wsproto implementations, another server,
and a socket with permessage-deflate (latch/stack.py turns it off: per-socket zlib contexts cost ~37 KiB).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.frames import apply_mask
from websockets.protocol import State
from websockets.streams import StreamReader

from api.push.events import SESSION_ENDED, Subscription, ws_text_frame
from api.push.wire import SCOPE_KEY, WsWire, ws_wire

log = logging.getLogger("latch.ws")

SANSIO = "uvicorn.protocols.websockets.websockets_sansio_impl"
MAX_MESSAGE = 16 * 1024
CLOSE_TOO_SLOW = 4008
CLOSE_UNAUTHORIZED = 4401
CLOSE_RESTART = 1012
CLOSE_TIMEOUT_S = 10.0   # after our close frame, how long the client has to answer it (uvicorn's figure)
INBOX_MAX = 8            # messages waiting for their turn before reading pauses
PING = b"\x89\x00"
_AT_EOF = StreamReader.at_eof.__code__

# respond(text, write): one message from the client (None: it was over MAX_MESSAGE bytes), replies via write()
Respond = Callable[[str | None, Callable[[str], None]], Awaitable[None]]


def detachable_ws_wire(scope: Any, sub: Subscription, respond: Respond) -> WsWire | None:
    """The wire for an accepted WebSocket (api/push/wire.py ws_wire), detachable when uvicorn's sans-I/O protocol
    serves it."""
    wire = ws_wire(scope)
    if wire is None or type(wire.owner).__module__ != SANSIO:
        return wire
    return DetachableWsWire(scope[SCOPE_KEY], sub, respond)


def close_frame(code: int, reason: str = "") -> bytes:
    payload = code.to_bytes(2, "big") + reason.encode()[:123].decode(errors="ignore").encode()
    return bytes((0x88, len(payload))) + payload


class _Nowhere:
    """The transport uvicorn's protocol is left with once the socket is ours: what it does after goes nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


NOWHERE = _Nowhere()


def _at_rest(o: Any) -> bool:
    """uvicorn's protocol has nothing in hand: handshake done, no close, nothing queued for the app, no
    partial frame or fragmented message in websockets' parser (which waits for a frame's first byte), no extension."""
    try:
        conn, t = o.conn, o.transport
        if o.close_sent or o.disconnected or not o.handshake_complete or o.close_timer is not None \
                or t.is_closing() or t.get_protocol() is not o or not o.queue.empty() or o.frames:
            return False
        if conn.state is not State.OPEN or conn.extensions or conn.cur_size is not None or conn.reader.buffer \
                or conn.parser_exc is not None:
            return False
        waiting = conn.parser   # ServerProtocol.parse -> Protocol.parse -> StreamReader.at_eof between frames
        while getattr(waiting, "gi_yieldfrom", None) is not None:
            waiting = waiting.gi_yieldfrom
        return getattr(waiting, "gi_code", None) is _AT_EOF
    except AttributeError:   # another uvicorn or websockets than the one this was written against
        return False


class DetachableWsWire(WsWire):
    """A WsWire the event log may take over (EventLog.detach): see the module's docstring."""

    __slots__ = ("sub", "respond", "socket", "released", "ping_s", "pong_s")

    def __init__(self, owner: Any, sub: Subscription, respond: Respond) -> None:
        super().__init__(owner)
        self.sub: Subscription | None = sub
        self.respond: Respond | None = respond
        self.socket: DetachedSocket | None = None
        self.released = False
        self.ping_s: float | None = getattr(owner, "ping_interval", None)   # uvicorn's ws_ping_interval, ..._timeout
        self.pong_s: float | None = getattr(owner, "ping_timeout", None)

    def detach(self, on_lost: Callable[[], None]) -> bool:
        o, t = self.owner, self.transport
        if self.socket is not None or self.respond is None or not _at_rest(o):
            return False
        o.stop_keepalive()
        sock = DetachedSocket(t, o.connections, on_lost, self.respond, self.pong_s)
        t.set_protocol(sock)
        o.connections.discard(o)
        o.connections.add(sock)   # uvicorn's shutdown reaches it (1012) and waits for it to close
        o.transport = NOWHERE
        o.close_sent = o.disconnected = True
        o.queue.put_nowait({"type": "websocket.disconnect", "code": 1000})   # the app's receive wakes: the call ends
        if o.read_paused:
            t.resume_reading()
        self.owner = self.socket = sock
        self.respond = None
        return True

    def release_scope(self) -> None:
        """Nothing to do: uvicorn's protocol, with the scope, the request and its headers, was let go at detach."""
        self.released = True

    def gone(self) -> bool:
        s = self.socket
        return self.transport.is_closing() or (s is not None and s.overdue())

    def keepalive(self) -> bool:
        s = self.socket
        if s is None:
            return super().keepalive()   # uvicorn pings
        return s.ping()

    def finish(self, last: bytes = b"") -> None:
        """The subscription closed (EventLog._end_detached): the close frame that says why (`last` is SSE's)."""
        sub, s = self.sub, self.socket
        self.sub = None
        if sub is None or s is None:
            return
        if sub.cut:
            s.close(CLOSE_TOO_SLOW, (sub.reason or "too far behind")[:120])
        elif sub.reason == SESSION_ENDED:
            s.close(CLOSE_UNAUTHORIZED, SESSION_ENDED)
        elif sub.reason == "client disconnected":
            self.transport.close()
        else:   # the server is shutting down (EventLog.close_all), as uvicorn's shutdown says it
            s.close(CLOSE_RESTART, (sub.reason or "")[:120])


class DetachedSocket(asyncio.Protocol):
    """The asyncio protocol of a detached /v1/ws socket: see the module's docstring."""

    __slots__ = ("transport", "connections", "on_lost", "respond", "pong_s", "buf", "msg", "binary", "over",
                 "skip", "inbox", "worker", "paused", "close_sent", "ping_at", "closer")

    def __init__(self, transport: Any, connections: set[Any], on_lost: Callable[[], None], respond: Respond,
                 pong_s: float | None) -> None:
        self.transport = transport
        self.connections = connections
        self.on_lost: Callable[[], None] | None = on_lost
        self.respond = respond
        self.pong_s = pong_s
        self.buf = b""                       # the start of a frame not complete yet
        self.msg: bytearray | None = None    # a fragmented message so far
        self.binary = False
        self.over = False                    # the message being received is over MAX_MESSAGE: dropped
        self.skip = 0                        # payload bytes of an oversize message still to drop
        self.inbox: list[str | None] | None = None   # messages waiting for `worker`
        self.worker: asyncio.Task[None] | None = None
        self.paused = False
        self.close_sent = False
        self.ping_at: float | None = None
        self.closer: asyncio.TimerHandle | None = None

    # ---- the transport's side -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        i, n = 0, len(buf)
        while i < n and not self.transport.is_closing():
            if self.skip:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
                if not self.skip and self.msg is None and not self.over:
                    self._message(None)   # the oversize message ended
                continue
            if n - i < 2:
                break
            b0, b1 = buf[i], buf[i + 1]
            fin, op, size, j = b0 & 0x80, b0 & 0x0F, b1 & 0x7F, i + 2
            if b0 & 0x70 or not b1 & 0x80:
                return self._fail(1002, "client frames are masked, without extensions")
            if size >= 126:
                w = 2 if size == 126 else 8
                if n - j < w:
                    break
                size, j = int.from_bytes(buf[j:j + w], "big"), j + w
            if n - j < 4:
                break
            mask, j = buf[j:j + 4], j + 4
            if op >= 8:
                if not fin or size > 125 or op > 10:
                    return self._fail(1002, "bad control frame")
                if n - j < size:
                    break
                self._control(op, apply_mask(buf[j:j + size], mask))
                i = j + size
                continue
            if op > 2 or (op == 0) != (self.msg is not None or self.over):
                return self._fail(1002, "unexpected continuation" if op == 0 else "bad frame")
            if op:
                self.binary = op == 2
            have = len(self.msg) if self.msg is not None else 0
            if self.over or have + size > MAX_MESSAGE:   # dropped as it arrives, answered when it ends
                self.msg, self.over, self.skip, i = None, not fin, size, j
                if not size and fin:
                    self._message(None)
                continue
            if n - j < size:
                break
            part = apply_mask(buf[j:j + size], mask) if size else b""
            i = j + size
            if fin:
                whole = bytes(self.msg) + part if self.msg is not None else part
                self.msg = None
                if self.binary:
                    return self._fail(1003, "text frames only")
                try:
                    text = whole.decode()
                except UnicodeDecodeError:
                    return self._fail(1007, "invalid UTF-8")
                self._message(text)
            else:
                self.msg = (self.msg or bytearray()) + part
        self.buf = buf[i:] if i < n else b""

    def eof_received(self) -> None:
        pass   # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self.closer is not None:
            self.closer.cancel()
            self.closer = None
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    def shutdown(self) -> None:
        """uvicorn's Server.shutdown: 1012 and the connection ends."""
        if not self.close_sent and not self.transport.is_closing():
            self.close_sent = True
            self.transport.write(close_frame(CLOSE_RESTART))
        self.transport.close()

    # ---- the event log's side (DetachableWsWire) ---------------------------------------------------------
    def ping(self) -> bool:
        if self.transport.is_closing():
            return False
        if self.ping_at is None and not self.close_sent:
            self.ping_at = time.monotonic()
            self.transport.write(PING)
        return True

    def overdue(self) -> bool:
        """A ping went unanswered for pong_s: closed with 1011, as uvicorn does."""
        if self.ping_at is None or self.pong_s is None or time.monotonic() - self.ping_at <= self.pong_s:
            return False
        self._fail(1011, "keepalive ping timeout")
        return True

    def close(self, code: int, reason: str) -> None:
        """Our close frame; the connection ends when the client answers it, or after CLOSE_TIMEOUT_S."""
        t = self.transport
        if self.close_sent or t.is_closing():
            return
        self.close_sent = True
        t.write(close_frame(code, reason))
        self.closer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, t.close)

    def send_text(self, text: str) -> None:
        if not self.close_sent and not self.transport.is_closing():
            self.transport.write(ws_text_frame(text.encode()))

    # ---- inside ---------------------------------------------------------------------------------------
    def _fail(self, code: int, reason: str) -> None:
        if not self.close_sent and not self.transport.is_closing():
            self.close_sent = True
            self.transport.write(close_frame(code, reason))
        self.transport.close()

    def _control(self, op: int, payload: bytes) -> None:
        t = self.transport
        if op == 9:
            if not self.close_sent:
                t.write(bytes((0x8A, len(payload))) + payload)
        elif op == 10:
            self.ping_at = None
        elif self.close_sent:   # the answer to ours: done
            t.close()
        else:   # the client's: answered with its code, and the connection ends
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
            if len(payload) == 1 or not (1000 <= code <= 1014 and code not in (1004, 1005, 1006)
                                         or 3000 <= code <= 4999):
                return self._fail(1002, "bad close frame")
            self.close_sent = True
            t.write(bytes((0x88, min(len(payload), 2))) + payload[:2])
            t.close()

    def _message(self, text: str | None) -> None:
        if self.close_sent:
            return
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work(text))
            return
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = []
        inbox.append(text)
        if len(inbox) >= INBOX_MAX and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    async def _work(self, text: str | None) -> None:
        """The messages in order, one at a time (the route awaits the database for a command)."""
        try:
            while True:
                try:
                    await self.respond(text, self.send_text)
                except Exception:
                    log.exception("answering a message on a detached WebSocket failed")
                inbox = self.inbox
                if not inbox or self.transport.is_closing():
                    return
                text = inbox.pop(0)
                if self.paused and len(inbox) < INBOX_MAX // 2:
                    self.paused = False
                    self.transport.resume_reading()
        finally:
            self.worker = None
            self.inbox = None

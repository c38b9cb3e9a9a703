"""Event streams written straight to their sockets: one encoding per event, no task woken per delivery.

An SSE or WebSocket subscriber starts as any ASGI response does: headers, the `ready` message or the
`subscribed` reply and the backlog go through the server's `send`. Once it is live and has nothing
buffered, the event log writes each new event to its socket itself (api/push/events.py Subscription.push hands
it over, EventLog._flush writes what each subscriber was handed since its last turn in one `write`): the
bytes are made once per event and transport (an HTTP/1.1 chunk holding the SSE message; an unmasked
WebSocket text frame) and are the same for every subscriber, so a delivery is a `transport.write` and a
look at the socket's write buffer. Then the ASGI call ends (`detach`): an SSE stream's response is marked
complete for uvicorn, a WebSocket moves to api/push/ws_detach.py's protocol; the event log's housekeeping sends
keep-alives and, when the subscription closes, the wire's `finish` ends it (`event: error` and the
terminating chunk; the close frame with its code).

Reaching the socket: `TransportTap`, outside every ASGI middleware (`install`), records in the scope the object
behind the server's own `send` (uvicorn's HTTP cycle, or its WebSocket protocol). Direct writing is used
only with the servers whose framing it knows: uvicorn's httptools HTTP/1.1 with chunked encoding (the
default), uvicorn's websockets (sans-I/O or legacy) and wsproto WebSocket protocols. Anything else (h11,
HTTP/1.0, another server, a test client without a socket) falls back to the buffered path.

Slow clients: the kernel's socket buffer takes what it can; what it cannot stays in the transport's
buffer. A subscriber that got LATCH_SUBSCRIBER_BUFFER events while that buffer was not empty is cut off
(api/push/events.py), as a buffered one is when that many events wait for it.

A WebSocket that negotiated permessage-deflate still gets these frames uncompressed (RSV1 clear), which
RFC 7692 allows message by message; the server's own replies may be compressed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from api.push.events import LiveEvent

SCOPE_KEY = "latch.server_connection"
KEEPALIVE_CHUNK = b"%x\r\n%s\r\n" % (len(b": keep-alive\n\n"), b": keep-alive\n\n")
_HTTP = {"uvicorn.protocols.http.httptools_impl"}
_WS = {"uvicorn.protocols.websockets.websockets_sansio_impl", "uvicorn.protocols.websockets.websockets_impl",
       "uvicorn.protocols.websockets.wsproto_impl"}


def install(app: Any) -> None:
    """Put TransportTap outside everything, Starlette's own ServerErrorMiddleware included (whose `send`
    wrapper hides the server's): it wraps the stack Starlette builds."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: TransportTap(build())


class TransportTap:
    """ASGI middleware (outermost): keeps the server's connection object in the scope for api/push/wire.py."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            owner = getattr(send, "__self__", None)
            if owner is not None:
                scope[SCOPE_KEY] = owner
        await self.app(scope, receive, send)


FINAL_CHUNK = b"0\r\n\r\n"
SPENT_SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "http_version": "1.1", "headers": []}
SPENT_EVENT = asyncio.Event()   # set() by the server when the connection goes; no one waits on it


class SseWire:
    """An SSE response's socket, after its headers (chunked) went through the server.

    `detach()`: the ASGI call may end while the stream goes on. uvicorn is told the response is complete
    (it then ignores the call's end and, on shutdown, closes the connection); from then on only the event
    log writes to the socket, and `finish()` ends the chunked body and closes the connection. What stays
    per stream is the server's protocol, its request cycle and the transport: no task, no coroutine frames
    of the middleware stack, no exit stacks (~25 KiB of a ~31 KiB stream, measured)."""

    __slots__ = ("transport", "owner", "released")

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.transport = owner.transport
        self.released = False

    def detach(self, on_lost: Callable[[], None]) -> bool:
        """`on_lost` is called when the connection is lost (from the protocol's connection_lost)."""
        o = self.owner
        if o.response_complete or o.disconnected or self.transport.is_closing():
            return False
        proto = self.transport.get_protocol()
        if getattr(proto, "cycle", None) is not o:
            return False
        o.response_complete = True
        proto.connection_lost = _Lost(proto.connection_lost, on_lost)
        return True

    def release_scope(self) -> None:
        """Once the ASGI call has ended: what only the call needed goes (the request's scope with its
        headers and the framework's exit stacks, held by the cycle and the protocol; the cycle's wake-up
        event, which nothing waits on any more)."""
        o = self.owner
        o.scope = SPENT_SCOPE
        o.message_event = SPENT_EVENT
        proto = self.transport.get_protocol()
        if getattr(proto, "cycle", None) is o and isinstance(getattr(proto, "scope", None), dict):
            proto.scope = SPENT_SCOPE
        self.released = True

    def gone(self) -> bool:
        return self.transport.is_closing()

    def finish(self, last: bytes = b"") -> None:
        t = self.transport
        if not t.is_closing():
            t.write((b"%x\r\n%s\r\n" % (len(last), last) if last else b"") + FINAL_CHUNK)
            t.close()   # after what is buffered went out (a client that reads nothing: until TCP gives up)

    def write_events(self, events: list[LiveEvent]) -> bool:
        """Events in one `write()`: one system call for all of them (False: the connection is gone)."""
        t = self.transport
        if t.is_closing() or self.owner.disconnected:
            return False
        t.write(events[0].sse_chunk if len(events) == 1 else b"".join([ev.sse_chunk for ev in events]))
        return True

    def backed_up(self) -> bool:
        return self.transport.get_write_buffer_size() > 0

    def keepalive(self) -> bool:
        t = self.transport
        if t.is_closing() or self.owner.disconnected:
            return False
        t.write(KEEPALIVE_CHUNK)
        return True


class _Lost:
    """The server protocol's connection_lost, then ours."""

    __slots__ = ("server", "ours")

    def __init__(self, server: Callable[[Exception | None], None], ours: Callable[[], None]) -> None:
        self.server, self.ours = server, ours

    def __call__(self, exc: Exception | None) -> None:
        try:
            self.server(exc)
        finally:
            self.ours()


class WsWire:
    """An accepted WebSocket's socket."""

    __slots__ = ("transport", "owner")

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.transport = owner.transport

    def write_events(self, events: list[LiveEvent]) -> bool:
        """Events in one `write()`, a frame each (False: the socket is closing or gone)."""
        t = self.transport
        o = self.owner
        if t.is_closing() or getattr(o, "close_sent", False) or getattr(o, "closed", False) \
                or getattr(o, "disconnected", False) or not _ws_open(o):
            return False
        t.write(events[0].ws_frame if len(events) == 1 else b"".join([ev.ws_frame for ev in events]))
        return True

    def backed_up(self) -> bool:
        return self.transport.get_write_buffer_size() > 0

    def keepalive(self) -> bool:   # the server pings WebSockets itself
        return not self.transport.is_closing()


def _ws_open(owner: Any) -> bool:
    conn = getattr(owner, "conn", None)
    state = getattr(conn, "state", None)
    if state is None:
        return True
    name = getattr(state, "name", "")
    return name in ("OPEN", "")


def sse_wire(scope: Any) -> SseWire | None:
    """After http.response.start went out: the wire for this response, or None (write through the server)."""
    owner = scope.get(SCOPE_KEY)
    if owner is None or type(owner).__module__ not in _HTTP or getattr(owner, "chunked_encoding", None) is not True:
        return None
    if getattr(owner, "transport", None) is None or getattr(owner, "response_complete", True):
        return None
    return SseWire(owner)


def ws_wire(scope: Any) -> WsWire | None:
    """After the WebSocket was accepted: its wire, or None."""
    owner = scope.get(SCOPE_KEY)
    if owner is None or type(owner).__module__ not in _WS or getattr(owner, "transport", None) is None:
        return None
    return WsWire(owner)

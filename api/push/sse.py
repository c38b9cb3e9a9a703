"""Server-Sent Events: an ASGI response that writes one subscription to the client.

    retry: 2000            how long a browser waits before reconnecting
    id: 41                 the "ready" message carries the starting cursor, so even a stream that has
    event: ready           seen no event yet resumes from the right place
    data: {"cursor": 41}

    id: 42                 then every event: id = cursor, event = kind, data = the event's JSON
    event: command
    data: {"id": 42, "kind": "command", ...}

    : keep-alive           a comment when nothing happened for settings.sse_keepalive_s

A client that falls behind by more than settings.subscriber_buffer events is cut off: it gets an
`event: error` with the reason when the connection can still take it, and the connection ends; it
resumes with Last-Event-ID like after any other drop.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.responses import Response

from api.push.events import SESSION_ENDED, EventLog, LiveEvent, Subscription
from api.push.wire import sse_wire

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
           (b"x-accel-buffering", b"no")]
KEEPALIVE = b": keep-alive\n\n"
FINAL_WRITE_S = 1.0


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, log: EventLog, sub: Subscription, keepalive_s: float, retry_ms: int = 2000) -> None:
        super().__init__(status_code=200)
        self.log = log
        self.sub = sub
        self.keepalive_s = keepalive_s
        self.retry_ms = retry_ms

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sub = self.sub
        sub.task = asyncio.current_task()
        wire = None
        watcher = None
        detached = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            wire = sse_wire(scope)   # None: written through the server (api/push/wire.py)
            if wire is None:
                watcher = asyncio.ensure_future(self._watch(receive))
            hello = json.dumps({"cursor": sub.cursor, "head": self.log.head}).encode()
            await self._body(send, b"retry: %d\nid: %d\nevent: ready\ndata: %s\n\n"
                             % (self.retry_ms, sub.cursor, hello))
            while not sub.live and not sub.closed:
                page = await self.log.backlog(sub)
                if page:
                    await self._events(send, page)
            while not sub.closed:
                if sub.go_direct(wire):   # from here on the broadcaster writes to the socket
                    if self.log.detach(sub, self.keepalive_s):
                        detached = True   # and this call ends: the connection is the event log's now
                        return
                    await self._direct(sub, receive)   # or this task waits for the end
                    break
                batch = await sub.next(self.keepalive_s)
                if not await self.log.still_allowed(sub):   # logged out, or the user deleted, meanwhile
                    break
                if batch:
                    await self._events(send, batch)
                elif not sub.closed:
                    await self._body(send, KEEPALIVE)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not sub.cut or (task is not None and task.uncancel() > 0):
                raise   # not our cut-off: the server is stopping
        except OSError:
            pass
        finally:
            if watcher is not None:
                watcher.cancel()
            if not detached:
                sub.close("stream ended")
        await self._finish(send)

    async def _direct(self, sub: Subscription, receive: Any) -> None:
        """While the broadcaster writes to the socket, this task only listens: for the client going away
        (http.disconnect), for the subscription closing (cut off, session ended: it cancels this wait),
        and for a keep-alive falling due. No second task, no wake-up per event."""
        me = asyncio.current_task()
        assert me is not None

        def wake(_: Subscription) -> None:
            if me is not asyncio.current_task():
                me.cancel()

        sub.on_close = wake
        try:
            while not sub.closed:
                try:
                    async with asyncio.timeout(self.keepalive_s):
                        message = await receive()
                except TimeoutError:
                    sub.keepalive()
                    continue
                if message["type"] == "http.disconnect":
                    sub.close("client disconnected")
        except asyncio.CancelledError:
            if not sub.closed or me.uncancel() > 0:
                raise   # not ours: the server is stopping
        finally:
            sub.on_close = None

    async def _finish(self, send: Any) -> None:
        final = b""
        if self.sub.cut or self.sub.reason == SESSION_ENDED:
            final = b"event: error\ndata: %s\n\n" % json.dumps({"reason": self.sub.reason}).encode()
        try:   # a client that reads nothing gets no goodbye: the connection just ends
            await asyncio.wait_for(send({"type": "http.response.body", "body": final, "more_body": False}),
                                   FINAL_WRITE_S)
        except (asyncio.TimeoutError, OSError):
            pass

    async def _events(self, send: Any, events: list[LiveEvent]) -> None:
        await self._body(send, b"".join(ev.sse for ev in events))
        self.sub.sent = events[-1].id

    @staticmethod
    async def _body(send: Any, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.sub.close("client disconnected")
                return

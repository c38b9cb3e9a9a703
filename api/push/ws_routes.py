"""The event log and commands over one WebSocket: /v1/ws.

Authenticate with `Authorization: Bearer` or, from a browser, `?token=<stream token>`. Then JSON text
frames, each with a "type":

    → {"type": "subscribe", "after": 41}             (after: null = from now)
    ← {"type": "subscribed", "cursor": 41}
    ← {"type": "event", "event": {"id": 42, "kind": "command", "at": ..., "data": {...}}}   ... in id order
    → {"type": "command", "request_id": "r1", "device_id": "bike-0001", "action": "unlock"}
    ← {"type": "reply", "request_id": "r1", "ok": true, "status": 201, "command": {...}}
    ← {"type": "reply", "request_id": "r1", "ok": false, "status": 403, "error": "you do not hold ..."}
    → {"type": "ping"}  ← {"type": "pong"}

The command's progress arrives as events. A subscriber that falls too far behind is closed with code
4008 and the reason; it reconnects and subscribes after the last event id it received.

Once the subscription is live and written directly (api/push/wire.py), the socket is detached (api/push/ws_detach.py):
the ASGI call ends, a lean protocol of ours holds the socket, and each message that arrives after is
handled here as before (`answer`), its replies written by that protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.responses import JSONResponse

from api import tokens
from api.auth import AuthError, Principal, bearer_token, resolve
from api.boundary import BadJson, check_json
from api.commands.service import IdempotencyConflict, public
from api.errors import Conflict, LatchError, NotFound, Overloaded
from api.models import CommandCreate
from api.push.events import SESSION_ENDED, CursorError, Subscription, TooManyStreams
from api.push.ws_detach import CLOSE_TOO_SLOW, CLOSE_UNAUTHORIZED, detachable_ws_wire
from api.push.ws_detach import MAX_MESSAGE as MAX_FRAME
from api.runtime import Runtime

log = logging.getLogger("latch.ws")
router = APIRouter(tags=["events"])


async def _authenticate(ws: WebSocket, rt: Runtime) -> Principal:
    """As the HTTP routes do: the token, then its session (revoked, deleted user) and role from the database."""
    token, kinds = bearer_token(ws), (tokens.ACCESS,)   # type: ignore[arg-type]
    if token is None and ws.query_params.get("token"):
        token, kinds = ws.query_params["token"], (tokens.STREAM,)
    return await rt.users.sessions.confirm(resolve(token, rt.settings.admin_token or "", rt.settings.jwt_secret, kinds))


class Connection:
    """One socket's messages. On the ASGI path (`ws`) until the socket is detached; after, one of these is made
    for each message that arrives (`answer`), its replies handed to the detached socket's `write`."""

    def __init__(self, ws: WebSocket | None, rt: Runtime, who: Principal,
                 write: Callable[[str], None] | None = None) -> None:
        self.ws = ws
        self.rt = rt
        self.who = who
        self.write = write
        self.sub: Subscription | None = None
        self.writer: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None
        self.send_lock = asyncio.Lock()
        self.busy = False       # run() is handling a message
        self.detached = False   # the socket is the event log's now: run() returns, the subscription goes on

    async def send(self, text: str) -> None:
        if self.write is not None:
            self.write(text)
            return
        assert self.ws is not None
        async with self.send_lock:
            await self.ws.send_text(text)

    async def reply(self, request_id: Any, ok: bool, status: int, **fields: Any) -> None:
        await self.send(json.dumps({"type": "reply", "request_id": request_id, "ok": ok, "status": status, **fields},
                                   default=str))

    async def run(self) -> None:
        assert self.ws is not None
        try:
            while not self._detach():
                text = await self.ws.receive_text()
                self.busy = True
                try:
                    await self.handle_text(text if len(text) <= MAX_FRAME else None)
                finally:
                    self.busy = False
        except WebSocketDisconnect:
            pass
        finally:
            if not self.detached:   # detached: the subscription goes on without this call
                if self.sub is not None:
                    self.sub.close("socket closed")
                if self.writer is not None:
                    self.writer.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await self.writer

    def _detach(self) -> bool:
        """Hand the socket over (api/push/ws_detach.py), when its subscription is direct and no message is being
        handled here; tried when the writer goes direct and after each message. True: run() ends."""
        sub = self.sub
        if self.detached or self.busy or sub is None or sub.closed or not hasattr(sub.wire, "detach"):
            return self.detached
        if not self.rt.events.detach(sub, sub.wire.ping_s or float("inf")):
            return False
        self.detached = True   # the writer has ended or is ending; the ASGI call's receive gets a disconnect
        return True

    async def handle_text(self, text: str | None) -> None:
        """A text message (None: over MAX_FRAME bytes)."""
        if text is None:
            await self.send(json.dumps({"type": "error", "error": f"frame over {MAX_FRAME} bytes"}))
            return
        try:
            msg = check_json(text)
            if not isinstance(msg, dict):
                raise BadJson("not an object")
        except BadJson as e:
            await self.send(json.dumps({"type": "error",
                                        "error": f"frames are strict JSON objects with a 'type': {e}"}))
            return
        await self.handle(msg)

    async def handle(self, msg: dict[str, Any]) -> None:
        kind, request_id = msg.get("type"), msg.get("request_id")
        if kind == "ping":
            await self.send(json.dumps({"type": "pong", "request_id": request_id}))
        elif kind == "subscribe":
            await self.subscribe(msg.get("after"), request_id)
        elif kind == "command":
            await self.command(msg, request_id)
        else:
            await self.send(json.dumps({"type": "error", "request_id": request_id,
                                        "error": f"unknown type {kind!r}: use subscribe, command or ping"}))

    async def subscribe(self, after: Any, request_id: Any) -> None:
        if self.sub is not None:
            await self.reply(request_id, False, 409, error="already subscribed on this socket")
            return
        try:
            cursor = await self.rt.events.check_cursor(None if after is None else str(after))
        except CursorError as e:
            await self.reply(request_id, False, 400, error=str(e))
            return
        try:
            self.sub = sub = self.rt.events.open(self.who, cursor)
        except TooManyStreams as e:
            await self.reply(request_id, False, 429, error=str(e))
            return
        await self.send(json.dumps({"type": "subscribed", "request_id": request_id, "cursor": sub.cursor}))
        self.writer = asyncio.get_running_loop().create_task(self.write_events(sub))

    async def write_events(self, sub: Subscription) -> None:
        sub.task = asyncio.current_task()
        assert self.ws is not None
        # None: frames go through the server (api/push/wire.py)
        wire = detachable_ws_wire(self.ws.scope, sub, functools.partial(answer, self.rt, sub))
        try:
            while not sub.live and not sub.closed:
                page = await self.rt.events.backlog(sub)
                for ev in page:
                    await self.send(ev.ws)
                if page:
                    sub.sent = page[-1].id
            while not sub.closed:
                if sub.go_direct(wire):
                    # the broadcaster writes the frames from here on; this task ends, and the socket is
                    # closed with the reason when the subscription is (cut off, session ended); the socket
                    # is detached now, or by run() once the message it is handling is answered
                    sub.on_close = self._ended
                    self._detach()
                    return
                batch = await sub.next(self.rt.settings.sse_keepalive_s)
                if not await self.rt.events.still_allowed(sub):   # logged out, or the user deleted, meanwhile
                    break
                for ev in batch:
                    await self.send(ev.ws)
                if batch:
                    sub.sent = batch[-1].id
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not sub.cut or (task is not None and task.uncancel() > 0):
                raise
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        if sub.cut:
            with contextlib.suppress(Exception):
                await self.ws.close(CLOSE_TOO_SLOW, (sub.reason or "too far behind")[:120])
        elif sub.reason == SESSION_ENDED:
            with contextlib.suppress(Exception):
                await self.ws.close(CLOSE_UNAUTHORIZED, SESSION_ENDED)

    def _ended(self, sub: Subscription) -> None:
        """A direct subscription closed: say why on the socket, as the writer task would have."""
        if sub.cut:
            code, reason = CLOSE_TOO_SLOW, (sub.reason or "too far behind")[:120]
        elif sub.reason == SESSION_ENDED:
            code, reason = CLOSE_UNAUTHORIZED, SESSION_ENDED
        else:
            return

        async def close() -> None:
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason)   # type: ignore[union-attr]

        self.closing = asyncio.get_running_loop().create_task(close())

    async def command(self, msg: dict[str, Any], request_id: Any) -> None:
        device_id = msg.get("device_id")
        try:
            body = CommandCreate(action=msg.get("action", ""), params=msg.get("params") or {}, ttl_s=msg.get("ttl_s"))
        except ValidationError as e:
            await self.reply(request_id, False, 422, error="; ".join(err["msg"] for err in e.errors()))
            return
        if not isinstance(device_id, str) or len(device_id) > 64:
            await self.reply(request_id, False, 422, error="device_id is required")
            return
        try:
            await self.rt.rights.check_command(self.who, device_id, body.action)
            device = await self.rt.registry.get(device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            if device.revoked:
                raise Conflict(f"device {device_id!r} is revoked")
            key = msg.get("idempotency_key")
            with self.rt.admission.creating_one():
                cmd, created = await self.rt.commands.create(device, body, self.who.name,
                                                             key if isinstance(key, str) else None)
        except Overloaded as e:
            await self.reply(request_id, False, e.status, error=e.reason, retry_after_s=e.retry_after_s)
            return
        except LatchError as e:   # not allowed, no such device, revoked, too large, too fast
            await self.reply(request_id, False, e.status, error=e.reason)
            return
        except IdempotencyConflict as e:
            await self.reply(request_id, False, 409, error=f"idempotency_key was already used for command {e.args[0]}")
            return
        await self.reply(request_id, True, 201 if created else 200, command=public(cmd).model_dump(mode="json"))


async def answer(rt: Runtime, sub: Subscription, text: str | None, write: Callable[[str], None]) -> None:
    """A message on a detached socket (api/push/ws_detach.py): handled as on the ASGI path; a subscribe is refused
    (409)."""
    conn = Connection(None, rt, sub.who, write)
    conn.sub = sub
    await conn.handle_text(text)


def origin_allowed(ws: WebSocket, allowed: list[str]) -> bool:
    """A browser's Origin must be the API's own (same host and port) or one of LATCH_WS_ALLOWED_ORIGINS;
    a client that sends none (not a browser: the app, a script) is let through to authenticate.
    Without this check any web page a logged-in operator visits could open the socket with the
    operator's stream token (cross-site WebSocket hijacking)."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    if origin in allowed:
        return True
    host = ws.headers.get("host", "")
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and rest == host


@router.websocket("/v1/ws")
async def websocket(ws: WebSocket) -> None:
    rt: Runtime = ws.app.state.runtime
    if not origin_allowed(ws, rt.settings.ws_allowed_origins):
        await ws.send_denial_response(JSONResponse(
            {"detail": f"Origin {ws.headers.get('origin', '')[:100]!r} may not open this socket "
                       "(LATCH_WS_ALLOWED_ORIGINS)"}, status_code=403))
        return
    try:
        who = await _authenticate(ws, rt)
    except AuthError as e:
        try:
            await ws.send_denial_response(JSONResponse({"detail": str(e)}, status_code=401))
        except RuntimeError:   # the server cannot send an HTTP answer to an upgrade: close instead
            await ws.close(CLOSE_UNAUTHORIZED, str(e)[:120])
        return
    await ws.accept()
    await Connection(ws, rt, who).run()

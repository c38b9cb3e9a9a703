"""The request id: taken from `X-Request-ID` (when it is a sane one) or made here, returned on every response.

A pure ASGI middleware (no response buffering: event streams and WebSockets pass straight through). The id
is set in foundation.logs.request_id for the request's whole handling, so every log line the request causes
carries it; one DEBUG line per HTTP request says method, path (never the query string: stream tokens
travel there), status and time.

Accepted from the client: 1-128 characters of letters, digits and `-_.:`; anything else (or nothing) is
replaced by a fresh random id, so a log line never carries what a client made up beyond that alphabet.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from foundation.logs import request_id

HEADER = b"x-request-id"
_VALID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

log = logging.getLogger("latch.http")

Scope = dict[str, Any]
Message = dict[str, Any]


def accepted(value: bytes | None) -> str:
    """The client's id when it is valid, else a new one."""
    if value is not None:
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if _VALID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class RequestId:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == HEADER), None)
        rid = accepted(given)
        token = request_id.set(rid)
        started = time.monotonic()
        status: list[int] = []

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["type"] == "http" and log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s -> %s in %.1f ms", scope.get("method"), scope.get("path"),
                          status[0] if status else "no response", (time.monotonic() - started) * 1000)
            request_id.reset(token)

"""The HTTP boundary: what any request body may be, before a route sees it, and how a refusal reads.

Every HTTP request passes `BodyGuard` (an ASGI middleware) first:

- its body is at most `max_body_bytes` (LATCH_MAX_BODY_BYTES, default 64 KiB): a larger Content-Length is
  refused before a byte is read, a chunked body as soon as it passes the limit (413). The largest body
  a client legitimately sends is a fleet command naming devices by id; 64 KiB holds ~3,000 of them,
  and larger fleets are targeted by tag or zone.
- a JSON body must be strict JSON (`check_json`): no NaN/Infinity, no number that overflows a double,
  no lone UTF-16 surrogate, no NUL character (PostgreSQL text cannot hold one), at most
  `MAX_JSON_DEPTH` levels of nesting. Python's json module accepts all of these and they used to
  reach the database, the signer or the response renderer and end in a 500.

The broker hooks (/v1/broker/...) are left to parse their own bodies: EMQX treats any 4xx as "no
opinion" and asks its next authenticator, so they answer every body, however malformed, with an explicit
deny (api/registry/broker_auth_routes.py). Their bodies are still bounded.

`validation_error_handler` renders 422s without echoing the input (passwords came back in the
detail) — at most a short prefix of a non-secret scalar.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = logging.getLogger("latch.boundary")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_JSON_DEPTH = 32          # arrays/objects inside each other; the deepest real body (a fleet target) has 3
ECHO_PREFIX = 40             # characters of a refused scalar shown back in a 422
SECRET_FIELDS = ("password", "token", "secret", "key")


class BadJson(ValueError):
    """The text is not strict JSON; str(e) says why."""


def _walk(value: Any, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise BadJson(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        if "\x00" in value:
            raise BadJson("strings may not contain NUL (\\u0000)")
    elif isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                raise BadJson("object keys may not contain NUL (\\u0000)")
            if isinstance(v, (dict, list, str)):
                _walk(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, (dict, list, str)):
                _walk(v, depth + 1)


def check_json(data: bytes | str) -> Any:
    """Parse `data` as strict JSON (see the module docstring); BadJson when it is not."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadJson(str(e)) from None
    _walk(value, 1)
    return value


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _answer(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
                  ) -> None:
    payload = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class BodyGuard:
    """Bounds and checks every HTTP request body before the app reads it (module docstring)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, own_parsers: tuple[str, ...] = ("/v1/broker/",)) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.own_parsers = own_parsers   # path prefixes whose routes answer malformed JSON themselves

    def _too_large(self) -> dict[str, Any]:
        return {"detail": f"request body over {self.max_body_bytes} bytes (LATCH_MAX_BODY_BYTES)"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type = ""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _answer(send, 400, {"detail": "Content-Length is not a number"})
                    return
                if declared > self.max_body_bytes:
                    await _answer(send, 413, self._too_large())
                    return
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client went away while sending
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _answer(send, 413, self._too_large())
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(content_type) and not scope.get("path", "").startswith(self.own_parsers):
            try:
                check_json(body)
            except BadJson as e:
                await _answer(send, 422, {"detail": [{"type": "json_invalid", "loc": ["body"],
                                                      "msg": f"body is not strict JSON: {e}"}]})
                return
        await self.app(scope, _replay([body], None, receive), send)


def _replay(bodies: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the real channel (disconnects)."""
    queue: list[Message] = [{"type": "http.request", "body": b, "more_body": False} for b in bodies]
    if pending is not None:
        queue.append(pending)

    async def replayed() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replayed


def _safe_input(loc: tuple[Any, ...], value: Any) -> Any:
    """What of a refused value is shown back: a short prefix of a scalar, never a secret, never a container."""
    if any(isinstance(p, str) and any(s in p.lower() for s in SECRET_FIELDS) for p in loc):
        return "<hidden>"
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, str):
        text = value[:ECHO_PREFIX].encode("utf-8", "replace").decode("utf-8")
        return text + ("…" if len(value) > ECHO_PREFIX else "")
    return f"<{type(value).__name__}>"


def _safe_text(value: Any) -> str:
    return str(value).encode("utf-8", "replace").decode("utf-8")[:300]


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A 422 naming each field and what is wrong with it, echoing at most a short, non-secret prefix."""
    assert isinstance(exc, RequestValidationError)
    detail = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        item: dict[str, Any] = {"type": err.get("type"), "loc": [p if isinstance(p, int) else _safe_text(p)
                                                                  for p in loc],
                                "msg": _safe_text(err.get("msg", ""))}
        if "input" in err:
            item["input"] = _safe_input(loc, err["input"])
        detail.append(item)
    return JSONResponse({"detail": detail}, status_code=422)

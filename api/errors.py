"""What a caller can be refused: one tree of errors, and the one place it becomes an HTTP answer.

Services, policies and stores raise these and know nothing of HTTP frameworks; `install` registers one handler
on the app that answers `{"detail": <the message>}` with the error's status and headers (Retry-After where
there is one) — the body FastAPI's HTTPException gives, so clients see no difference. Routes neither catch
nor convert them; a WebSocket or MQTT handler that refuses inside its own protocol reads `status` and
`str(e)`.

    LatchError                 400 the request cannot be done as asked
    ├── Forbidden              403 not yours, or not allowed to you
    ├── NotFound               404 no such thing (or not one the caller may know of)
    ├── Conflict               409 not in a state that allows it
    ├── TooLarge               413 more than a lock or the API takes
    ├── Invalid                422 well-formed, but not a valid value
    ├── RateLimited            429 too fast or too many; Retry-After
    └── Overloaded             503 this process cannot take it now; Retry-After
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI, Request


class LatchError(Exception):
    """A refusal a caller can act on: `str(e)` says why, `status` is its HTTP status."""

    status = 400

    def __init__(self, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers = headers


class Forbidden(LatchError):
    status = 403


class NotFound(LatchError):
    status = 404


class Conflict(LatchError):
    status = 409


class TooLarge(LatchError):
    status = 413


class Invalid(LatchError):
    status = 422


class _RetryLater(LatchError):
    """A refusal that passes: the answer says when to try again (Retry-After, whole seconds, at least 1)."""

    def __init__(self, reason: str, retry_after_s: int = 1) -> None:
        self.retry_after_s = max(1, retry_after_s)
        super().__init__(reason, {"Retry-After": str(self.retry_after_s)})


class RateLimited(_RetryLater):
    status = 429


class Overloaded(_RetryLater):
    status = 503


def install(app: FastAPI) -> None:
    """Answer every LatchError the routes let through (see the module docstring)."""
    from fastapi.responses import JSONResponse

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LatchError)
        return JSONResponse({"detail": exc.reason}, status_code=exc.status, headers=exc.headers)

    app.add_exception_handler(LatchError, refused)

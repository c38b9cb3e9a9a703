"""Logging for every `latch` process: text or JSON lines, the context fields, quiet libraries, redaction.

One event per line. `--log-format json` (or LATCH_LOG_FORMAT=json) writes each event as one JSON object
(`ts`, `level`, `logger`, `msg`, and `command_id`, `device_id`, `request_id` where they apply, `exc` for a
traceback); `text` writes the classic `time LEVEL logger: message [key=value ...]`. Default: text on a
terminal, JSON otherwise (a service manager, docker logs or a pipe: a log collector parses it).

Context fields come from `extra={"command_id": ..., "device_id": ...}` on the call, or from the context
variables below (`request_id` is set per HTTP request by api/request_id.py).

No secret belongs in a log line: the code never logs one, and the libraries that would at DEBUG (SQL
statements with their parameters, aiosqlite's results, httpx) are kept at WARNING. As a last guard,
`redact()` registers a process's own secrets (operator token, service and signing keys) and every line
is scrubbed of them (tests/latch/test_logs.py proves no secret reaches the output).

This module imports nothing outside the standard library: `latch --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar

FORMATS = ("json", "text")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
CONTEXT_FIELDS = ("request_id", "command_id", "device_id")

request_id: ContextVar[str | None] = ContextVar("latch_request_id", default=None)

# libraries that are noisy at INFO or, at DEBUG, would log statement parameters or URLs with credentials
QUIET = {"amqtt": logging.WARNING, "gmqtt": logging.WARNING, "transitions": logging.WARNING,
         "alembic": logging.WARNING, "httpx": logging.WARNING, "httpcore": logging.WARNING,
         "sqlalchemy": logging.WARNING, "aiosqlite": logging.WARNING, "asyncio": logging.WARNING,
         "multipart": logging.WARNING, "python_multipart": logging.WARNING, "websockets": logging.WARNING,
         "psycopg": logging.WARNING, "asyncpg": logging.WARNING, "passlib": logging.WARNING}

_secrets: set[str] = set()


def redact(*values: str | None) -> None:
    """Never let these strings out in a log line (each is replaced by `[redacted]`)."""
    _secrets.update(v for v in values if v and len(v) >= 8)


def _scrub(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, "[redacted]")
    return text


def _context(record: logging.LogRecord) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is None and name == "request_id":
            value = request_id.get()
        if value is not None:
            out[name] = str(value)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        event.update(_context(record))
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack"] = record.stack_info
        return _scrub(json.dumps(event, ensure_ascii=False, default=str))


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [request_id=... command_id=...]`; a traceback stays multi-line here."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = _context(record)
        if ctx:
            head, sep, rest = line.partition("\n")
            line = head + " [" + " ".join(f"{k}={v}" for k, v in ctx.items()) + "]" + sep + rest
        return _scrub(line)


def default_format(stream: object = None) -> str:
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger once for this process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if (fmt or default_format()) == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name, lib_level in QUIET.items():
        logging.getLogger(name).setLevel(lib_level)


@contextlib.contextmanager
def shutting_down() -> Iterator[None]:
    """While a process stops: gmqtt's clients may still answer a message that arrived as their socket closed
    (a PUBACK written to a closed transport: `[TRYING WRITE TO CLOSED SOCKET]`, once per lock). Harmless at
    shutdown, so that logger says nothing below ERROR meanwhile."""
    lg = logging.getLogger("gmqtt")
    before = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(before)

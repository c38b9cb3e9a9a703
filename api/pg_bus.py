"""PostgreSQL LISTEN/NOTIFY: how API replicas sharing one database hear about each other's changes.

    channel          payload                         sent by                      heard by
    latch_events     the commit's events, or its      latch_append_events()        every replica's EventLog
                     newest id when they do not fit   (migration 0003; api/push/events.py)
    latch_deadline   a command deadline, ms           api/commands/service.py      the sweeper (commands/sweeper.py)

A notification is sent with pg_notify() inside the transaction that makes the change (for events, by
the same SQL function that inserts them), so it is
delivered only if that transaction commits, and notifications of different transactions arrive in
commit order. A notification says "look": the rows are the truth, and a listener that reconnects
after losing its connection re-reads everything it may have missed (`on_reconnect`).
SQLite has no such thing, and needs none: it serves one API process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlmodel import Session

from api.db import sync_url

log = logging.getLogger("latch.pg")

EVENTS = "latch_events"
DEADLINE = "latch_deadline"
RECONNECT_S = (0.05, 0.2, 1.0, 2.0)   # backoff after losing the listening connection


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy URL (any PostgreSQL driver name) as a libpq connection string."""
    return make_url(sync_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


def notify(s: Session, channel: str, payload: str) -> None:
    """Queue a notification in `s`'s transaction (sent at commit)."""
    s.connection().execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})


def no_notify(s: Session, channel: str, payload: str) -> None:
    """SQLite: one process, nobody else to tell."""


class PgListener:
    """One connection LISTENing on the channels; handlers run on the event loop, in arrival order."""

    def __init__(self, url: str, handlers: dict[str, Callable[[str], None]],
                 on_reconnect: Callable[[], None]) -> None:
        self._dsn = libpq_dsn(url)
        self._handlers = handlers
        self._on_reconnect = on_reconnect
        self._conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        await self._connect()   # the first connection fails loudly: a wrong URL should stop the start
        self._task = asyncio.get_running_loop().create_task(self._run(), name="latch-pg-listen")

    async def _connect(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        for channel in self._handlers:
            await conn.execute(f'LISTEN "{channel}"')
        self._conn = conn
        self.connected.set()

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                if self._conn is None:
                    await self._connect()
                    log.info("listening on PostgreSQL again; re-reading what may have been missed")
                    self._on_reconnect()
                attempt = 0
                assert self._conn is not None
                async for n in self._conn.notifies():
                    handler = self._handlers.get(n.channel)
                    if handler is not None:
                        try:
                            handler(n.payload)
                        except Exception:
                            log.exception("handler for %s failed on %r", n.channel, n.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — the connection broke: reconnect, then resync
                log.warning("PostgreSQL listening connection lost (%s); reconnecting", e)
            self.connected.clear()
            await self._close_conn()
            await asyncio.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
            attempt += 1

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 — already broken
                pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_conn()

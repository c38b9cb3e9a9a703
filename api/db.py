"""The database: SQLModel over a synchronous SQLAlchemy engine, driven from asyncio through threads.

Why threads and not an async driver: measured on this project's command path,
aiosqlite costs one event-loop round trip per statement (BEGIN, SELECT,
UPDATE, INSERT, COMMIT...), and with SQLite's single writer those round
trips queue behind each other — 40 commands/s at multi-second latency with
the loop mostly idle. Here each unit of work is a plain function that runs a
whole transaction on a database thread: one hop per transaction, the event
loop never blocks, and the writer never waits on the loop.

SQLite: one writer thread (SQLite has one writer; more would nap in its busy
handler) and a few reader threads (WAL lets them read while it writes).
Other databases: several writer threads; correctness comes from conditional
updates, not from the single writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlmodel import Session, SQLModel

T = TypeVar("T")

# URLs naming async drivers are accepted and mapped to their synchronous twins.
_SYNC_DRIVERS = {"sqlite+aiosqlite": "sqlite", "postgresql+asyncpg": "postgresql+psycopg"}


def sync_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return _SYNC_DRIVERS.get(scheme, scheme) + sep + rest


def make_engine(url: str) -> Engine:
    url = sync_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=8, max_overflow=0)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")   # durable at checkpoints; no fsync per commit
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_size=16, max_overflow=8, pool_pre_ping=True)


class Database:
    """Runs units of work — functions of a Session — on database threads."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        sqlite = self.engine.dialect.name == "sqlite"
        self._writer = ThreadPoolExecutor(max_workers=1 if sqlite else 8, thread_name_prefix="latch-db-write")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="latch-db-read")

    def _run(self, fn: Callable[[Session], T]) -> T:
        with Session(self.engine, expire_on_commit=False) as session:
            return fn(session)

    async def write(self, fn: Callable[[Session], T]) -> T:
        """Run `fn` (which commits) on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._run, fn)

    async def read(self, fn: Callable[[Session], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._run, fn)

    async def create_schema(self) -> None:
        from api import event_models, models, rider_models  # noqa: F401  (registers the tables)

        await asyncio.get_running_loop().run_in_executor(self._writer, SQLModel.metadata.create_all, self.engine)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._writer.shutdown)
        await loop.run_in_executor(None, self._readers.shutdown)
        self.engine.dispose()

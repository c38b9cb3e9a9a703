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
PostgreSQL: several writer threads; correctness comes from conditional
updates and row locks, not from a single writer (several API processes may
share the database).

Writes are queued by priority (`Priority`): a rider's unlock is taken before
the next batch of a 10,000-device fleet rollout, however long that queue is.

Schema: Alembic migrations (api/migrations; `latch db upgrade`). A server
checks the database is at the code's revision before it serves and refuses
to start otherwise (api/schema.py).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlmodel import Session

T = TypeVar("T")

# URLs naming async drivers are accepted and mapped to their synchronous twins.
_SYNC_DRIVERS = {"sqlite+aiosqlite": "sqlite", "postgresql+asyncpg": "postgresql+psycopg",
                 "postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}


class Priority(IntEnum):
    """Order of the write queue: lower first. See api/command_priority.py for which command gets which."""
    INTERACTIVE = 0   # a person is waiting: unlock, lock, device answers
    ROUTINE = 5       # other single commands
    BULK = 10         # fleet rollouts


class _PriorityPool:
    """Worker threads taking jobs in (priority, arrival) order."""

    def __init__(self, workers: int, name: str) -> None:
        self._q: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for th in self._threads:
            th.start()

    def submit(self, priority: int, fn: Callable[..., T], *args: Any) -> Future[T]:
        fut: Future[T] = Future()
        self._q.put((priority, next(self._seq), (fut, fn, args)))
        return fut

    def _work(self) -> None:
        while True:
            _, _, job = self._q.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 — handed to the awaiting coroutine
                fut.set_exception(e)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._q.put((1 << 30, next(self._seq), None))   # after every queued job
        for th in self._threads:
            th.join()


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
    return create_engine(url, pool_size=12, max_overflow=4, pool_pre_ping=True)


class Database:
    """Runs units of work — functions of a Session — on database threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._writer = _PriorityPool(8 if self.is_postgres else 1, "latch-db-write")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="latch-db-read")

    def _run(self, fn: Callable[[Session], T]) -> T:
        with Session(self.engine, expire_on_commit=False) as session:
            return fn(session)

    async def write(self, fn: Callable[[Session], T], priority: int = Priority.INTERACTIVE) -> T:
        """Run `fn` (which commits) on a writer thread, after every queued write of higher priority."""
        return await asyncio.wrap_future(self._writer.submit(priority, self._run, fn))

    async def read(self, fn: Callable[[Session], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._run, fn)

    async def run_sync(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the writer queue (schema work: migrations, checks)."""
        return await asyncio.wrap_future(self._writer.submit(Priority.INTERACTIVE, fn, self.engine))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._writer.shutdown)
        await loop.run_in_executor(None, self._readers.shutdown)
        self.engine.dispose()

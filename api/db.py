"""The database: one SQLModel codebase, run through a synchronous or an asynchronous driver.

Every unit of work is a plain function of a Session that runs a whole transaction (api/commands/service.py,
api/registry/devices.py, ...). The URL's driver decides how it is driven from asyncio:

    URL scheme                         driver       how a unit of work runs
    sqlite://  (the default)           sqlite3      writes: on the event loop, group-committed once per
                                                    loop iteration (api/loop_commit.py; bulk ones on a
                                                    thread); reads: on database threads
    postgresql+psycopg://              psycopg 3    on a database thread (8 writers)
    sqlite+aiosqlite://                aiosqlite    on the event loop: AsyncSession.run_sync, each
    postgresql+asyncpg:// (postgresql://)  asyncpg  statement awaited through the driver (greenlets)

Why both. The issue that introduced PostgreSQL asks for one async codebase on aiosqlite and
asyncpg, and that is what the async rows are: the same functions, awaited statement by statement.
Measured on this project's command path (bench/db_ops.py, docs/scaling.md), aiosqlite costs an
event-loop round trip per statement through its own thread, and with SQLite's single writer those
round trips queue behind each other; the threaded sqlite3 driver runs the whole transaction in
one hop and is faster, so plain `sqlite://` stays the default. On PostgreSQL asyncpg is the
default for `postgresql://` (figures in docs/scaling.md); psycopg on threads stays available.
Either way the event loop never blocks on I/O.

SQLite: one writer at a time (SQLite has one writer; more would nap in its busy handler) and a
few readers (WAL lets them read while it writes). The writer commits in groups: every unit of work
waiting when it is free runs in one transaction, each in its own savepoint (api/group_commit.py),
on the event loop by default (api/loop_commit.py: a commit is a write() into the page cache, the
checkpoints that fsync run on their own thread) or on a thread of its own with
LATCH_SQLITE_WRITER=thread. PostgreSQL: eight writers; correctness comes from
conditional updates and row locks, not from a single writer (several API processes may share the
database).

Writes are queued by priority (`Priority`): a rider's unlock is taken before the next batch of a
10,000-device fleet rollout, however long that queue is.

Schema: Alembic migrations (api/migrations; `latch db upgrade`), always through the synchronous
twin of the driver on a thread (Alembic is synchronous). A server checks the database is at the
code's revision before it serves and refuses to start otherwise (api/schema.py).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from api.admission import StandingDelay
from api.group_commit import DURABLE, LOOP_DURABLE, GroupCommitWriter, run_durable
from api.loop_commit import LoopGroupCommitWriter

T = TypeVar("T")

# What each accepted URL scheme is driven by: the SQLAlchemy driver name, and whether it is async.
_DRIVERS: dict[str, tuple[str, bool]] = {
    "sqlite": ("sqlite", False),
    "sqlite+pysqlite": ("sqlite", False),
    "sqlite+aiosqlite": ("sqlite+aiosqlite", True),
    "postgresql": ("postgresql+asyncpg", True),
    "postgres": ("postgresql+asyncpg", True),
    "postgresql+asyncpg": ("postgresql+asyncpg", True),
    "postgresql+psycopg": ("postgresql+psycopg", False),
}
# The synchronous twin of each driver: schema work (Alembic) and the database-level tools.
_SYNC_TWIN = {"sqlite+aiosqlite": "sqlite", "postgresql+asyncpg": "postgresql+psycopg"}


class Priority(IntEnum):
    """Order of the write queue: lower first. See api/commands/priority.py for which command gets which."""
    ANSWER = -1       # work already accepted: a device's answer, a timeout (finishing beats starting)
    INTERACTIVE = 0   # a person is waiting: unlock, lock
    REPORT = 3        # a device's presence and state reports (a burst of them must not hold an unlock)
    ROUTINE = 5       # other single commands
    BULK = 10         # fleet rollouts


class _PriorityPool:
    """Worker threads taking jobs in (priority, arrival) order (the synchronous drivers)."""

    def __init__(self, workers: int, name: str, on_wait: Callable[[int, float], None] = lambda p, s: None) -> None:
        self._q: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._on_wait = on_wait   # each job's time in the queue, seconds (api/admission.py)
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for th in self._threads:
            th.start()

    def submit(self, priority: int, fn: Callable[..., T], *args: Any) -> Future[T]:
        fut: Future[T] = Future()
        self._q.put((priority, next(self._seq), (fut, fn, args, time.monotonic())))
        return fut

    def _work(self) -> None:
        while True:
            priority, _, job = self._q.get()
            if job is None:
                return
            fut, fn, args, queued_at = job
            self._on_wait(priority, time.monotonic() - queued_at)
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


class PriorityGate:
    """At most `slots` holders at once; waiters are let in in (priority, arrival) order (the async drivers).

    A waiter cancelled after it was handed a slot gives the slot on to the next waiter."""

    def __init__(self, slots: int, on_wait: Callable[[int, float], None] = lambda p, s: None) -> None:
        self._on_wait = on_wait   # each holder's wait for its slot, seconds (api/admission.py)
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self._on_wait(priority, 0.0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        queued_at = time.monotonic()
        try:
            await fut
            self._on_wait(priority, time.monotonic() - queued_at)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():   # the slot was ours already: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)   # the slot goes straight to this waiter
                return
        self._free += 1


def driver_of(url: str) -> tuple[str, bool]:
    """(SQLAlchemy driver name, is async) for a database URL; ValueError naming the accepted ones."""
    scheme = url.partition("://")[0]
    try:
        return _DRIVERS[scheme]
    except KeyError:
        raise ValueError(f"unsupported database URL scheme {scheme!r}: use one of "
                         f"{', '.join(sorted(_DRIVERS))}") from None


def _with_driver(url: str, driver: str) -> str:
    return driver + "://" + url.partition("://")[2]


def driver_url(url: str) -> str:
    """The URL with the driver Latch drives it with spelled out (`postgresql://` → asyncpg)."""
    return _with_driver(url, driver_of(url)[0])


def sync_url(url: str) -> str:
    """The URL for the synchronous twin of its driver (Alembic, libpq tools, Mosquitto config)."""
    driver = driver_of(url)[0]
    return _with_driver(url, _SYNC_TWIN.get(driver, driver))


def _sqlite_path(url: str) -> str | None:
    path = url.split("///", 1)[-1]
    return path if path and path != ":memory:" else None


def _sqlite_file(url: str) -> None:
    path = _sqlite_path(url)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(engine: Engine, autocheckpoint: bool = True) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")   # a commit survives kill -9 once written; fsync at checkpoints
        cur.execute("PRAGMA busy_timeout=30000")
        if not autocheckpoint:   # the writer on the event loop: checkpoints (fsync) on their own thread
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()


def _plain_savepoints(engine: Engine) -> None:
    """SAVEPOINT, RELEASE and ROLLBACK TO as plain strings on the driver's cursor: SQLAlchemy compiles
    each of them anew (every savepoint has its own name, so none is cached), and the group commit
    (api/group_commit.py) makes two per unit of work."""
    def run(connection, sql: str) -> None:  # type: ignore[no-untyped-def]
        connection.connection.dbapi_connection.execute(sql)

    d = engine.dialect
    d.do_savepoint = lambda connection, name: run(connection, f'SAVEPOINT "{name}"')  # type: ignore[method-assign]
    d.do_release_savepoint = lambda connection, name: run(  # type: ignore[method-assign]
        connection, f'RELEASE SAVEPOINT "{name}"')
    d.do_rollback_to_savepoint = lambda connection, name: run(  # type: ignore[method-assign]
        connection, f'ROLLBACK TO SAVEPOINT "{name}"')


def make_engine(url: str, autocheckpoint: bool = True) -> Engine:
    """A synchronous engine (the URL's synchronous twin driver)."""
    url = sync_url(url)
    if url.startswith("sqlite"):
        _sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=8, max_overflow=0)
        _sqlite_pragmas(engine, autocheckpoint)
        _plain_savepoints(engine)
        return engine
    return create_engine(url, pool_size=12, max_overflow=4, pool_pre_ping=True)


def make_async_engine(url: str) -> AsyncEngine:
    """An asyncio engine for an async driver URL (sqlite+aiosqlite, postgresql+asyncpg)."""
    url = driver_url(url)
    if url.startswith("sqlite"):
        _sqlite_file(url)
        engine = create_async_engine(url, connect_args={"timeout": 30}, pool_size=8, max_overflow=0)
        _sqlite_pragmas(engine.sync_engine)
        return engine
    return create_async_engine(url, pool_size=12, max_overflow=4, pool_pre_ping=True)


class Database:
    """Runs units of work — functions of a Session that run one transaction — for the event loop."""

    def __init__(self, url: str, max_batch: int = 64, sqlite_writer: str = "loop") -> None:
        """`sqlite_writer`: where SQLite's group-committing writer runs with the sqlite3 driver, "loop"
        (api/loop_commit.py) or "thread" (api/group_commit.py); other drivers ignore it."""
        self.url = url
        self.driver, self.is_async = driver_of(url)
        self.is_postgres = self.driver.startswith("postgresql")
        if sqlite_writer not in ("loop", "thread"):
            raise ValueError(f"sqlite_writer must be 'loop' or 'thread', not {sqlite_writer!r}")
        writers = 8 if self.is_postgres else 1
        on_loop = writers == 1 and not self.is_async and sqlite_writer == "loop"
        # how long a person's writes stand in the queue (api/admission.py): answers and interactive commands
        # only — a backlog of reports or a rollout behind them is not a reason to refuse an unlock
        self.write_delay = StandingDelay()
        # the synchronous engine: every unit of work with a sync driver; schema work with either
        self.engine = make_engine(url, autocheckpoint=not on_loop)
        self._schema = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latch-db-schema")
        self.async_engine: AsyncEngine | None = None
        self._writer: GroupCommitWriter | LoopGroupCommitWriter | _PriorityPool | None = None
        if self.is_async:
            self.async_engine = make_async_engine(url)
            self._write_gate = PriorityGate(writers, self._observe_wait)
            self._read_gate = asyncio.Semaphore(4)
        elif on_loop:   # SQLite: group commit on the event loop (api/loop_commit.py)
            self._writer = LoopGroupCommitWriter(self.engine, self._observe_wait, max_batch=max_batch,
                                                 database_file=_sqlite_path(sync_url(url)),
                                                 off_loop_priority=Priority.BULK)
            self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="latch-db-read")
        elif writers == 1:   # SQLite: group commit on a thread (api/group_commit.py)
            self._writer = GroupCommitWriter(self.engine, self._observe_wait, max_batch=max_batch)
            self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="latch-db-read")
        else:
            self._writer = _PriorityPool(writers, "latch-db-write", self._observe_wait)
            self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="latch-db-read")

    def _observe_wait(self, priority: int, wait_s: float) -> None:
        if priority <= Priority.INTERACTIVE:
            self.write_delay.observe(wait_s)

    def _run(self, fn: Callable[[Session], T]) -> T:
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                return fn(session)
            finally:   # what it committed is committed: its after-durable callbacks (api/group_commit.py)
                run_durable(session.info.pop(DURABLE, []), session.info.pop(LOOP_DURABLE, []))

    async def _run_async(self, fn: Callable[[Session], T]) -> T:
        assert self.async_engine is not None
        async with AsyncSession(self.async_engine, expire_on_commit=False) as session:
            try:
                return await session.run_sync(fn)
            finally:
                info = session.sync_session.info
                run_durable(info.pop(DURABLE, []), info.pop(LOOP_DURABLE, []))

    async def write(self, fn: Callable[[Session], T], priority: int = Priority.INTERACTIVE) -> T:
        """Run `fn` (which commits) as one of the writers, after every queued write of higher priority."""
        if isinstance(self._writer, (GroupCommitWriter, LoopGroupCommitWriter)):
            return await self._writer.submit(priority, fn)
        if isinstance(self._writer, _PriorityPool):
            return await asyncio.wrap_future(self._writer.submit(priority, self._run, fn))
        await self._write_gate.acquire(priority)
        try:
            return await self._run_async(fn)
        finally:
            self._write_gate.release()

    async def read(self, fn: Callable[[Session], T]) -> T:
        if not self.is_async:
            return await asyncio.get_running_loop().run_in_executor(self._readers, self._run, fn)
        async with self._read_gate:
            return await self._run_async(fn)

    async def run_sync(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` with the synchronous engine on a thread of its own (schema work: migrations, checks)."""
        return await asyncio.get_running_loop().run_in_executor(self._schema, fn, self.engine)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self.async_engine is not None:
            await self.async_engine.dispose()
        elif self._writer is not None:
            if isinstance(self._writer, LoopGroupCommitWriter):
                await self._writer.drain()
            await loop.run_in_executor(None, self._writer.shutdown)
            await loop.run_in_executor(None, self._readers.shutdown)
        await loop.run_in_executor(None, self._schema.shutdown)
        self.engine.dispose()

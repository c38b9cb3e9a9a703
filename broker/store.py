"""The broker's durable state: SQLite in WAL mode, written by one thread with group commit.

What is stored (``DATA_DIR/broker.db``, separate from the API's database):

    session(client_id PK, expires_at, role, name)      persistent sessions and who owns them;
                                                       expires_at NULL while connected
    subscription(client_id, filter, qos)               their subscriptions
    queue(client_id, seq, topic, payload, qos, state)  QoS 1/2 messages queued or in flight to a
                                                       persistent session; state 0 = PUBLISH not yet
                                                       acknowledged, 1 = PUBREC received (PUBREL sent,
                                                       waiting for PUBCOMP); the packet id is
                                                       seq % 65535 + 1
    qos2_in(client_id, packet_id)                      incoming QoS 2 packet ids PUBREC'd, not yet released
    retained(topic PK, payload, qos)                   retained messages

How it is written: every change the broker makes is appended to the open
batch (``op``); whatever must only happen once a change is durable (a
PUBACK/PUBREC/PUBREL/PUBCOMP/SUBACK/CONNACK to the client, a delivery to a
subscriber) is registered with ``after``. Once per loop iteration the open
batch is applied in one transaction and committed; then its callbacks run, in
order. Under load one commit carries everything that arrived during an
iteration (group commit). Callbacks registered while nothing is pending run
at once, so the order of everything the broker sends is the order in which it
decided it.

``synchronous=NORMAL`` (default) makes a commit survive the *process* dying
at any moment (kill -9): the WAL frames are in the OS before the callbacks
run. A commit is then a write() into the page cache, so it runs on the loop
thread (measured: cheaper than handing batches to a thread, which costs a
wake-up and GIL hand-offs per batch). Checkpoints, which fsync, run on their
own thread and connection (PASSIVE, never blocking a commit).
``fsync=True`` selects ``synchronous=FULL``, which also survives power loss;
its commits fsync, so they run on a writer thread while the next batch fills
up.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("latch.broker.store")

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session(client_id TEXT PRIMARY KEY, expires_at REAL, role TEXT, name TEXT)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscription(client_id TEXT, filter TEXT, qos INTEGER,
                                        PRIMARY KEY(client_id, filter)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue(client_id TEXT, seq INTEGER, topic TEXT, payload BLOB, qos INTEGER,
                                 state INTEGER, PRIMARY KEY(client_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS qos2_in(client_id TEXT, packet_id INTEGER,
                                   PRIMARY KEY(client_id, packet_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained(topic TEXT PRIMARY KEY, payload BLOB, qos INTEGER) WITHOUT ROWID;
"""

# operation ids -> the statements they run with the same parameters
SESSION_UPSERT, SESSION_DELETE, SUB_UPSERT, SUB_DELETE, QUEUE_INSERT, QUEUE_DELETE, QUEUE_RELEASED, \
    QOS2_IN_INSERT, QOS2_IN_DELETE, RETAIN_SET, RETAIN_DELETE = range(11)

SQL: dict[int, tuple[str, ...]] = {
    SESSION_UPSERT: ("INSERT OR REPLACE INTO session(client_id, expires_at, role, name) VALUES (?, ?, ?, ?)",),
    SESSION_DELETE: ("DELETE FROM session WHERE client_id = ?", "DELETE FROM subscription WHERE client_id = ?",
                     "DELETE FROM queue WHERE client_id = ?", "DELETE FROM qos2_in WHERE client_id = ?"),
    SUB_UPSERT: ("INSERT OR REPLACE INTO subscription(client_id, filter, qos) VALUES (?, ?, ?)",),
    SUB_DELETE: ("DELETE FROM subscription WHERE client_id = ? AND filter = ?",),
    QUEUE_INSERT: ("INSERT OR REPLACE INTO queue(client_id, seq, topic, payload, qos, state) "
                   "VALUES (?, ?, ?, ?, ?, 0)",),
    QUEUE_DELETE: ("DELETE FROM queue WHERE client_id = ? AND seq = ?",),
    QUEUE_RELEASED: ("UPDATE queue SET state = 1, payload = x'' WHERE client_id = ? AND seq = ?",),
    QOS2_IN_INSERT: ("INSERT OR IGNORE INTO qos2_in(client_id, packet_id) VALUES (?, ?)",),
    QOS2_IN_DELETE: ("DELETE FROM qos2_in WHERE client_id = ? AND packet_id = ?",),
    RETAIN_SET: ("INSERT OR REPLACE INTO retained(topic, payload, qos) VALUES (?, ?, ?)",),
    RETAIN_DELETE: ("DELETE FROM retained WHERE topic = ?",),
}


@dataclass
class Snapshot:
    sessions: list[tuple[str, float | None, str, str]] = field(default_factory=list)
    subscriptions: list[tuple[str, str, int]] = field(default_factory=list)
    queue: list[tuple[str, int, str, bytes, int, int]] = field(default_factory=list)  # ordered by client, seq
    qos2_in: list[tuple[str, int]] = field(default_factory=list)
    retained: list[tuple[str, bytes, int]] = field(default_factory=list)


class StoreFailed(RuntimeError):
    """The store could not commit: nothing more may be acknowledged."""


class MemoryStore:
    """No durability: every callback runs at once. For tests and `--no-persistence` style use."""

    durable = False
    done_no = 0

    def load(self) -> Snapshot:
        return Snapshot()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def token(self) -> int:
        return 0

    def op(self, op: int, params: tuple[Any, ...]) -> None:
        pass

    def after(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    async def close(self) -> None:
        pass


class SqliteStore:
    durable = True

    def __init__(self, path: Path, *, fsync: bool = False, on_failure: Callable[[BaseException], None] | None = None,
                 inline: bool | None = None, commit_interval: float = 0.001) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        # checkpoints (which fsync) run on their own thread, never inside a commit the broker waits for
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.execute("PRAGMA journal_size_limit=67108864")
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: broker store schema {row[0]}, this broker knows {SCHEMA_VERSION}")
        self._on_failure = on_failure
        # commits on the loop thread unless they fsync (synchronous=FULL), which would stall the loop
        self.inline = (not fsync) if inline is None else inline
        self.commit_interval = commit_interval
        self._last_commit = 0.0
        self._ops: list[tuple[int, tuple[Any, ...]]] = []
        self._cbs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._busy: list[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None  # callbacks of the committing batch
        self._scheduled = False
        self.open_no = 1        # number of the batch now filling up
        self.done_no = 0        # last batch known durable
        self.failed: BaseException | None = None
        self.commits = 0
        self.ops_written = 0    # operations in committed or committing batches (broker/metrics.py)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[tuple[int, list[tuple[int, tuple[Any, ...]]]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stop = threading.Event()
        self.checkpoint_interval = 1.0
        self._drained: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ start / stop

    def load(self) -> Snapshot:
        db = self._db
        snap = Snapshot()
        snap.sessions = list(db.execute("SELECT client_id, expires_at, role, name FROM session"))
        snap.subscriptions = list(db.execute("SELECT client_id, filter, qos FROM subscription"))
        snap.queue = list(db.execute("SELECT client_id, seq, topic, payload, qos, state FROM queue "
                                     "ORDER BY client_id, seq"))
        snap.qos2_in = list(db.execute("SELECT client_id, packet_id FROM qos2_in"))
        snap.retained = list(db.execute("SELECT topic, payload, qos FROM retained"))
        return snap

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if not self.inline:
            self._thread = threading.Thread(target=self._writer, name="latch-broker-store", daemon=True)
            self._thread.start()
        self._checkpointer = threading.Thread(target=self._checkpoints, name="latch-broker-checkpoint", daemon=True)
        self._checkpointer.start()

    async def close(self) -> None:
        """Commit what is pending, run its callbacks, stop the writer."""
        for _ in range(100):
            if self.idle or self.failed is not None:
                break
            if self._busy is None:
                self._submit()          # inline: commits now; threaded: hands the batch to the writer
            if self._busy is not None:  # the writer thread reports back through the loop
                self._drained = asyncio.get_running_loop().create_future()
                await asyncio.wait_for(self._drained, 30)
        if self._thread is not None:
            self._queue.put(None)
        self._stop.set()
        loop = asyncio.get_running_loop()
        for thread in (self._thread, self._checkpointer):
            if thread is not None:
                await loop.run_in_executor(None, thread.join, 10)
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self._db.close()

    # ------------------------------------------------------------------ loop side

    @property
    def idle(self) -> bool:
        return self._busy is None and not self._ops and not self._cbs

    def token(self) -> int:
        """0 when nothing is pending, else the batch whose completion makes 'now' durable."""
        if self._busy is None and not self._ops and not self._cbs:
            return 0
        return self.open_no

    def op(self, op: int, params: tuple[Any, ...]) -> None:
        if self.failed is not None:
            return
        self._ops.append((op, params))
        if not self._scheduled and self._busy is None:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        loop = self._loop
        assert loop is not None
        wait = self._last_commit + self.commit_interval - loop.time()
        if wait > 0 and self._ops:   # group commit: at most one commit per interval, everything since in it
            loop.call_later(wait, self._submit)
        else:
            loop.call_soon(self._submit)

    def after(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.failed is not None:
            return       # never acknowledge anything after a failed commit
        if self._busy is None and not self._ops and not self._cbs:
            fn(*args)
            return
        self._cbs.append((fn, args))

    def _submit(self) -> None:
        self._scheduled = False
        if self._busy is not None or self.failed is not None:
            return
        if not self._ops:
            cbs, self._cbs = self._cbs, []
            self.done_no = self.open_no
            self.open_no += 1
            _run(cbs)
            return
        ops, self._ops = self._ops, []
        self.ops_written += len(ops)
        self._busy, self._cbs = self._cbs, []
        no = self.open_no
        self.open_no += 1
        self._last_commit = self._loop.time()  # type: ignore[union-attr]
        if self.inline:
            # commit on the loop thread: no thread hand-off, no GIL ping-pong; with synchronous=NORMAL a
            # commit is a write() into the OS, tens of microseconds; checkpoints (fsync) run elsewhere
            self._completed(no, self._apply(ops))
        else:
            self._queue.put((no, ops))

    def _completed(self, no: int, error: BaseException | None) -> None:
        cbs = self._busy or []
        self._busy = None
        if error is not None:
            self.failed = error
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            log.critical("broker store commit failed; acknowledging nothing more: %r", error)
            if self._on_failure is not None:
                self._on_failure(error)
            return
        self.done_no = no
        self.commits += 1
        _run(cbs)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if (self._ops or self._cbs) and not self._scheduled:
            self._schedule()

    # ------------------------------------------------------------------ writer thread

    def _checkpoints(self) -> None:
        """Copy the WAL into the database file now and then (PASSIVE: never blocks the writer)."""
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            while not self._stop.wait(self.checkpoint_interval):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as e:
                    log.warning("broker store checkpoint failed: %r", e)
        finally:
            db.close()

    def _apply(self, ops: list[tuple[int, tuple[Any, ...]]]) -> BaseException | None:
        """One transaction with every operation of a batch; None or the error that rolled it back."""
        db = self._db
        try:
            db.execute("BEGIN")
            i, n = 0, len(ops)
            while i < n:
                kind = ops[i][0]
                j = i + 1
                while j < n and ops[j][0] == kind:
                    j += 1
                for sql in SQL[kind]:
                    if j - i == 1:
                        db.execute(sql, ops[i][1])
                    else:
                        db.executemany(sql, [p for _, p in ops[i:j]])
                i = j
            db.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001 - reported to the loop, which stops acknowledging
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return e
        return None

    def _writer(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            no, ops = item
            error = self._apply(ops)
            try:
                loop.call_soon_threadsafe(self._completed, no, error)
            except RuntimeError:   # loop closed: we are shutting down
                return


def _run(cbs: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    for fn, args in cbs:
        try:
            fn(*args)
        except Exception:  # one failing callback must not starve the others
            log.exception("broker callback failed")

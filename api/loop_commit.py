"""SQLite's one writer on the event loop: group commit without a thread hop per transaction.

The default for `sqlite://` (LATCH_SQLITE_WRITER=loop). Units of work submitted while the loop runs
are gathered and, once per loop iteration, run as one batch in one transaction on the loop thread
itself (api/group_commit.py BatchRunner: one savepoint per unit, a broken batch re-run unit by
unit, answers and publications only after the COMMIT). This is the broker's own store's design
(broker/store.py), for the same reason:

- With `synchronous=NORMAL` a COMMIT is a write() of WAL frames into the page cache — tens of
  microseconds — and survives kill -9 of the process the moment it returns. What does fsync is the
  checkpoint, so the writer's connections never checkpoint (`wal_autocheckpoint=0`, set for every
  connection in api/db.py) and a thread of its own checkpoints (PASSIVE: never blocks a commit)
  once a second after writes.
- Measured on the command path (docs/performance.md): with the writer on a thread, every unit cost
  a wake-up of that thread and one of the loop for its answer (`Condition.notify`,
  `_write_to_self`: about a quarter of the API's samples at 40 commands/s); on the loop both go.

What may not run on the loop: bulk units (`Priority.BULK`: a fleet rollout's 100,000 target rows)
run alone on a thread, and nothing else starts a transaction until they are done — SQLite has one
writer either way, and the loop keeps serving reads, HTTP and MQTT meanwhile. A unit that waits
(I/O, sleeps) would stall the loop: units are plain statements on the Session, as everywhere in
api/ (api/db.py says so).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlmodel import Session

from api.group_commit import MAX_BATCH, BatchRunner, _Job, hand_over

T = TypeVar("T")
log = logging.getLogger("latch.db")

CHECKPOINT_INTERVAL_S = 1.0


class LoopGroupCommitWriter(BatchRunner):
    """Runs queued units in batches on the event loop; bulk units alone on a thread."""

    def __init__(self, engine: Engine, on_wait: Callable[[int, float], None] = lambda p, s: None,
                 on_batch: Callable[[int, float], None] = lambda n, s: None, max_batch: int = MAX_BATCH,
                 database_file: str | None = None, off_loop_priority: int = 1 << 30) -> None:
        """`off_loop_priority`: units of this priority or later run alone on a thread (api/db.py gives
        Priority.BULK); `database_file`: checkpointed on a thread of its own (None: in-memory)."""
        super().__init__(engine, on_wait, on_batch, max_batch)
        self.off_loop_priority = off_loop_priority
        self._heap: list[tuple[int, int, _Job]] = []
        self._seq = itertools.count()
        self._scheduled: asyncio.AbstractEventLoop | None = None   # the loop a flush is scheduled on
        self._off_loop = False   # a bulk unit is running on the thread: no batch starts meanwhile
        self._bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latch-db-bulk")
        self._checkpoints = Checkpointer(database_file) if database_file else None
        self._drained: asyncio.Future[None] | None = None   # drain() waits on it

    def submit(self, priority: int, fn: Callable[[Session], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        heapq.heappush(self._heap, (priority, next(self._seq), _Job(loop, fut, fn, priority)))
        self._schedule(loop)
        return fut

    def __len__(self) -> int:
        return len(self._heap)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._scheduled is None and not self._off_loop:
            self._scheduled = loop
            loop.call_soon(self._flush)   # after everything ready in this iteration: they join the batch

    def _flush(self) -> None:
        loop, self._scheduled = self._scheduled, None
        if self._off_loop or not self._heap:
            return
        batch: list[_Job] = []
        while self._heap and len(batch) < self.max_batch:
            job = self._heap[0][2]
            if job.priority >= self.off_loop_priority:
                if not batch:   # nothing more urgent is waiting: the bulk unit's turn, on the thread
                    heapq.heappop(self._heap)
                    self._run_off_loop(job)
                break
            heapq.heappop(self._heap)
            batch.append(job)
        if batch:
            answers, on_loops = self._execute(batch)
            if self._checkpoints is not None:
                self._checkpoints.wrote()
            hand_over(answers, on_loops)
        if self._heap and loop is not None:
            self._schedule(loop)
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        if self._drained is not None and not self._heap and not self._off_loop and not self._drained.done():
            self._drained.set_result(None)

    def _run_off_loop(self, job: _Job) -> None:
        self._off_loop = True
        loop = job.loop

        def run() -> tuple[Any, Any]:
            return self._execute([job])

        def done(f: "asyncio.Future[tuple[Any, Any]]") -> None:
            self._off_loop = False
            if self._checkpoints is not None:
                self._checkpoints.wrote()
            if not f.cancelled() and f.exception() is None:
                hand_over(*f.result())
            elif not job.future.done():   # _execute itself failed: the unit's caller must hear of it
                job.future.set_exception(f.exception() or RuntimeError("the bulk write was cancelled"))
            self._schedule(loop)
            self._maybe_drained()

        loop.run_in_executor(self._bulk, run).add_done_callback(done)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until every queued unit has run."""
        if not self._heap and not self._off_loop:
            return
        loop = asyncio.get_running_loop()
        self._drained = loop.create_future()
        self._schedule(loop)
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
        except asyncio.TimeoutError:
            log.warning("database writes still queued after %.0f s at shutdown", timeout)

    def shutdown(self) -> None:
        """After drain(): stop the bulk thread and the checkpoints (one last one)."""
        self._bulk.shutdown(wait=True)
        if self._checkpoints is not None:
            self._checkpoints.close()


class Checkpointer:
    """Copies the WAL into the database file now and then, on its own thread and connection.

    PASSIVE checkpoints never wait for (nor block) the writer or the readers; they run at most once per
    CHECKPOINT_INTERVAL_S, and only after writes."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL_S) -> None:
        self.path = path
        self.interval = interval
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self.checkpoints = 0
        self.done = threading.Event()   # set after each checkpoint (tests wait on it)
        self._thread = threading.Thread(target=self._run, name="latch-db-checkpoint", daemon=True)
        self._thread.start()

    def wrote(self) -> None:
        self._dirty.set()

    def _run(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            while not self._stop.is_set():
                self._dirty.wait()
                if self._stop.wait(self.interval):
                    break
                self._dirty.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    self.checkpoints += 1
                    self.done.set()
                except sqlite3.Error as e:
                    log.warning("database checkpoint failed: %r", e)
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
        finally:
            db.close()

    def close(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._thread.join(10)

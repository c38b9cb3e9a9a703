"""Group commit: SQLite's one writer runs every unit of work that is waiting in one transaction.

SQLite has one writer. Before this module each unit of work — a command's creation, each of its
state changes, each presence or state report — was its own transaction on the writer thread: a
Session, BEGIN, the statements, COMMIT (the WAL frames of every page it touched written again),
and a wake-up of the event loop for its answer. At a few hundred commands a second the writer
ran several of those per command, one after another, while the event loop waited for each
(docs/performance.md has the profile: transaction set-up, COMMIT and the loop wake-ups were about
a fifth of the API's CPU on the command path).

The broker's own store (broker/store.py) shows the way, and this is the same idea for the API:

- The writer thread takes the first queued unit and, without waiting, every other unit already
  queued behind it, in (priority, arrival) order, up to `max_batch`. At low load a batch is one
  unit and nothing waits longer than before; under load each COMMIT carries many units.
- One transaction (BEGIN IMMEDIATE ... COMMIT) holds the batch. Each unit runs in its own Session
  joined to it through a SAVEPOINT (SQLAlchemy's `join_transaction_mode="create_savepoint"`):
  the unit's own `commit()` releases its savepoint and its `rollback()` — or an exception —
  undoes only its own work. Units keep the contract of api/db.py unchanged: a function of a
  Session that runs (and commits) a whole transaction.
- Nothing a unit did is visible outside before the batch's COMMIT: its answer, and whatever it
  asked to run once durable (`after_durable`: the event log's publication to live subscribers,
  log lines), are handed to the event loop only after the COMMIT returned — one wake-up of the
  loop per batch, not per unit. So an acknowledged write is a committed write: a kill -9 right
  after the answer loses nothing (tests/api/test_group_commit.py).
- When the batch's transaction breaks (COMMIT fails, or an error SQLite answers by rolling the
  whole transaction back), nothing of it was published: every unit of the batch is run again
  alone, in its own transaction, and answers for itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlmodel import Session

T = TypeVar("T")
log = logging.getLogger("latch.db")

DURABLE = "latch_after_durable"   # Session.info key: callbacks to run once the unit's writes are committed
LOOP_DURABLE = "latch_after_durable_on_loop"   # Session.info key: (loop, callback) to run on a loop then
MAX_BATCH = 64                    # units in one transaction: bounds how long the first of them waits


def after_durable(s: Session, fn: Callable[[], None]) -> None:
    """Run `fn` on the writer thread once what `s` has committed so far is durable — after the real
    COMMIT, which for a unit of a batch is the batch's. Call it from an `after_commit` listener."""
    s.info.setdefault(DURABLE, []).append(fn)


def after_durable_on_loop(s: Session, loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """Run `fn` on `loop` once what `s` has committed so far is durable. Under group commit these travel
    with the batch's answers, in the same wake-up of the loop (profiled: a `call_soon_threadsafe` per
    unit was a fifth of the API's samples at 40 commands/s), and run before the answers are handed out."""
    s.info.setdefault(LOOP_DURABLE, []).append((loop, fn))


LoopCallbacks = list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]]


def run_durable(callbacks: list[Callable[[], None]], on_loops: LoopCallbacks | None = None) -> None:
    for fn in callbacks:
        try:
            fn()
        except Exception:   # noqa: BLE001 — one listener's bug must not hold the other units' answers
            log.exception("a callback after commit failed")
    for loop, fn in on_loops or ():
        try:
            loop.call_soon_threadsafe(_guarded, fn)
        except RuntimeError:   # the loop is closed: shutting down, the rows are in the table
            pass


def _guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:   # noqa: BLE001 — one listener's bug must not hold the others
        log.exception("a callback after commit failed")


class _Job:
    __slots__ = ("loop", "future", "fn", "queued_at", "priority")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], fn: Callable[[Session], Any],
                 priority: int) -> None:
        self.loop, self.future, self.fn, self.priority = loop, future, fn, priority
        self.queued_at = time.monotonic()


class _BatchBroken(Exception):
    """The batch's transaction cannot go on: its units are run again, each alone."""


Answers = list[tuple[_Job, bool, Any]]


class BatchRunner:
    """What every group-commit writer shares: a batch of units run in one transaction, each in its own
    savepoint, their answers and after-commit callbacks collected (see the module's docstring)."""

    def __init__(self, engine: Engine, on_wait: Callable[[int, float], None] = lambda p, s: None,
                 on_batch: Callable[[int, float], None] = lambda n, s: None, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        self._on_wait = on_wait     # each unit's time in the queue, seconds (api/admission.py)
        self._on_batch = on_batch   # each batch's size and transaction time, seconds (metrics)
        self.max_batch = max(1, max_batch)
        self.batches = self.units = 0   # read by metrics: units / batches is the mean batch size

    def _execute(self, batch: list[_Job]) -> tuple[Answers, LoopCallbacks]:
        """Run `batch` (one transaction, or each unit alone if that breaks); its callbacks after commit
        have run; the answers and the loop callbacks are returned for the caller to hand over."""
        now = time.monotonic()
        for job in batch:
            self._on_wait(job.priority, now - job.queued_at)
        started = now
        on_loops: LoopCallbacks = []
        try:
            answers, callbacks = (self._run_together(batch, on_loops) if len(batch) > 1
                                  else self._run_alone(batch[0], on_loops))
        except _BatchBroken as e:
            log.warning("a batch of %d writes failed as one transaction (%s): running each alone", len(batch), e)
            answers, callbacks, on_loops = [], [], []
            for job in batch:
                a, c = self._run_alone(job, on_loops)
                answers += a
                callbacks += c
        self.batches += 1
        self.units += len(batch)
        self._on_batch(len(batch), time.monotonic() - started)
        run_durable(callbacks)
        return answers, on_loops

    def _run_alone(self, job: _Job, on_loops: LoopCallbacks) -> tuple[Answers, list[Callable[[], None]]]:
        """One unit in its own transaction, as api/db.py runs a unit on any other driver."""
        with Session(self._engine, expire_on_commit=False) as s:
            try:
                answer = (job, True, job.fn(s))
            except BaseException as e:  # noqa: BLE001 — handed to the awaiting coroutine
                answer = (job, False, e)
            on_loops += s.info.pop(LOOP_DURABLE, [])
            return [answer], s.info.pop(DURABLE, [])

    def _run_together(self, batch: list[_Job], on_loops: LoopCallbacks) -> tuple[Answers, list[Callable[[], None]]]:
        answers: Answers = []
        callbacks: list[Callable[[], None]] = []
        with self._engine.connect() as conn:
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")   # the write lock for the whole batch, taken once
                raw = conn.connection.dbapi_connection
                for job in batch:
                    with Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False) as s:
                        try:
                            answers.append((job, True, job.fn(s)))
                        except BaseException as e:  # noqa: BLE001 — handed to the awaiting coroutine
                            s.rollback()   # to the unit's savepoint: the batch's other units stand
                            answers.append((job, False, e))
                        callbacks += s.info.pop(DURABLE, [])
                        on_loops += s.info.pop(LOOP_DURABLE, [])
                    if raw is None or not raw.in_transaction:   # SQLite rolled the whole batch back
                        raise _BatchBroken("the transaction was rolled back by SQLite")
                conn.commit()
            except _BatchBroken:
                raise
            except Exception as e:   # the COMMIT, BEGIN, or a savepoint could not be made: nothing was published
                raise _BatchBroken(str(e)) from e
        return answers, callbacks


class GroupCommitWriter(BatchRunner):
    """One writer thread running queued units of work in batches, one transaction per batch."""

    def __init__(self, engine: Engine, on_wait: Callable[[int, float], None] = lambda p, s: None,
                 on_batch: Callable[[int, float], None] = lambda n, s: None, max_batch: int = MAX_BATCH) -> None:
        super().__init__(engine, on_wait, on_batch, max_batch)
        self._q: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._work, name="latch-db-write", daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[[Session], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._q.put((priority, next(self._seq), _Job(loop, fut, fn, priority)))
        return fut

    def shutdown(self) -> None:
        self._q.put((1 << 30, next(self._seq), None))   # after every queued unit
        self._thread.join()

    # ---- the writer thread -------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            _, _, first = self._q.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item[2] is None:          # shutting down: finish this batch first
                    self._q.put(item)
                    break
                batch.append(item[2])
            hand_over(*self._execute(batch))



def hand_over(answers: Answers, on_loops: LoopCallbacks) -> None:
    """Hand every answer, and the callbacks to run on its loop first, to that loop: at once when it is
    this thread's running loop, else in one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, tuple[list[Callable[[], None]], Answers]] = {}
    for loop, fn in on_loops:
        by_loop.setdefault(loop, ([], []))[0].append(fn)
    for a in answers:
        by_loop.setdefault(a[0].loop, ([], []))[1].append(a)
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, (fns, items) in by_loop.items():
        if loop is running:
            _deliver(fns, items)
            continue
        try:
            loop.call_soon_threadsafe(_deliver, fns, items)
        except RuntimeError:   # the loop is closed: nobody waits for these answers any more
            pass


def _deliver(fns: list[Callable[[], None]], items: list[tuple[_Job, bool, Any]]) -> None:
    for fn in fns:   # the event log's publication first, as when each unit was a transaction of its own
        _guarded(fn)
    for job, ok, value in items:
        if job.future.done():   # the caller gave up (cancelled): the write stands all the same
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)

"""Group commit (api/group_commit.py, api/loop_commit.py): SQLite's writer runs every waiting unit of work in
one transaction, on a thread of its own or (the default) on the event loop.

What it must keep: each unit answers for itself (its error undoes only its own work), nothing is
published before the batch's COMMIT, a broken batch is re-run unit by unit without doing anything
twice, and an acknowledged write survives a kill -9 of the API right after its answer.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import Session

from api.db import Database, Priority
from api.group_commit import BatchRunner, after_durable
from api.loop_commit import LoopGroupCommitWriter
from foundation.settings import Settings
from tests.dbs import run_database_url
from tests.procs import drain, read_until, running

# The writer tests use a SQLite file of their own in either pass (group commit is SQLite's writer);
# the kill -9 test runs on the pass's database (SQLite, or a fresh PostgreSQL one).


async def with_table(tmp_path: Path, writer: str) -> Database:
    d = Database(f"sqlite:///{tmp_path / 'g.db'}", sqlite_writer=writer)

    def create(engine) -> None:  # type: ignore[no-untyped-def]
        with engine.begin() as conn:
            conn.execute(text("create table t (k text primary key, v int)"))

    await d.run_sync(create)
    return d


@pytest.fixture(params=["loop", "thread"])
async def db(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    d = await with_table(tmp_path, request.param)
    yield d
    await d.close()


def insert(k: str, v: int = 0):  # type: ignore[no-untyped-def]
    def unit(s: Session) -> str:
        s.execute(text("insert into t (k, v) values (:k, :v)"), {"k": k, "v": v})
        s.commit()
        return k
    return unit


def rows(tmp_path: Path) -> dict[str, int]:
    with sqlite3.connect(tmp_path / "g.db") as c:
        return dict(c.execute("select k, v from t").fetchall())


async def hold_writer(db: Database) -> tuple[asyncio.Future, threading.Event]:
    """A first unit that keeps the writer busy until released, so the next ones queue behind it. A bulk one:
    the loop writer runs those on a thread and starts no batch meanwhile (it must not block the loop)."""
    entered, release = threading.Event(), threading.Event()

    def blocker(s: Session) -> None:
        entered.set()
        release.wait(10)
        s.execute(text("insert into t (k, v) values ('first', 0)"))
        s.commit()

    fut = asyncio.ensure_future(db.write(blocker, Priority.BULK))
    assert await asyncio.to_thread(entered.wait, 10)
    return fut, release


def writer(db: Database) -> BatchRunner:
    w = db._writer   # the Database's own writer: these tests look at how it batched
    assert isinstance(w, BatchRunner)
    return w


async def test_waiting_units_share_one_transaction_and_each_gets_its_answer(db: Database, tmp_path: Path) -> None:
    sizes: list[int] = []
    writer(db)._on_batch = lambda n, secs: sizes.append(n)
    first, release = await hold_writer(db)
    waiting = [asyncio.ensure_future(db.write(insert(f"k{i}", i))) for i in range(40)]
    await asyncio.sleep(0)   # let every write reach the queue (they are queued synchronously on first step)
    release.set()
    assert await asyncio.gather(*waiting) == [f"k{i}" for i in range(40)]
    await first
    assert sizes[-1] == 40, sizes   # the 40 that queued behind the first ran as one batch
    assert len(rows(tmp_path)) == 41


async def test_a_failing_unit_undoes_only_its_own_work(db: Database, tmp_path: Path) -> None:
    def fails(s: Session) -> None:
        s.execute(text("insert into t (k, v) values ('doomed', 1)"))
        raise ValueError("this unit changed its mind")

    first, release = await hold_writer(db)
    a, bad, dup, b = (asyncio.ensure_future(db.write(u)) for u in (insert("a"), fails, insert("a"), insert("b")))
    await asyncio.sleep(0)
    release.set()
    assert await a == "a" and await b == "b"
    with pytest.raises(ValueError, match="changed its mind"):
        await bad
    with pytest.raises(Exception, match="UNIQUE"):   # the second "a": its own IntegrityError, nobody else's
        await dup
    await first
    assert rows(tmp_path) == {"first": 0, "a": 0, "b": 0}


async def test_a_unit_that_rolls_back_and_retries_inside_a_batch(db: Database, tmp_path: Path) -> None:
    def retries(s: Session) -> int:
        s.execute(text("insert into t (k, v) values ('try', 1)"))
        s.rollback()   # as a state change that lost a race re-reads and tries again (api/commands/service.py)
        s.execute(text("insert into t (k, v) values ('try', 2)"))
        s.commit()
        return 2

    first, release = await hold_writer(db)
    futs = [asyncio.ensure_future(db.write(u)) for u in (insert("x"), retries, insert("y"))]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*futs) == ["x", 2, "y"]
    await first
    assert rows(tmp_path) == {"first": 0, "x": 0, "try": 2, "y": 0}


async def test_callbacks_run_after_the_batch_commit_and_see_committed_rows(db: Database, tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []

    def announced(k: str):  # type: ignore[no-untyped-def]
        def unit(s: Session) -> None:
            s.execute(text("insert into t (k, v) values (:k, 0)"), {"k": k})
            s.commit()
            # another connection's view when the callback runs: the row must be committed by then
            after_durable(s, lambda: seen.append((k, k in rows(tmp_path))))
        return unit

    first, release = await hold_writer(db)
    futs = [asyncio.ensure_future(db.write(announced(f"e{i}"))) for i in range(5)]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*futs, first)
    assert seen == [(f"e{i}", True) for i in range(5)]


async def test_a_broken_batch_is_rerun_unit_by_unit_without_doing_anything_twice(db: Database, tmp_path: Path) -> None:
    published: list[str] = []

    def counted(k: str):  # type: ignore[no-untyped-def]
        def unit(s: Session) -> str:
            s.execute(text("update t set v = v + 1 where k = 'first'"))
            s.execute(text("insert into t (k, v) values (:k, 0)"), {"k": k})
            s.commit()
            after_durable(s, lambda: published.append(k))
            return k
        return unit

    def breaks(s: Session) -> str:
        # ends the whole SQLite transaction behind SQLAlchemy's back: the batch cannot be committed as one
        s.execute(text("insert into t (k, v) values ('never', 0)"))
        s.connection().exec_driver_sql("ROLLBACK")
        return "broke"

    sizes: list[int] = []
    writer(db)._on_batch = lambda n, secs: sizes.append(n)
    first, release = await hold_writer(db)
    futs = [asyncio.ensure_future(db.write(u)) for u in (counted("p"), breaks, counted("q"))]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*futs) == ["p", "broke", "q"]
    await first
    assert sizes[-1] == 3
    assert rows(tmp_path) == {"first": 2, "p": 0, "q": 0}   # each unit's update applied once
    assert published == ["p", "q"]                          # each published once, after its real commit


@pytest.fixture
async def loop_db(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = await with_table(tmp_path, Settings.model_fields["sqlite_writer"].default)   # the default writer
    assert isinstance(d._writer, LoopGroupCommitWriter)
    yield d
    await d.close()


async def test_on_the_loop_writes_of_one_loop_iteration_share_one_transaction(loop_db: Database,
                                                                               tmp_path: Path) -> None:
    sizes: list[int] = []
    writer(loop_db)._on_batch = lambda n, secs: sizes.append(n)
    assert await asyncio.gather(*(loop_db.write(insert(f"k{i}", i)) for i in range(30))) == [f"k{i}" for i in range(30)]
    assert sizes == [30]
    assert len(rows(tmp_path)) == 30
    # no writer thread: the batch ran on this (the loop's) thread
    ran_on: list[str] = []

    def where(s: Session) -> None:
        ran_on.append(threading.current_thread().name)
        s.commit()

    await loop_db.write(where)
    assert ran_on == [threading.current_thread().name]


async def test_on_the_loop_a_bulk_unit_runs_on_a_thread_and_the_loop_keeps_serving(loop_db: Database,
                                                                                   tmp_path: Path) -> None:
    first, release = await hold_writer(loop_db)   # a bulk unit, blocked on its thread
    queued = [asyncio.ensure_future(loop_db.write(insert(f"w{i}"))) for i in range(5)]
    ticks = 0
    for _ in range(20):   # the loop runs meanwhile: timers fire, reads answer
        await asyncio.sleep(0.001)
        ticks += 1
    assert await loop_db.read(lambda s: s.execute(text("select count(*) from t")).scalar()) == 0
    assert not any(f.done() for f in queued)   # many loop turns later: no batch starts while the bulk unit runs
    sizes: list[int] = []
    writer(loop_db)._on_batch = lambda n, secs: sizes.append(n)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*queued), 10) == [f"w{i}" for i in range(5)]
    await first
    assert ticks == 20 and sizes[-1] == 5
    assert set(rows(tmp_path)) == {"first", *(f"w{i}" for i in range(5))}


async def test_on_the_loop_the_wal_is_checkpointed_by_its_own_thread(loop_db: Database, tmp_path: Path) -> None:
    checkpoints = writer(loop_db)._checkpoints   # type: ignore[attr-defined]
    assert checkpoints is not None
    def autocheckpoint(s: Session) -> int:
        value = s.connection().exec_driver_sql("pragma wal_autocheckpoint").scalar()
        s.commit()
        return int(value)

    assert await loop_db.write(autocheckpoint) == 0   # the writer's connections never checkpoint themselves
    for round_ in range(3):
        await asyncio.gather(*(loop_db.write(insert(f"c{round_}-{i}", i)) for i in range(50)))
    assert await asyncio.to_thread(checkpoints.done.wait, 10), "no checkpoint within 10 s of the writes"
    assert checkpoints.checkpoints > 0
    wal_pages = await loop_db.read(lambda s: s.connection().exec_driver_sql("pragma wal_checkpoint(PASSIVE)").one())
    assert wal_pages[0] == 0   # not busy: the checkpointer's connection is not in the way


async def test_an_acknowledged_command_survives_kill_9_right_after_the_answer(tmp_path: Path) -> None:
    """Many commands acknowledged together (so, on SQLite, committed in shared batches), then SIGKILL at once."""
    args = ("serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", "0", "--demo-fleet", "0")
    url = run_database_url()
    env = {"LATCH_DATABASE_URL": url} if url else {}
    acknowledged: list[str] = []
    async with running(*args, env=env) as proc:
        _, out = await read_until(proc, r"Try:")
        api = re.search(r"API:\s+(http\S+)", out).group(1)  # type: ignore[union-attr]
        drain(proc)
        headers = {"Authorization": f"Bearer {(tmp_path / 'admin.token').read_text().strip()}"}
        async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as http:
            for i in range(4):
                assert (await http.post("/v1/devices", json={"id": f"lock-{i}"})).status_code == 201
            # locate on an offline lock is queued (not fail-fast): each 201 says its row is written
            # two rounds of 60 at once: under the 64 being created that admission allows (api/admission.py)
            for round_ in range(2):
                posts = [http.post(f"/v1/devices/lock-{i % 4}/commands", json={"action": "locate"})
                         for i in range(60)]
                for r in await asyncio.gather(*posts):
                    assert r.status_code == 201, r.text
                    acknowledged.append(r.json()["id"])
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 15) == -signal.SIGKILL
    async with running(*args, env=env) as proc:   # started again on the same database
        _, out = await read_until(proc, r"Try:")
        api = re.search(r"API:\s+(http\S+)", out).group(1)  # type: ignore[union-attr]
        drain(proc)
        async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as http:
            stored = {c["id"] for i in range(4) for c in
                      (await http.get(f"/v1/devices/lock-{i}/commands", params={"limit": 100})).json()}
    lost = set(acknowledged) - stored
    assert len(acknowledged) == 120 and not lost, f"{len(lost)} acknowledged commands lost"

"""The store's contract: callbacks run only after what was written before them is committed, in order;
both commit modes (inline and, with fsync, on a writer thread) keep everything; a failed commit stops
every later acknowledgement."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from broker import store as st


@pytest.mark.parametrize("fsync", [False, True])
async def test_callbacks_follow_their_commit_in_order_and_everything_survives(tmp_path: Path, fsync: bool) -> None:
    s = st.SqliteStore(tmp_path / "broker.db", fsync=fsync)
    assert s.inline is (not fsync)
    s.start(asyncio.get_running_loop())
    seen: list[tuple[int, int]] = []

    def check(i: int) -> None:
        # the row written before this callback was registered is committed: another connection sees it
        with sqlite3.connect(tmp_path / "broker.db") as db:
            n = db.execute("SELECT count(*) FROM queue WHERE client_id = 'c'").fetchone()[0]
        seen.append((i, n))

    s.after(check, -1)                      # nothing pending: runs at once
    for i in range(50):
        s.op(st.QUEUE_INSERT, ("c", i, "t", b"p", 1))
        s.after(check, i)
    await s.close()
    assert [i for i, _ in seen] == list(range(-1, 50))
    assert all(n >= i + 1 for i, n in seen)
    snap = st.SqliteStore(tmp_path / "broker.db").load()
    assert [row[1] for row in snap.queue] == list(range(50))


async def test_after_a_failed_commit_nothing_is_acknowledged(tmp_path: Path) -> None:
    failures: list[BaseException] = []
    s = st.SqliteStore(tmp_path / "broker.db", on_failure=failures.append)
    s.start(asyncio.get_running_loop())
    acked: list[int] = []
    s.op(st.QUEUE_INSERT, ("c", 1, "t", b"p", 1, "one parameter too many"))   # makes the commit fail
    s.after(acked.append, 1)
    await s.close()
    s.after(acked.append, 2)
    assert failures and acked == []

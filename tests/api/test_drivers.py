"""One codebase, two ways of driving it (api/db.py): the URL's driver decides whether units of work
run on database threads (sqlite3, psycopg) or on the event loop through an async driver
(aiosqlite, asyncpg).

The whole suite runs on the default driver of each database (sqlite3 threads; asyncpg for
PostgreSQL). This module runs a real stack on the *other* driver of the database under test
(aiosqlite on the SQLite pass, psycopg on the PostgreSQL pass), so both stay working.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from api.db import Database, Priority, PriorityGate, driver_of, driver_url, sync_url
from latch.stack import Stack
from tests.dbs import ON_POSTGRES, postgres_url
from tests.support import LiveStack, make_settings


@pytest.mark.parametrize(("url", "driver", "is_async"), [
    ("sqlite:///x.db", "sqlite", False),
    ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite", True),
    ("postgresql://u@h/db", "postgresql+asyncpg", True),
    ("postgres://u@h/db", "postgresql+asyncpg", True),
    ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg", True),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg", False),
])
def test_the_url_names_the_driver(url: str, driver: str, is_async: bool) -> None:
    assert driver_of(url) == (driver, is_async)
    assert driver_url(url).startswith(driver + "://")
    # schema work always has a synchronous twin (Alembic is synchronous)
    assert sync_url(url).partition("://")[0] in ("sqlite", "postgresql+psycopg")


def test_an_unknown_scheme_is_refused_naming_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"unsupported database URL scheme 'mysql'.*postgresql\+asyncpg"):
        Database("mysql://u@h/db")


async def test_the_write_gate_admits_by_priority_then_arrival() -> None:
    gate = PriorityGate(1)
    await gate.acquire(Priority.BULK)          # held: everything below queues
    order: list[str] = []

    async def wants(name: str, priority: int) -> None:
        await gate.acquire(priority)
        order.append(name)
        gate.release()

    tasks = [asyncio.ensure_future(wants(n, p)) for n, p in
             [("bulk-1", Priority.BULK), ("bulk-2", Priority.BULK), ("routine", Priority.ROUTINE),
              ("unlock", Priority.INTERACTIVE)]]
    await asyncio.sleep(0)   # let every waiter queue (one loop pass: each reaches its await)
    gate.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["unlock", "routine", "bulk-1", "bulk-2"]


async def test_a_cancelled_waiter_loses_no_slot() -> None:
    gate = PriorityGate(1)
    await gate.acquire(Priority.INTERACTIVE)
    cancelled = asyncio.ensure_future(gate.acquire(Priority.INTERACTIVE))
    later = asyncio.ensure_future(gate.acquire(Priority.BULK))
    await asyncio.sleep(0)
    gate.release()           # the slot is handed to `cancelled` ...
    cancelled.cancel()       # ... which is cancelled before it runs: the slot goes on to `later`
    await asyncio.gather(cancelled, return_exceptions=True)
    await asyncio.wait_for(later, 5)
    gate.release()
    await asyncio.wait_for(gate.acquire(Priority.BULK), 5)   # and the gate is free again


def _other_driver_url(tmp_path: Path) -> str:
    if ON_POSTGRES:
        return postgres_url("postgresql+psycopg")
    return f"sqlite+aiosqlite:///{tmp_path / 'aio.db'}"


async def test_unlock_round_trip_and_event_log_on_the_other_driver(tmp_path: Path) -> None:
    url = _other_driver_url(tmp_path)
    async with Stack(make_settings(tmp_path, database_url=url)) as st:
        assert st.db.driver == driver_of(url)[0]
        async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {st.settings.admin_token}"}) as http:
            live = LiveStack(st, http)
            try:
                lock = await live.lock("bike-d1")
                first = await http.post("/v1/devices/bike-d1/commands", params={"wait": 5},
                                        json={"action": "unlock"}, headers={"Idempotency-Key": "tap-d1"})
                again = await http.post("/v1/devices/bike-d1/commands", json={"action": "unlock"},
                                        headers={"Idempotency-Key": "tap-d1"})
                assert first.status_code == 201 and first.json()["status"] == "succeeded", first.text
                assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
                assert [h["to_status"] for h in first.json()["history"] if h["applied"]] == \
                    ["queued", "sent", "received", "succeeded"]
                assert lock.actuations == [(first.json()["id"], "unlock")]
                page = (await http.get("/v1/events", params={"after": 0, "limit": 1000})).json()
                ids = [e["id"] for e in page["events"]]
                assert ids == sorted(ids) and len(ids) == len(set(ids))
                mine = [e["data"]["status"] for e in page["events"] if e["kind"] == "command"
                        and e["data"]["command_id"] == first.json()["id"]]
                assert mine == ["queued", "sent", "received", "succeeded"]
            finally:
                await asyncio.gather(*(lk.stop() for lk in live.locks), return_exceptions=True)

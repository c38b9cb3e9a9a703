"""A background loop stopped while a query is in flight stops (api/background.py), even when the driver turns
the CancelledError into another error on its way out, as asyncpg did in the fleet worker (stop() then waited
forever: tests/api/test_fleet.py hung 180 s on a busy machine's PostgreSQL pass)."""

from __future__ import annotations

import asyncio

from api.background import reraise_if_stopping


async def test_a_loop_cancelled_mid_query_stops_although_the_driver_raised_something_else() -> None:
    in_query = asyncio.Event()
    rounds = 0

    async def query() -> None:   # what the driver did: the cancellation surfaces as another error
        in_query.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RuntimeError("Can't reconnect until invalid transaction is rolled back") from None

    async def worker() -> None:   # the shape of FleetService._run, Sweeper._run, the notification tick
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await query()
            except Exception:
                reraise_if_stopping()
            await asyncio.sleep(0)

    task = asyncio.create_task(worker())
    await asyncio.wait_for(in_query.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled() and rounds == 1


async def test_a_failing_round_that_is_not_a_stop_is_retried() -> None:
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for _ in range(3):
            try:
                raise RuntimeError("the database went away")
            except Exception:
                reraise_if_stopping()
                failures += 1

    await asyncio.wait_for(worker(), 5)
    assert failures == 3

"""Long polling: held until there is an event, answered empty with the same cursor when the wait ends,
and thousands of held requests cost no thread and no query while they wait."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from sqlalchemy import event as sa_event

from tests.api.push_support import raw_request, raw_response
from tests.support import LiveStack, eventually


async def head(client: httpx.AsyncClient, device_id: str) -> int:
    """The newest event's id, once the lock that was just started has reported its state: a lock's
    `lock_state` event follows its `presence` event, and on a busy machine it can land after the cursor was
    read, answering every poll held after that cursor before the test's own event (CI saw it once)."""
    async def settled() -> int | None:
        after, reported = 0, False
        for _ in range(100):
            page = (await client.get("/v1/events", params={"after": after, "limit": 1000})).json()
            if not page["events"]:
                return after if reported else None
            reported = reported or any(e["kind"] == "lock_state" and e["data"]["device_id"] == device_id
                                       for e in page["events"])
            after = page["cursor"]
        raise AssertionError("too many events")
    return int(await eventually(settled, what=f"{device_id}'s lock_state event"))   # an id is never 0


async def test_held_until_an_event_then_answered_at_once(stack: LiveStack) -> None:
    await stack.lock("bike-1")
    cursor = await head(stack.http, "bike-1")
    poll = asyncio.ensure_future(stack.http.get("/v1/events", params={"after": cursor, "wait": 20}))
    await eventually(lambda: len(stack.runtime.events) == 1, what="the poll to be held")
    assert not poll.done()
    t0 = time.monotonic()
    assert (await stack.command("bike-1", "locate", wait=0)).status_code == 201
    page = (await asyncio.wait_for(poll, 10)).json()
    assert time.monotonic() - t0 < 5
    assert page["events"] and page["events"][0]["kind"] == "command" and page["events"][0]["id"] == cursor + 1
    assert page["cursor"] == page["events"][-1]["id"]


async def test_empty_list_and_the_same_cursor_when_the_wait_ends(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    await stack.lock("bike-2")
    rider = await users()
    cursor = await head(stack.http, "bike-2")
    t0 = time.monotonic()
    r = await rider.http.get("/v1/events", params={"after": cursor, "wait": 0.5})
    assert r.status_code == 200 and r.json() == {"events": [], "cursor": cursor}
    assert 0.45 < time.monotonic() - t0 < 5
    # events the rider may not see do not wake them
    poll = asyncio.ensure_future(rider.http.get("/v1/events", params={"after": cursor, "wait": 1}))
    await eventually(lambda: len(stack.runtime.events) == 1, what="the rider's poll to be held")
    await stack.command("bike-2", "locate", wait=5)
    assert (await poll).json() == {"events": [], "cursor": cursor}


async def test_a_thousand_held_polls_cost_no_thread_and_no_query_and_one_event_answers_all(stack: LiveStack) -> None:
    n = 1000
    await stack.lock("bike-3")
    cursor = await head(stack.http, "bike-3")
    statements: list[str] = []

    def count(conn, cursor_, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    threads_before = threading.active_count()
    # wait=60, the most the API holds a poll: on a machine whose cores other tests share, holding all 1000 took
    # over 30 s on PostgreSQL, and polls held since the start answered (empty) before the last one was held
    path = f"/v1/events?after={cursor}&wait=60"
    conns = [await raw_request(stack.api_url, path, stack.admin_token) for _ in range(n)]
    try:
        await eventually(lambda: len(stack.runtime.events) == n, timeout=50, what=f"{n} held polls")
        sa_event.listen(stack.runtime.db.engine, "before_cursor_execute", count)
        try:
            await asyncio.sleep(1.0)   # a quiet second: nothing may poll the database meanwhile
            quiet = list(statements)
        finally:
            sa_event.remove(stack.runtime.db.engine, "before_cursor_execute", count)
        assert quiet == []
        assert threading.active_count() - threads_before < 5   # no thread per request
        t0 = time.monotonic()
        await stack.command("bike-3", "report", wait=0)
        answers = await asyncio.wait_for(asyncio.gather(*(raw_response(r, w) for r, w in conns)), 60)
        elapsed = time.monotonic() - t0
    finally:
        for _, w in conns:
            w.close()
    assert all(code == 200 and p["events"] and p["events"][0]["id"] == cursor + 1 for code, p in answers)
    assert len(stack.runtime.events) == 0
    assert elapsed < 30, elapsed

"""Events on NATS JetStream in one API process (api/push/nats_bus.py), on this pass's database and a real
nats-server: the stream's sequence is the cursor; a cursor older than the process's ring of recent events is
served from the stream itself, an operator seeing everything and a rider only their own events and those
offered to every rider; the outbox is empty once JetStream acknowledged every event."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlmodel import func, select

from api.push.event_models import EventOutbox, LogEvent
from tests.api.push_support import User
from tests.natsserver import NatsServer
from tests.support import LiveStack, eventually, live_stack

RING = 8


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LiveStack]:   # overrides tests/conftest.py's: NATS, a tiny ring
    server = await NatsServer(tmp_path / "nats").start()
    try:
        async with live_stack(tmp_path, nats_url=server.url, event_ring=RING) as live:
            yield live
    finally:
        await server.stop()


async def everything(user_or_stack: LiveStack | User, after: int) -> list[dict]:
    http = user_or_stack.http
    out: list[dict] = []
    for _ in range(100):   # bounded: pages until one is empty
        page = (await http.get("/v1/events", params={"after": after, "limit": 5})).json()
        if not page["events"]:
            return out
        out += page["events"]
        after = page["cursor"]
    raise AssertionError("too many pages")


async def test_a_cursor_older_than_the_ring_is_served_from_the_stream(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider, other = await users(), await users()
    await stack.lock("bike-n")
    for _ in range(4):
        assert (await stack.command("bike-n", "locate", wait=5)).json()["status"] == "succeeded"
    positions = []
    for who in (rider, other, rider):
        r = await stack.http.post("/v1/notifications", json={"title": "hi", "body": "b", "category": "transactional",
                                                            "audience": {"users": [who.id]}, "ttl_s": 600})
        assert r.status_code == 201, r.text
        positions.append(r.json()["event_id"])   # with NATS: the stream's sequence (the cursor)
    log = stack.runtime.events

    async def all_relayed() -> bool:
        def count(s):   # type: ignore[no-untyped-def]
            return (s.exec(select(func.count()).select_from(EventOutbox)).one(),
                    s.exec(select(func.count()).select_from(LogEvent).where(LogEvent.seq.is_(None))).one())  # type: ignore[union-attr]
        return await stack.runtime.db.read(count) == (0, 0)
    await eventually(all_relayed, timeout=10, what="every event acknowledged by JetStream and its outbox row gone")
    assert log.head >= 4 * 4 + 3 and log.floor > 0   # more events than the ring holds: the oldest left it
    before = (await stack.metrics()).get("event_backlog_reads", 0)
    ops = await everything(stack, 0)
    assert [e["id"] for e in ops] == list(range(1, log.head + 1))   # every sequence, once, in order
    assert (await stack.metrics())["event_backlog_reads"] > before   # read from the stream, not the ring
    # the database holds each event's sequence: the same cursor whichever way it is read
    rows = await stack.runtime.db.read(
        lambda s: s.exec(select(LogEvent.seq, LogEvent.kind).order_by(LogEvent.seq)).all())
    assert [(seq, kind) for seq, kind in rows] == [(e["id"], e["kind"]) for e in ops]
    # a rider reads only what is theirs, from the stream too
    mine = await everything(rider, 0)
    assert [e["kind"] for e in mine] == ["notification", "notification"]
    assert [e["id"] for e in mine] == [positions[0], positions[2]]
    assert all(e["data"]["title"] == "hi" for e in mine)
    assert len(await everything(other, 0)) == 1

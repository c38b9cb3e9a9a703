"""Event streams written straight to their sockets (api/push/wire.py): many riders' SSE and WebSocket streams on
the real app over real sockets, a notification to all of them decided once (fanout.py plan) and written once
per transport, per-rider rules still applied, order and resume by cursor, sessions revoked elsewhere closing
streams (one query for all), and a small bounded run of bench/push.py's measurement."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from api import tokens
from api.riders.models import User as UserRow
from api.riders.models import UserSession
from tests.support import LiveStack, eventually

SSE_ID = re.compile(rb"id: (\d+)\nevent: ([a-z_]+)\ndata: ")


async def make_riders(stack: LiveStack, n: int) -> list[tuple[str, str, str]]:
    """n rider accounts straight into the database (signing up n riders is rate limited): (id, session, token)."""
    rt = stack.runtime
    now = int(time.time() * 1000)
    out = [(uuid.uuid4().hex, uuid.uuid4().hex) for _ in range(n)]

    def unit(s: Any) -> None:
        for uid, sid in out:
            s.add(UserRow(id=uid, email=f"{uid}@example.org", password_hash="x", role="rider", created_at=now))
        s.flush()
        for uid, sid in out:
            s.add(UserSession(id=sid, user_id=uid, created_at=now, expires_at=now + 3_600_000))
        s.commit()

    await rt.db.write(unit)
    secret = rt.settings.jwt_secret or ""
    return [(uid, sid, tokens.issue(secret, uid, "rider", tokens.ACCESS, 3600, session_id=sid)[0]) for uid, sid in out]


class SseReader:
    """A raw SSE stream: (id, kind) of every message, in the order they arrived."""

    def __init__(self, api_url: str, token: str, last_event_id: int | None = None) -> None:
        self.api_url, self.token, self.last = api_url, token, last_event_id
        self.seen: list[tuple[int, str]] = []
        self.raw = b""
        self.ended = False
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        host, port = self.api_url.split("://")[1].rsplit(":", 1)
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        extra = f"Last-Event-ID: {self.last}\r\n" if self.last is not None else ""
        self.writer.write(f"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.token}\r\n"
                          f"{extra}\r\n".encode())
        while b"event: ready" not in self.raw:
            chunk = await asyncio.wait_for(self.reader.read(65536), 10)
            assert chunk, self.raw
            self.raw += chunk
        self._scan()
        self.task = asyncio.ensure_future(self._read())

    def _scan(self) -> None:
        self.seen = [(int(i), k.decode()) for i, k in SSE_ID.findall(self.raw) if k != b"ready"]

    async def _read(self) -> None:
        while chunk := await self.reader.read(65536):
            self.raw += chunk
            self._scan()
            if self.raw.endswith(b"\r\n0\r\n\r\n"):   # the response's last chunk (the connection may stay)
                break
        self.ended = True

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()


async def ws_open(stack: LiveStack, token: str) -> tuple[ClientConnection, list[tuple[int, str]], asyncio.Task[None]]:
    ws = await connect(stack.api_url.replace("http://", "ws://") + "/v1/ws",
                       additional_headers={"Authorization": f"Bearer {token}"})
    await ws.send(json.dumps({"type": "subscribe"}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"
    seen: list[tuple[int, str]] = []

    async def read() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                msg = json.loads(frame)
                if msg["type"] == "event":
                    seen.append((msg["event"]["id"], msg["event"]["kind"]))

    return ws, seen, asyncio.ensure_future(read())


async def notify(stack: LiveStack, category: str = "transactional") -> int:
    r = await stack.http.post("/v1/notifications", json={"title": "Docks", "body": "Open again", "category": category,
                                                         "audience": {"all": True}, "ttl_s": 600})
    assert r.status_code == 201, r.text
    return int(r.json()["event_id"])


async def test_a_notification_to_all_is_written_straight_to_every_socket_with_the_riders_rules(
        stack: LiveStack) -> None:
    rt = stack.runtime
    riders = await make_riders(stack, 60)
    # one rider opted out of "service": decided per rider, not by the shared plan
    picky_id, _, picky_token = riders[0]
    r = await stack.http.put("/v1/me/notification-prefs", headers={"Authorization": f"Bearer {picky_token}"},
                             json={"opt_out": ["service"], "quiet_hours": None, "timezone": "UTC"})
    assert r.status_code == 200, r.text
    sse = [SseReader(stack.api_url, tok) for _, _, tok in riders[:30]]
    await asyncio.gather(*(s.open() for s in sse))
    wss = [await ws_open(stack, tok) for _, _, tok in riders[30:]]
    await eventually(lambda: rt.metrics.counts["subscribers_direct"] >= 60, what="every stream written directly")
    ids = [await notify(stack), await notify(stack, "service"), await notify(stack)]

    def everyone_has_them() -> bool:
        return all(len(s.seen) >= (2 if i == 0 else 3) for i, s in enumerate(sse)) and \
            all(len(seen) >= 3 for _, seen, _ in wss)

    await eventually(everyone_has_them, timeout=20, what="every rider's copy")
    for i, s in enumerate(sse):   # in order, once each; the opted-out rider skips the service one
        assert s.seen == [(x, "notification") for x in ids if not (i == 0 and x == ids[1])], s.seen
    for _, seen, _ in wss:
        assert seen == [(x, "notification") for x in ids]
    # the same bytes for everyone: one encoding per event and transport
    copies = {re.search(rb"id: %d\n.*?\n\n" % ids[0], s.raw, re.S).group(0) for s in sse}   # type: ignore[union-attr]
    assert len(copies) == 1
    assert (await stack.http.get("/v1/metrics")).json()["event_subscribers"] >= 60
    # resume by cursor from the first notification: exactly the rest, again written directly
    sse[5].close()
    again = SseReader(stack.api_url, riders[5][2], last_event_id=ids[0])
    await again.open()
    await eventually(lambda: len(again.seen) >= 2, what="the resumed stream")
    assert again.seen == [(ids[1], "notification"), (ids[2], "notification")]
    later = await notify(stack)
    await eventually(lambda: again.seen[-1:] == [(later, "notification")], what="a live event after the resume")
    for s in sse + [again]:
        s.close()
    for ws, _, task in wss:
        task.cancel()
        await ws.close()
    await eventually(lambda: len(rt.events) == 0, timeout=20, what="every stream gone")


async def test_a_session_revoked_elsewhere_ends_its_direct_streams_at_the_next_recheck(stack: LiveStack) -> None:
    rt = stack.runtime
    (uid, sid, token), (other_uid, _, other_token) = await make_riders(stack, 2)
    mine, theirs = SseReader(stack.api_url, token), SseReader(stack.api_url, other_token)
    await mine.open()
    await theirs.open()
    ws, _, ws_task = await ws_open(stack, token)
    await eventually(lambda: rt.metrics.counts["subscribers_direct"] >= 3, what="direct streams")

    def revoke(s: Any) -> None:   # as another replica would: straight in the database, no end_sessions here
        row = s.get(UserSession, sid)
        row.revoked_at = int(time.time() * 1000)
        s.add(row)
        s.commit()

    await rt.db.write(revoke)
    assert await rt.events.recheck_sessions() == 2   # one query for every open stream's session
    await eventually(lambda: mine.ended, what="the revoked session's SSE stream to end")
    assert b"event: error" in mine.raw and b"session ended" in mine.raw
    await asyncio.wait_for(ws_task, 10)
    assert ws.close_code == 4401
    assert not theirs.ended
    await notify(stack)
    await eventually(lambda: len(theirs.seen) == 1, what="the other rider's stream to go on")
    theirs.close()


async def test_a_small_fan_out_is_fast_and_loses_nothing(stack: LiveStack) -> None:
    """bench/push.py in small (bounded): 200 riders (SSE and WebSocket), 10 notifications to all at about
    10/s; every copy arrives, once, in order."""
    riders = await make_riders(stack, 200)
    sse = [SseReader(stack.api_url, tok) for _, _, tok in riders[:100]]
    await asyncio.gather(*(s.open() for s in sse))
    wss = [await ws_open(stack, tok) for _, _, tok in riders[100:]]
    ids: list[int] = []
    for _ in range(10):
        ids.append(await notify(stack))
        await asyncio.sleep(0.1)
    await eventually(lambda: all(len(s.seen) >= 10 for s in sse) and all(len(seen) >= 10 for _, seen, _ in wss),
                     timeout=30, what="every copy")
    for s in sse:
        assert [i for i, _ in s.seen] == ids
    for _, seen, _ in wss:
        assert [i for i, _ in seen] == ids
    for s in sse:
        s.close()
    for ws, _, task in wss:
        task.cancel()
        await ws.close()


async def test_events_handed_over_together_go_out_in_one_write_each_in_order(stack: LiveStack) -> None:
    """The broadcaster hands events over and EventLog._flush writes them: events committed together reach a
    direct subscriber in one write (one system call per subscriber, not per event), in id order, and
    the flush goes on in slices of FLUSH_CHUNK subscribers until every one is written."""
    from api.push.events import FLUSH_CHUNK
    rt = stack.runtime
    n = FLUSH_CHUNK + 20   # more than one slice
    riders = await make_riders(stack, n)
    sse = [SseReader(stack.api_url, tok) for _, _, tok in riders]
    await asyncio.gather(*(s.open() for s in sse))
    await eventually(lambda: rt.metrics.counts["subscribers_direct"] >= n, timeout=30,
                     what="every stream written directly")
    writes0 = rt.metrics.counts["push_writes"]

    def unit(s: Any) -> None:   # five events for every rider, in one transaction: one hand-over
        for k in range(5):
            for uid, _, _ in riders:
                rt.events.append(s, "ride", {"k": k}, uid)
        s.commit()

    await rt.db.write(unit)
    await eventually(lambda: all(len(s.seen) >= 5 for s in sse), timeout=30, what="five events on every stream")
    for s in sse:
        ids = [i for i, _ in s.seen]
        assert len(ids) == 5 and ids == sorted(ids), s.seen
    assert rt.metrics.counts["push_writes"] - writes0 == n   # one write per subscriber for the five
    for s in sse:
        s.close()

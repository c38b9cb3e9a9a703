"""Notifications (api/notifications): written once, fanned out on every transport through the event log,
per-rider rules at fan-out (opt-out, quiet hours, daily cap), TTL and reconnect, receipts and counts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from amqtt.client import MQTTClient
from amqtt.mqtt.constants import QOS_1
from sqlmodel import func, select
from websockets.asyncio.client import connect

from api.clock import now_ms
from api.notifications.models import Notification
from api.riders.models import User as UserRow
from protocol import topics
from tests.api.push_support import User, sse_messages
from tests.support import LiveStack, eventually, live_stack

CAPS = {"transactional": 0, "service": 2, "marketing": 5}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LiveStack]:   # overrides tests/conftest.py's: MQTT over WS, fast ticks
    async with live_stack(tmp_path, ws_port=0, notify_tick_s=0.1, notify_daily_cap=CAPS) as live:
        yield live


def note(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"title": "Zone closed", "body": "Downtown is closed today", "category": "service",
                            "audience": {"all": True}, "ttl_s": 60}
    body.update(kw)
    return body


async def send(stack: LiveStack, **kw: Any) -> dict[str, Any]:
    r = await stack.http.post("/v1/notifications", json=note(**kw))
    assert r.status_code == 201, r.text
    return r.json()


async def cursor_of(user: User) -> int:
    after = 0
    for _ in range(100):
        page = (await user.http.get("/v1/events", params={"after": after, "limit": 1000})).json()
        if not page["events"]:
            return after
        after = page["cursor"]
    raise AssertionError("too many events")


async def notes_after(user: User, after: int) -> list[dict[str, Any]]:
    page = (await user.http.get("/v1/events", params={"after": after, "limit": 1000})).json()
    return [e for e in page["events"] if e["kind"] == "notification"]


async def detail(stack: LiveStack, nid: str) -> dict[str, Any]:
    """GET /v1/notifications/{id} once this process has flushed its counts (tick: 0.1 s)."""
    fanout = stack.runtime.notifications.fanout
    await eventually(lambda: fanout.unflushed(nid) == {}, what="the counts to be flushed")
    r = await stack.http.get(f"/v1/notifications/{nid}")
    assert r.status_code == 200, r.text
    return r.json()


async def test_bad_bodies_are_4xx_and_riders_cannot_send(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider = await users()
    r = await rider.http.post("/v1/notifications", json=note())
    assert r.status_code == 403
    bad: list[dict[str, Any]] = [
        note(category="spam"), note(audience={}), note(audience={"all": True, "riding": True}),
        note(audience={"users": []}), note(audience={"users": ["a", "a"]}), note(audience={"all": False}),
        note(ttl_s=0), note(ttl_s="soon"), note(title="x" * 121), note(body="x" * 1001),
        note(actions=[{"id": f"a{i}", "label": "L"} for i in range(4)]),
        note(actions=[{"id": "bad id!", "label": "L"}]), note(actions=[{"id": "a", "label": ""}]),
        note(actions=[{"id": "a", "label": "L"}, {"id": "a", "label": "M"}]),
        note(data={"pad": "x" * 5000}), note(extra=1), note(title=None),                 # a body without a title
        note(title=None, body=None), note(title=None, body=None, data={"k": 1}, actions=[{"id": "a", "label": "L"}]),
        note(ttl_s=8 * 86_400)]
    for body in bad:
        r = await stack.http.post("/v1/notifications", json={k: v for k, v in body.items() if v is not None})
        assert r.status_code == 422, (body, r.status_code, r.text)
    r = await stack.http.post("/v1/notifications", json=note(audience={"users": [rider.id, "nobody"]}))
    assert r.status_code == 400 and "nobody" in r.json()["detail"]
    r = await stack.http.post("/v1/notifications", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    # a data message: no title, no body; delivered silently
    ok = await send(stack, title=None, body=None, data={"refresh": "bikes"}, category="transactional")
    assert ok["silent"] is True and ok["audience_size"] == 1
    # riders see no operator view and cannot report for the admin
    assert (await rider.http.get(f"/v1/notifications/{ok['id']}")).status_code == 403
    assert (await stack.http.post(f"/v1/notifications/{ok['id']}/receipt", json={"seen": True})).status_code == 403
    assert (await stack.http.get("/v1/notifications/nope")).status_code == 404


async def test_written_once_and_on_every_transport(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    alice, bob = await users(), await users()
    start = await cursor_of(alice)
    # SSE, WebSocket and a held long poll, all live; MQTT over WebSocket on the rider's own topic
    token = (await alice.http.post("/v1/auth/stream-token")).json()["token"]
    sse_got: list[Any] = []

    async def sse() -> None:
        async with alice.http.stream("GET", "/v1/events/stream", params={"after": start}) as r:
            async for msg in sse_messages(r):
                sse_got.append(msg)
                if msg.event == "notification":
                    return

    sse_task = asyncio.ensure_future(asyncio.wait_for(sse(), 15))
    ws = await connect(stack.api_url.replace("http://", "ws://") + f"/v1/ws?token={token}")
    await ws.send(json.dumps({"type": "subscribe", "after": start}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "subscribed"
    assert stack.stack.broker is not None
    mqtt = MQTTClient(client_id=f"{alice.id}-app", config={"auto_reconnect": False})
    await mqtt.connect(f"ws://{alice.id}:{alice.token}@127.0.0.1:{stack.stack.broker.ports['ws']}/")
    try:
        assert await mqtt.subscribe([(topics.user_events_topic(alice.id), QOS_1)]) == [QOS_1]
        poll = asyncio.ensure_future(alice.http.get("/v1/events", params={"after": start, "wait": 15}))
        await eventually(lambda: len(stack.runtime.events) >= 3, what="SSE, WebSocket and the long poll live")
        sent = await send(stack, audience={"users": [alice.id]}, category="transactional",
                          actions=[{"id": "ok", "label": "OK"}], data={"zone": "downtown"})
        assert sent["audience_size"] == 1
        polled = (await asyncio.wait_for(poll, 10)).json()["events"]
        await sse_task
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        msg = await mqtt.deliver_message(timeout_duration=10)
        assert msg is not None
        over_mqtt = json.loads(bytes(msg.data))
        over_sse = sse_got[-1]
        assert over_sse.event == "notification" and int(over_sse.id) == sent["event_id"]
        short = await notes_after(alice, start)
        copies = [polled[0], over_sse.json(), frame["event"], over_mqtt, short[0]]
        assert all(c == copies[0] for c in copies), copies
        ev = copies[0]
        assert ev["id"] == sent["event_id"] and ev["kind"] == "notification"
        assert ev["data"] == {"notification_id": sent["id"], "category": "transactional", "title": "Zone closed",
                              "body": "Downtown is closed today", "actions": [{"id": "ok", "label": "OK"}],
                              "data": {"zone": "downtown"}, "silent": False, "sent_at": ev["data"]["sent_at"],
                              "expires_at": sent["expires_at"]}   # no audience: other riders' ids stay with operators
        # bob was not in the audience: nothing for him; the operator sees it with its audience
        assert await notes_after(bob, start) == []
        ops = [e for e in (await stack.http.get("/v1/events", params={"after": start, "limit": 1000})).json()["events"]
               if e["kind"] == "notification"]
        assert [e["id"] for e in ops] == [sent["event_id"]] and ops[0]["data"]["audience"] == {"users": [alice.id]}
        # written once: one notification row, one event row, whatever the audience
        await send(stack)   # to all
        rows = await stack.runtime.db.read(lambda s: s.exec(select(func.count()).select_from(Notification)).one())
        assert rows == 2
        await eventually(lambda: stack.runtime.notifications.fanout.unflushed(sent["id"]) == {}, what="a flush")
        counts = (await detail(stack, sent["id"]))["counts"]
        assert counts["delivered"] == 1 and counts["mqtt_published"] == 1 and counts["audience"] == 1
    finally:
        await mqtt.disconnect()
        await ws.close()


async def test_mqtt_copies_only_to_riders_on_mqtt(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    """A notification's MQTT copies go to the topics of riders whose app logged into the broker (within
    LATCH_NOTIFY_MQTT_SESSION_S), not to every rider: a copy for a rider with no session there reaches no
    one. The others read it by cursor. The login is written once, not at every reconnect."""
    alice, bob = await users(), await users()
    start = await cursor_of(bob)
    link = stack.runtime.link
    copied: list[str] = []
    publish = link.publish

    def recording(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if topic.startswith(topics.USER_PREFIX):
            copied.append(topic)
        publish(topic, payload, qos, retain)

    link.publish = recording  # type: ignore[method-assign]
    assert stack.stack.broker is not None
    url = f"ws://{alice.id}:{alice.token}@127.0.0.1:{stack.stack.broker.ports['ws']}/"

    async def login_at() -> int | None:
        return await stack.runtime.db.read(lambda s: s.get(UserRow, alice.id).mqtt_login_at)   # type: ignore[union-attr]

    assert await login_at() is None
    mqtt = MQTTClient(client_id=f"{alice.id}-app", config={"auto_reconnect": False})
    await mqtt.connect(url)
    try:
        first = await login_at()
        assert first is not None and abs(first - now_ms()) < 60_000
        await mqtt.disconnect()
        mqtt = MQTTClient(client_id=f"{alice.id}-app", config={"auto_reconnect": False})
        await mqtt.connect(url)
        assert await login_at() == first   # within the hour: not written again
        assert await mqtt.subscribe([(topics.user_events_topic(alice.id), QOS_1)]) == [QOS_1]
        sent = await send(stack, category="transactional")   # to all riders
        msg = await mqtt.deliver_message(timeout_duration=10)
        assert msg is not None and json.loads(bytes(msg.data))["id"] == sent["event_id"]
        counts = (await detail(stack, sent["id"]))["counts"]
        assert counts["mqtt_published"] == 1
        assert copied == [topics.user_events_topic(alice.id)]
        assert [e["id"] for e in await notes_after(bob, start)] == [sent["event_id"]]   # bob: by cursor
    finally:
        await mqtt.disconnect()


async def test_offline_rider_gets_it_on_reconnect_exactly_once_and_never_after_ttl(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider = await users()
    start = await cursor_of(rider)          # the rider goes offline here
    sent = await send(stack, ttl_s=30)
    # reconnect over SSE from the last id it had: the notification, once
    got: list[Any] = []

    async def reconnect(last: int, until: str) -> None:
        """The rider's notifications after `last`, up to the one `until` (a later one marks the end)."""
        async with rider.http.stream("GET", "/v1/events/stream", headers={"Last-Event-ID": str(last)}) as r:
            async for msg in sse_messages(r):
                if msg.event == "notification":
                    got.append(msg)
                    if msg.json()["data"]["notification_id"] == until:
                        return

    await asyncio.wait_for(reconnect(start, sent["id"]), 10)
    assert [int(m.id) for m in got] == [sent["event_id"]]
    # and resuming after it: never again, on any poll
    assert await notes_after(rider, sent["event_id"]) == []
    # expiry: a notification whose TTL ends while the rider is away is never shown
    again = await cursor_of(rider)
    short = await send(stack, ttl_s=1)
    await eventually(lambda: now_ms() > short["expires_at"], timeout=5, what="the TTL to pass")
    assert await notes_after(rider, again) == []
    marker = await send(stack, category="transactional", title="marker")
    got.clear()
    await asyncio.wait_for(reconnect(again, marker["id"]), 10)
    assert [m.json()["data"]["notification_id"] for m in got] == [marker["id"]]
    counts = (await detail(stack, short["id"]))["counts"]
    assert counts["expired"] == 1 and counts["delivered"] == 0


async def test_opt_out_per_category_but_never_transactional(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider, other = await users(), await users()
    assert (await rider.http.get("/v1/me/notification-prefs")).json() == {"opt_out": [], "quiet_hours": None,
                                                                          "timezone": "UTC"}
    for bad in ({"opt_out": ["transactional"]}, {"opt_out": ["spam"]}, {"timezone": "Mars/Olympus"},
                {"quiet_hours": {"start": "25:00", "end": "07:00"}}, {"quiet_hours": {"start": "22:00"}},
                {"opt_out": "marketing"}, {"colour": "red"}):
        r = await rider.http.put("/v1/me/notification-prefs", json=bad)
        assert r.status_code == 422, (bad, r.text)
    r = await rider.http.put("/v1/me/notification-prefs", json={"opt_out": ["marketing", "service"]})
    assert r.status_code == 200 and r.json()["opt_out"] == ["marketing", "service"]
    assert (await stack.http.get("/v1/me/notification-prefs")).status_code == 403   # the admin token has no account
    start = await cursor_of(rider)
    sent = {c: await send(stack, category=c) for c in ("marketing", "service", "transactional")}
    assert [e["data"]["category"] for e in await notes_after(rider, start)] == ["transactional"]
    assert [e["data"]["category"] for e in await notes_after(other, start)] == ["marketing", "service", "transactional"]
    d = await detail(stack, sent["marketing"]["id"])
    assert d["counts"]["held"]["opted_out"] == 1 and d["counts"]["delivered"] == 1


def _clock(dt: datetime) -> str:
    return dt.strftime("%H:%M:%S")


async def test_quiet_hours_hold_marketing_until_they_end_or_drop_it_when_the_ttl_ends_first(  # type: ignore[no-untyped-def]
        stack: LiveStack, users) -> None:
    rider, late = await users(), await users()
    now = datetime.now(UTC)
    quiet_end = now + timedelta(seconds=4)
    for u, end in ((rider, quiet_end), (late, now + timedelta(hours=2))):
        r = await u.http.put("/v1/me/notification-prefs", json={
            "quiet_hours": {"start": _clock(now - timedelta(minutes=5)), "end": _clock(end)}, "timezone": "UTC"})
        assert r.status_code == 200, r.text
    start = await cursor_of(rider)
    got: list[dict[str, Any]] = []

    async def listen() -> None:
        async with rider.http.stream("GET", "/v1/events/stream", params={"after": start}) as r:
            async for msg in sse_messages(r):
                if msg.event == "notification":
                    got.append(msg.json())
                    if msg.json()["data"]["category"] == "marketing":
                        return

    task = asyncio.ensure_future(asyncio.wait_for(listen(), 30))
    await eventually(lambda: len(stack.runtime.events) >= 1, what="the rider's stream")
    promo = await send(stack, category="marketing", title="Half price", body="Today only", ttl_s=60)
    dropped = await send(stack, category="marketing", title="Flash", body="Ten minutes", ttl_s=2,
                         audience={"users": [late.id]})
    service = await send(stack, category="service")   # quiet hours hold marketing only
    await eventually(lambda: [e["data"]["notification_id"] for e in got] == [service["id"]],
                     what="the service notification at once")
    assert datetime.now(UTC) < quiet_end, "the machine was too slow for this test's quiet hours"
    await task   # the marketing one, released when the quiet hours ended
    released = got[-1]
    assert released["data"]["notification_id"] == promo["id"] and released["id"] > promo["event_id"]
    assert released["at"] >= int(quiet_end.timestamp() * 1000) - 1000
    # exactly once, from any cursor, and never to the rider whose quiet hours outlast its TTL
    ids = [e["data"]["notification_id"] for e in await notes_after(rider, start)]
    assert ids.count(promo["id"]) == 1
    await eventually(lambda: now_ms() > dropped["expires_at"], timeout=5, what="the short TTL to pass")
    assert all(e["data"]["category"] != "marketing" for e in await notes_after(late, start))
    d = await detail(stack, promo["id"])
    assert d["counts"]["held"]["quiet_hours"] == 2 and d["counts"]["delivered"] == 1   # rider released; late held
    assert (await detail(stack, dropped["id"]))["counts"]["held"]["quiet_hours"] == 1


async def test_a_daily_cap_per_category(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider = await users()
    start = await cursor_of(rider)
    sent = [await send(stack, category="service", title=f"n{i}") for i in range(3)]
    await send(stack, category="transactional", title="receipt")   # transactional: no cap (0)
    got = await notes_after(rider, start)
    assert [e["data"]["title"] for e in got] == ["n0", "n1", "receipt"]
    # the same answer on every read: the cap is decided by the stream, not by when it is read
    assert await notes_after(rider, start) == got
    assert (await detail(stack, sent[2]["id"]))["counts"]["held"]["capped"] == 1


async def test_receipts_and_counts(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    a, b, c, outsider = await users(), await users(), await users(), await users()
    sent = await send(stack, audience={"users": [a.id, b.id, c.id]}, category="transactional",
                      actions=[{"id": "yes", "label": "Yes"}, {"id": "no", "label": "No"}])
    assert sent["audience_size"] == 3
    nid = sent["id"]
    for u in (a, b):
        assert [e["data"]["notification_id"] for e in await notes_after(u, 0)] == [nid]
    url = f"/v1/notifications/{nid}/receipt"
    assert (await a.http.post(url, json={"seen": True})).status_code == 200
    assert (await a.http.post(url, json={"seen": True})).status_code == 200       # repeating changes nothing
    r = await b.http.post(url, json={"action": "yes"})
    assert r.status_code == 200 and r.json()["action"] == "yes" and r.json()["seen_at"]
    assert (await b.http.post(url, json={"action": "no"})).status_code == 409
    assert (await c.http.post(url, json={"action": "maybe"})).status_code == 422
    assert (await c.http.post(url, json={})).status_code == 422
    assert (await c.http.post(url, json={"seen": False})).status_code == 422
    assert (await c.http.post(url, json={"action": "no"})).status_code == 200
    assert (await outsider.http.post(url, json={"seen": True})).status_code == 404   # not theirs
    assert (await a.http.post("/v1/notifications/nope/receipt", json={"seen": True})).status_code == 404
    d = await detail(stack, nid)
    # none of them ever logged into MQTT: no copies on their topics (test_mqtt_copies_only_to_riders_on_mqtt)
    assert d["counts"] == {"audience": 3, "delivered": 2, "mqtt_published": 0, "seen": 3,
                           "actions": {"yes": 1, "no": 1}, "held": {"opted_out": 0, "quiet_hours": 0, "capped": 0},
                           "expired": 0}
    rows = {r["user_id"]: r for r in d["receipts"]}
    assert set(rows) == {a.id, b.id, c.id}   # rows only for those that answered
    assert rows[a.id]["action"] is None and rows[b.id]["action"] == "yes" and rows[c.id]["action"] == "no"


async def test_riding_is_the_riders_on_a_ride_when_it_is_sent(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    await stack.lock("bike-1")
    riding, idle = await users(), await users()
    ride = (await riding.http.post("/v1/rides", json={"bike_id": "bike-1"})).json()

    async def active() -> bool:
        return (await riding.http.get(f"/v1/rides/{ride['id']}")).json()["status"] == "active"

    await eventually(active, what="the ride to be active")
    start = max(await cursor_of(riding), await cursor_of(idle))
    sent = await send(stack, audience={"riding": True}, category="transactional", title="Storm coming")
    assert sent["audience_size"] == 1
    assert [e["data"]["notification_id"] for e in await notes_after(riding, start)] == [sent["id"]]
    assert await notes_after(idle, start) == []
    # a receipt from someone who was not riding then is refused
    assert (await idle.http.post(f"/v1/notifications/{sent['id']}/receipt", json={"seen": True})).status_code == 404

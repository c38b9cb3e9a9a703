"""What the operator console reads (api/routes/stats.py, api/ops_queries.py, GET /v1/devices filters):
search, filters, sort and paging in the database with a total; fleet counts; the charts' series; the
feed's backfill; presence history; a command with who issued it; 422 on bad values, 403 for riders."""

from __future__ import annotations

import time

import httpx
from sqlmodel import Session

from api import ops_queries
from api.push.event_models import LogEvent
from device_sim.lock import Behaviour
from tests.support import LiveStack, eventually


async def test_device_list_search_filters_sort_and_paging(stack: LiveStack) -> None:
    h = stack.http
    await stack.lock("bike-a1", Behaviour(actuation_delay_s=0.01, battery=12))
    await stack.lock("bike-a2", Behaviour(actuation_delay_s=0.01, battery=80))
    await stack.lock("bike-jam", Behaviour(actuation_delay_s=0.01, jam_rate=1.0, battery=50))
    await stack.register("spare-x1")             # never online
    await stack.register("spare-x2")
    await h.delete("/v1/devices/spare-x2")
    for d in ("bike-a1", "bike-a2", "bike-jam"):   # each ack carries the reported battery
        await stack.command(d, "locate")
    assert (await stack.command("bike-jam", "unlock")).json()["status"] == "failed"

    async def ids(**params) -> list[str]:  # type: ignore[no-untyped-def]
        r = await h.get("/v1/devices", params=params)
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()]

    async def batteries_known() -> bool:
        return await ids(filter="low_battery") == ["bike-a1"]
    await eventually(batteries_known, timeout=10, interval=0.1, what="reported batteries")
    assert await ids() == ["bike-a1", "bike-a2", "bike-jam", "spare-x1", "spare-x2"]
    r = await h.get("/v1/devices", params={"limit": 2, "offset": 2})
    assert [d["id"] for d in r.json()] == ["bike-jam", "spare-x1"] and r.headers["x-total-count"] == "5"
    assert await ids(q="SPARE") == ["spare-x1", "spare-x2"]
    assert await ids(q="%") == [] and await ids(q="_") == []   # LIKE's wildcards are plain characters
    assert await ids(filter="online") == ["bike-a1", "bike-a2", "bike-jam"]
    assert await ids(filter="offline") == ["spare-x1", "spare-x2"]
    assert await ids(filter=["offline", "revoked"]) == ["spare-x2"]
    assert await ids(filter="jammed") == ["bike-jam"]
    rows = (await h.get("/v1/devices", params={"q": "bike-jam"})).json()
    assert rows[0]["jammed"] is True and rows[0]["in_ride"] is False
    assert await ids(sort="battery") == ["bike-a1", "bike-jam", "bike-a2", "spare-x1", "spare-x2"]
    assert await ids(sort="-battery") == ["bike-a2", "bike-jam", "bike-a1", "spare-x1", "spare-x2"]
    assert await ids(sort="-id", limit=2) == ["spare-x2", "spare-x1"]
    assert (await ids(sort="offline"))[:2] == ["spare-x1", "spare-x2"]
    assert (await ids(sort="-last_seen"))[-2:] == ["spare-x1", "spare-x2"]   # never seen: last

    # a rider on bike-a2: in_ride
    r = await h.post("/v1/auth/signup", json={"email": "ride@example.org", "password": "long password"})
    rider = {"Authorization": f"Bearer {r.json()['access_token']}"}
    async with httpx.AsyncClient(base_url=stack.api_url, headers=rider, timeout=30) as rh:
        assert (await rh.post("/v1/rides", json={"bike_id": "bike-a2"})).status_code == 201
        assert (await rh.get("/v1/devices")).status_code == 403
        assert (await rh.get("/v1/ops/summary")).status_code == 403
        assert (await rh.get("/v1/ops/series")).status_code == 403
    assert await ids(filter="in_ride") == ["bike-a2"]
    summary = (await h.get("/v1/ops/summary")).json()
    assert summary == {"total": 5, "online": 3, "offline": 1, "low_battery": 1, "in_ride": 1, "jammed": 1,
                       "revoked": 1}

    # bad values: 422 naming the parameter
    for params, name in (({"filter": "broken"}, "filter"), ({"sort": "colour"}, "sort"), ({"limit": 0}, "limit"),
                         ({"limit": 1001}, "limit"), ({"offset": -1}, "offset"), ({"q": "x" * 65}, "q"),
                         ({"q": "a\x00b"}, "q")):   # PostgreSQL text holds no NUL: refused before any query
        r = await h.get("/v1/devices", params=params)
        assert r.status_code == 422, params
        assert name in r.json()["detail"][0]["loc"]


async def test_series_backfill_presence_and_command_detail(stack: LiveStack) -> None:
    h = stack.http
    lock = await stack.lock("bike-1")
    await stack.lock("bike-2", Behaviour(actuation_delay_s=0.01, jam_rate=1.0))
    ok = (await stack.command("bike-1", "unlock")).json()
    assert ok["status"] == "succeeded"
    assert (await stack.command("bike-2", "unlock")).json()["status"] == "failed"
    await lock.stop()
    await stack.wait_presence("bike-1", False)

    s = (await h.get("/v1/ops/series", params={"minutes": 10})).json()
    assert s["minutes"] == 10 and len(s["online"]) == 10 and s["online_now"] == 1
    assert sum(s["commands"]["succeeded"]) == 1 and sum(s["commands"]["failed"]) == 1
    assert s["online"][-1] == 1 and s["online"][0] == 0   # minute resolution: see the test below
    for stage in ("dispatch", "delivery", "actuation", "total"):
        assert len(s["latency_ms"][stage]["p50"]) == 10
        assert [v for v in s["latency_ms"][stage]["p99"] if v is not None], stage
    total = [v for v in s["latency_ms"]["total"]["p99"] if v is not None][0]
    assert 0 <= total < 5000
    assert (await h.get("/v1/ops/series", params={"minutes": 4})).status_code == 422
    assert (await h.get("/v1/ops/series", params={"minutes": "an hour"})).status_code == 422

    events = (await h.get("/v1/ops/events/recent", params={"limit": 5})).json()
    assert len(events) == 5 and [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert events[-1]["kind"] == "presence" and events[-1]["data"] == {"device_id": "bike-1", "online": False}

    changes = (await h.get("/v1/ops/devices/bike-1/presence")).json()
    assert [c["online"] for c in changes] == [False, True]
    assert (await h.get("/v1/ops/devices/nope/presence")).status_code == 404
    assert (await h.get("/v1/ops/devices/a%00b/presence")).status_code == 422

    detail = (await h.get(f"/v1/ops/commands/{ok['id']}")).json()
    assert detail["owner"] == "admin" and detail["issued_by"]["label"] == "the operator token"
    assert [e["to_status"] for e in detail["history"] if e["applied"]][-1] == "succeeded"
    assert (await h.get("/v1/ops/commands/nope")).status_code == 404


async def test_devices_online_over_time_and_the_log_bisected(stack: LiveStack) -> None:
    db = stack.runtime.db
    now = int(time.time() * 1000)
    minute = now // 60_000 * 60_000

    def changes(s: Session) -> None:   # d1 up 5 minutes ago, d2 up 4, d1 down 2, d2 down 1: none online now
        s.add_all([LogEvent(at=minute - m * 60_000 + 1, kind="presence", data={"device_id": d, "online": up})
                   for m, d, up in ((5, "d1", True), (4, "d2", True), (2, "d1", False), (1, "d2", False))])
        s.commit()
    await db.write(changes)
    s = await db.read(lambda s: ops_queries.series(s, 8, now))
    assert s["online"] == [0, 0, 1, 2, 2, 1, 0, 0]

    base = int(time.time() * 1000) + 10_000_000

    def fill(s: Session) -> None:
        s.add_all([LogEvent(at=base + i * 10, kind="presence", data={"device_id": "x", "online": True})
                   for i in range(100)])
        s.commit()
    await db.write(fill)
    first = await db.read(lambda s: ops_queries.first_event_at_or_after(s, base))
    last = await db.read(lambda s: ops_queries.first_event_at_or_after(s, base + 990))
    mid = await db.read(lambda s: ops_queries.first_event_at_or_after(s, base + 455))
    assert last - first == 99 and mid - first == 46
    assert await db.read(lambda s: ops_queries.first_event_at_or_after(s, base + 991)) is None

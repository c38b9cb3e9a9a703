"""The event log over short polling: what each caller sees, cursors, paging, resume, bad cursors."""

from __future__ import annotations

import re

import httpx

from latch.stack import Stack
from protocol import messages, topics
from tests.support import LiveStack, eventually, make_settings


async def all_events(client: httpx.AsyncClient, after: int = 0, limit: int = 1000) -> list[dict]:
    out: list[dict] = []
    for _ in range(100):   # bounded paging
        page = (await client.get("/v1/events", params={"after": after, "limit": limit})).json()
        out += page["events"]
        if not page["events"]:
            assert page["cursor"] == after
            return out
        after = page["cursor"]
        assert after == page["events"][-1]["id"]
    raise AssertionError("more pages than expected")


async def ride_to_active(stack: LiveStack, rider, bike: str) -> dict:  # type: ignore[no-untyped-def]
    ride = (await rider.http.post("/v1/rides", json={"bike_id": bike})).json()

    async def active() -> bool:
        return (await rider.http.get(f"/v1/rides/{ride['id']}")).json()["status"] == "active"

    await eventually(active, what=f"ride on {bike} active")
    return ride


async def test_a_ride_as_events_and_each_rider_sees_only_their_own(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    await stack.lock("bike-a")
    await stack.lock("bike-b")
    alice, bob = await users(), await users()
    ride_a = await ride_to_active(stack, alice, "bike-a")
    ride_b = await ride_to_active(stack, bob, "bike-b")

    async def unlocked_seen() -> list[dict] | None:
        evs = await all_events(alice.http)
        return evs if any(e["kind"] == "lock_state" for e in evs) else None

    seen = await eventually(unlocked_seen, what="alice to see her bike unlocked")
    kinds = [(e["kind"], e["data"].get("status", e["data"].get("locked"))) for e in seen]
    # the lock's state report and its ack are handled concurrently, so lock_state may come a little earlier
    assert [k for k in kinds if k[0] != "lock_state"] == [
        ("ride", "starting"), ("command", "queued"), ("command", "sent"), ("command", "received"),
        ("command", "succeeded"), ("ride", "active")]
    assert [k for k in kinds if k[0] == "lock_state"] == [("lock_state", False)]
    assert all(e["data"].get("ride_id", ride_a["id"]) == ride_a["id"] for e in seen)
    assert all(e["data"].get("device_id") == "bike-a" for e in seen)
    assert all(e["data"]["user_id"] == alice.id for e in seen if e["kind"] == "ride")
    ids = [e["id"] for e in seen]
    assert ids == sorted(set(ids))
    bobs = await all_events(bob.http)
    assert bobs and all(e["data"]["device_id"] == "bike-b" for e in bobs)
    assert ride_b["id"] in {e["data"].get("ride_id") for e in bobs}
    # an operator sees everything, including presence nobody rode
    ops = await all_events(stack.http)
    assert {e["id"] for e in seen} | {e["id"] for e in bobs} < {e["id"] for e in ops}
    assert {("bike-a", True), ("bike-b", True)} <= {(e["data"]["device_id"], e["data"]["online"])
                                                    for e in ops if e["kind"] == "presence"}


async def test_paging_resume_and_no_duplicates(stack: LiveStack) -> None:
    await stack.lock("bike-p")
    for _ in range(4):
        assert (await stack.command("bike-p", "locate")).json()["status"] == "succeeded"
    everything = await all_events(stack.http)
    paged = await all_events(stack.http, limit=3)
    assert [e["id"] for e in paged] == [e["id"] for e in everything]
    middle = everything[len(everything) // 2]["id"]
    assert [e["id"] for e in await all_events(stack.http, after=middle)] == \
        [e["id"] for e in everything if e["id"] > middle]


async def test_bad_cursors_are_400_with_a_message(stack: LiveStack) -> None:
    await stack.lock("bike-c")
    head = (await all_events(stack.http))[-1]["id"]
    for bad in ("abc", "-1", "1.5", "1e3", "0x10", " ", "9" * 30):
        r = await stack.http.get("/v1/events", params={"after": bad})
        if bad == " ":
            assert r.status_code == 200   # blank = no cursor
            continue
        assert r.status_code == 400 and "is not an event id" in r.json()["detail"], (bad, r.text)
    r = await stack.http.get("/v1/events", params={"after": head + 1000})
    # The lock's own reports may still be landing, so the newest id named is
    # at least the one read above (never the cursor itself).
    m = re.search(r"ahead of the newest event \((\d+)\)", r.json()["detail"])
    assert r.status_code == 400 and m, r.text
    assert head <= int(m.group(1)) < head + 1000
    r = await stack.http.get("/v1/events/stream", headers={"Last-Event-ID": "yesterday"})
    assert r.status_code == 400 and "is not an event id" in r.json()["detail"]


async def test_low_battery_presence_and_lock_state_go_to_the_rider(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    lock = await stack.lock("bike-l")
    rider = await users()
    await ride_to_active(stack, rider, "bike-l")
    for battery in (30, 15, 12):   # one event when it crosses the mark, not one per report
        lock.client.publish(topics.state_topic("bike-l"),
                            messages.encode_state({"locked": False, "battery": battery}, 0),
                            qos=1, retain=True)
    await lock.stop()

    async def seen() -> list[dict] | None:
        evs = await all_events(rider.http)
        return evs if any(e["kind"] == "presence" for e in evs) else None

    evs = await eventually(seen, what="the rider to see the bike go offline")
    assert [e["data"]["battery"] for e in evs if e["kind"] == "low_battery"] == [15]
    assert [e["data"]["online"] for e in evs if e["kind"] == "presence"] == [False]


async def test_resume_from_a_cursor_older_than_memory_reads_the_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with Stack(make_settings(tmp_path, event_ring=3)) as st:
        async with httpx.AsyncClient(base_url=st.api_url, headers={
                "Authorization": f"Bearer {st.settings.admin_token}"}) as http:
            live = LiveStack(st, http)
            lock = await live.lock("bike-m")
            try:
                for _ in range(3):
                    assert (await live.command("bike-m", "report")).json()["status"] == "succeeded"
                queries = live.runtime.metrics.counts["event_backlog_queries"]
                evs = await all_events(http, limit=4)
                assert len(evs) > 6 and [e["id"] for e in evs] == list(range(evs[0]["id"], evs[-1]["id"] + 1))
                assert live.runtime.metrics.counts["event_backlog_queries"] > queries
                # the newest three are served from memory, without a query
                queries = live.runtime.metrics.counts["event_backlog_queries"]
                tail = (await http.get("/v1/events", params={"after": evs[-3]["id"]})).json()["events"]
                assert [e["id"] for e in tail] == [e["id"] for e in evs[-2:]]
                assert live.runtime.metrics.counts["event_backlog_queries"] == queries
            finally:
                await lock.stop()

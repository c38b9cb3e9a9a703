"""Fleet commands end to end: real broker, real API on a socket, simulated locks; on SQLite and PostgreSQL.

Rates and priorities are asserted on observed states (issue timestamps of the device commands, counts
seen while polling, an unlock's final status while the rollout is still issuing), never on how long
something took.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect

from api import schema
from api.clock import now_ms
from api.db import Database
from api.models import Device, DeviceTag
from device_sim.lock import Behaviour, Credentials, SimulatedLock
from tests.api.push_support import sign_up
from tests.dbs import ON_POSTGRES, empty_postgres_url
from tests.support import LiveStack, eventually

# ---- helpers ---------------------------------------------------------------------------------------


async def fleet(stack: LiveStack, target: dict, action: str = "locate", rate: int = 60_000, **body: Any) -> dict:
    r = await stack.http.post("/v1/fleet/commands", json={"action": action, "target": target,
                                                          "rate_per_min": rate, **body})
    assert r.status_code == 201, r.text
    return r.json()


async def progress(stack: LiveStack, fleet_id: str) -> dict:
    r = await stack.http.get(f"/v1/fleet/commands/{fleet_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def until_status(stack: LiveStack, fleet_id: str, status: str, timeout: float = 20) -> dict:
    async def check() -> dict | None:
        body = await progress(stack, fleet_id)
        return body if body["status"] == status else None
    return await eventually(check, timeout=timeout, interval=0.05, what=f"fleet {fleet_id} {status}")


async def devices_of(stack: LiveStack, fleet_id: str, **params: Any) -> list[dict]:
    out: list[dict] = []
    for offset in range(0, 100_000, 1000):   # bounded paging
        r = await stack.http.get(f"/v1/fleet/commands/{fleet_id}/devices",
                                 params={"limit": 1000, "offset": offset, **params})
        assert r.status_code == 200, r.text
        out += r.json()
        if len(r.json()) < 1000:
            return out
    raise AssertionError("too many pages")


async def register(stack: LiveStack, device_id: str, **body: Any) -> dict:
    r = await stack.http.post("/v1/devices", json={"id": device_id, **body})
    assert r.status_code == 201, r.text
    return r.json()


async def bulk_devices(stack: LiveStack, ids: list[str], zone: str | None = None, tags: tuple[str, ...] = ()) -> None:
    """Offline devices straight into the registry's tables, in chunks: a test fixture for scale (through
    the API, 10,000 registrations are 10,000 transactions; this is one). Their credentials are unusable."""
    now = now_ms()
    devices = [{"id": d, "name": "", "secret_hash": "-", "command_key": "00" * 32, "revoked": False,
                "created_at": now, "online": False, "last_seen": None, "reported": {}, "reported_at": None,
                "zone": zone} for d in ids]
    tag_rows = [{"device_id": d, "tag": t} for d in ids for t in tags]

    def unit(s):  # type: ignore[no-untyped-def]
        conn = s.connection()
        for i in range(0, len(devices), 2000):
            conn.execute(insert(Device.__table__), devices[i:i + 2000])  # type: ignore[attr-defined]
        for i in range(0, len(tag_rows), 2000):
            conn.execute(insert(DeviceTag.__table__), tag_rows[i:i + 2000])  # type: ignore[attr-defined]
        s.commit()

    await stack.runtime.db.write(unit)


def ms(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp() * 1000


# ---- the schema --------------------------------------------------------------------------------------


@pytest.fixture
async def empty_db(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = Database(empty_postgres_url() if ON_POSTGRES else f"sqlite:///{tmp_path / 'm.db'}")
    try:
        yield db
    finally:
        await db.close()


async def test_migration_0002_adds_the_fleet_tables_and_matches_the_models(empty_db: Database) -> None:
    await schema.upgrade(empty_db, "0001")

    def tables(engine) -> set[str]:  # type: ignore[no-untyped-def]
        return set(inspect(engine).get_table_names())

    assert "fleet_command" not in await empty_db.run_sync(tables)
    await schema.upgrade(empty_db, "0002")
    assert {"fleet_command", "fleet_target"} <= await empty_db.run_sync(tables)
    await schema.upgrade(empty_db)   # later revisions add other tables; at the head everything matches the models

    def diff(engine) -> list:  # type: ignore[no-untyped-def]
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                    schema.target_metadata())

    assert await empty_db.run_sync(diff) == []   # the migration builds exactly the models' tables and indexes
    await empty_db.run_sync(lambda e: schema.downgrade_engine(e, "0001"))
    assert not {"fleet_command", "fleet_target"} & await empty_db.run_sync(tables)


# ---- device grouping -------------------------------------------------------------------------------------


async def test_devices_carry_a_zone_and_tags_set_at_registration_or_by_patch(stack: LiveStack) -> None:
    creds = await register(stack, "bike-z1", zone="downtown", tags=["fw-2", "ebike", "fw-2"])
    assert creds["zone"] == "downtown" and creds["tags"] == ["ebike", "fw-2"] and creds["mqtt_password"]
    got = (await stack.http.get("/v1/devices/bike-z1")).json()
    assert got["zone"] == "downtown" and got["tags"] == ["ebike", "fw-2"]
    r = await stack.http.patch("/v1/devices/bike-z1", json={"tags": ["fw-3"]})   # zone not sent: unchanged
    assert r.status_code == 200 and r.json()["tags"] == ["fw-3"] and r.json()["zone"] == "downtown"
    r = await stack.http.patch("/v1/devices/bike-z1", json={"zone": None})
    assert r.json()["zone"] is None and r.json()["tags"] == ["fw-3"]
    listed = {d["id"]: d for d in (await stack.http.get("/v1/devices")).json()}
    assert listed["bike-z1"]["tags"] == ["fw-3"]

    bad = [({"id": "b1", "tags": ["no spaces"]}, "tag 'no spaces' must be 1-64 characters"),
           ({"id": "b1", "tags": [f"t{i}" for i in range(33)]}, "at most 32 tags"),
           ({"id": "b1", "zone": "a/b"}, "zone must be 1-64 characters")]
    for body, message in bad:
        r = await stack.http.post("/v1/devices", json=body)
        assert r.status_code == 422 and message in r.text, (body, r.text)
    r = await stack.http.patch("/v1/devices/bike-z1", json={})
    assert r.status_code == 422 and "nothing to change" in r.text
    r = await stack.http.patch("/v1/devices/bike-z1", json={"zones": "x"})
    assert r.status_code == 422 and "zones" in r.text
    assert (await stack.http.patch("/v1/devices/nope", json={"zone": "x"})).status_code == 404


# ---- targeting -------------------------------------------------------------------------------------------


async def test_fleet_by_tag_zone_and_explicit_list_each_device_gets_its_own_command(stack: LiveStack) -> None:
    locks = {}
    for i, (zone, tags) in enumerate([("north", ["fw-2"]), ("north", ["fw-2"]), ("south", ["fw-2"]),
                                      ("south", []), (None, [])]):
        creds = await register(stack, f"bike-t{i}", zone=zone, tags=tags)
        lock = SimulatedLock(Credentials.from_registration(creds), Behaviour(actuation_delay_s=0.01))
        stack.locks.append(lock)
        await stack.start_lock(lock)
        locks[lock.device_id] = lock
    await register(stack, "bike-revoked", zone="north", tags=["fw-2"])
    assert (await stack.http.delete("/v1/devices/bike-revoked")).status_code == 200

    by_tag = await fleet(stack, {"tag": "fw-2"})
    assert by_tag["target"] == {"kind": "tag", "value": "fw-2"}
    assert by_tag["total"] == 3 and by_tag["excluded"] == 1 and by_tag["status"] == "running"
    done = await until_status(stack, by_tag["id"], "completed")
    assert done["counts"]["succeeded"] == 3 and done["issued"] == 3 and done["final"] is True
    assert "3 succeeded" in done["reason"]
    rows = await devices_of(stack, by_tag["id"])
    assert [r["device_id"] for r in rows] == ["bike-t0", "bike-t1", "bike-t2"]   # the snapshot, in id order
    for row in rows:   # an ordinary command each: usual states and history, owned by the fleet
        cmd = (await stack.http.get(f"/v1/commands/{row['command_id']}")).json()
        assert cmd["device_id"] == row["device_id"] and cmd["status"] == "succeeded"
        assert [h["to_status"] for h in cmd["history"] if h["applied"]] == ["queued", "sent", "received", "succeeded"]
        assert f"by fleet:{by_tag['id']}" in cmd["history"][0]["detail"]
        assert [a for _, a in locks[row["device_id"]].actuations] == ["beep"]

    by_zone = await fleet(stack, {"zone": "south"})
    assert by_zone["total"] == 2 and by_zone["excluded"] == 0
    assert (await until_status(stack, by_zone["id"], "completed"))["counts"]["succeeded"] == 2
    assert [r["device_id"] for r in await devices_of(stack, by_zone["id"])] == ["bike-t2", "bike-t3"]

    listed = await fleet(stack, {"devices": ["bike-t4", "bike-t0", "bike-t4", "bike-revoked"]})
    assert listed["target"] == {"kind": "devices", "value": 4}
    assert listed["total"] == 2 and listed["excluded"] == 1       # duplicates once, revoked left out
    assert (await until_status(stack, listed["id"], "completed"))["counts"]["succeeded"] == 2
    assert [r["device_id"] for r in await devices_of(stack, listed["id"])] == ["bike-t4", "bike-t0"]  # as listed

    everything = (await stack.http.get("/v1/fleet/commands")).json()
    assert [f["id"] for f in everything] == [listed["id"], by_zone["id"], by_tag["id"]]   # newest first
    assert everything[2]["counts"]["succeeded"] == 3
    assert [f["id"] for f in (await stack.http.get("/v1/fleet/commands", params={"status": "running"})).json()] == []


async def test_unknown_devices_and_empty_targets_are_400s_that_say_why(stack: LiveStack) -> None:
    await register(stack, "bike-k1")
    r = await stack.http.post("/v1/fleet/commands", json={
        "action": "locate", "rate_per_min": 60, "target": {"devices": ["bike-k1", "ghost-1", "ghost-2"]}})
    assert r.status_code == 400 and r.json()["detail"] == "2 unknown device(s) in target.devices: ghost-1, ghost-2"
    many = [f"ghost-{i}" for i in range(25)]
    r = await stack.http.post("/v1/fleet/commands", json={
        "action": "locate", "rate_per_min": 60, "target": {"devices": many}})
    assert r.status_code == 400 and "25 unknown device(s)" in r.text and "and 15 more" in r.text
    r = await stack.http.post("/v1/fleet/commands", json={"action": "locate", "rate_per_min": 60,
                                                          "target": {"tag": "nobody"}})
    assert r.status_code == 400 and r.json()["detail"] == "no device has tag 'nobody'"
    assert (await stack.http.get("/v1/fleet/commands")).json() == []   # nothing half-made


async def test_bad_bodies_are_422_with_clear_messages(stack: LiveStack) -> None:
    ok = {"action": "locate", "rate_per_min": 60, "target": {"tag": "x"}}
    cases = [
        ({k: v for k, v in ok.items() if k != "target"}, "target"),
        ({**ok, "target": {}}, "target must name exactly one of tag, zone or devices"),
        ({**ok, "target": {"tag": "x", "zone": "y"}}, "exactly one of tag, zone or devices (got tag, zone)"),
        ({**ok, "target": {"devices": []}}, "at least 1 item"),
        ({**ok, "target": {"devices": ["ok-1", "not ok"]}}, "1 device id(s) are not 1-64 characters"),
        ({**ok, "target": {"tag": "a+b"}}, "tag 'a+b' must be 1-64 characters"),
        ({**ok, "action": "explode"}, "unknown action 'explode'"),
        ({**ok, "rate_per_min": 0}, "greater than or equal to 1"),
        ({**ok, "rate_per_min": 10_000_000}, "above the most allowed, 60000 devices per minute"),
        ({**ok, "abort": {"failure_pct": 120, "after": 10}}, "less than or equal to 100"),
        ({**ok, "abort": {"failure_pct": 10}}, "after"),
        ({**ok, "rate": 60}, "Extra inputs are not permitted"),
        ({**ok, "ttl_s": 0}, "greater than or equal to 1"),
    ]
    for body, message in cases:
        r = await stack.http.post("/v1/fleet/commands", json=body)
        assert r.status_code == 422 and message in r.text, (body, r.status_code, r.text)
    r = await stack.http.get("/v1/fleet/commands/nope/devices", params={"status": "weird"})
    assert r.status_code == 422 and "one of: pending, queued" in r.text
    assert (await stack.http.get("/v1/fleet/commands/nope")).status_code == 404
    assert (await stack.http.get("/v1/fleet/commands/nope/devices")).status_code == 404
    assert (await stack.http.post("/v1/fleet/commands/nope/cancel")).status_code == 404
    r = await stack.http.get("/v1/fleet/commands", params={"status": "paused"})
    assert r.status_code == 422 and "running" in r.text


async def test_riders_may_not_use_fleet_commands(stack: LiveStack) -> None:
    await register(stack, "bike-r1", tags=["all"])
    rider = await sign_up(stack)
    try:
        r = await rider.http.post("/v1/fleet/commands", json={"action": "locate", "rate_per_min": 60,
                                                              "target": {"tag": "all"}})
        assert r.status_code == 403 and "operators only" in r.text
        assert (await rider.http.get("/v1/fleet/commands")).status_code == 403
        assert (await rider.http.patch("/v1/devices/bike-r1", json={"zone": "x"})).status_code == 403
    finally:
        await rider.http.aclose()
    assert (await stack.http.get("/v1/fleet/commands")).json() == []


async def test_idempotency_key_returns_the_same_fleet_command_or_409(stack: LiveStack) -> None:
    await bulk_devices(stack, ["idem-1", "idem-2"], tags=("t",))
    body = {"action": "locate", "rate_per_min": 60, "target": {"tag": "t"}, "ttl_s": 600}
    h = {"Idempotency-Key": "roll-1"}
    first = await stack.http.post("/v1/fleet/commands", json=body, headers=h)
    again = await stack.http.post("/v1/fleet/commands", json=body, headers=h)
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = await stack.http.post("/v1/fleet/commands", json={**body, "action": "report"}, headers=h)
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    assert len((await stack.http.get("/v1/fleet/commands")).json()) == 1


# ---- the rollout -------------------------------------------------------------------------------------------


async def test_rollout_rate_is_respected(stack: LiveStack) -> None:
    """5 devices/s to 20 offline devices (their commands wait queued): issue times of the device commands,
    and the issued counts seen while polling, must follow the rate, not a burst."""
    ids = [f"rate-{i:02d}" for i in range(20)]
    await bulk_devices(stack, ids, zone="rate")
    f = await fleet(stack, {"zone": "rate"}, rate=300, ttl_s=600)
    seen: list[int] = []

    async def all_issued() -> bool:
        body = await progress(stack, f["id"])
        if not seen or body["issued"] != seen[-1]:
            seen.append(body["issued"])
        return body["issued"] == 20

    await eventually(all_issued, timeout=30, interval=0.05, what="every device issued")
    assert len(seen) >= 5 and seen == sorted(seen), seen   # it grew step by step
    rows = await devices_of(stack, f["id"])
    assert [r["status"] for r in rows] == ["queued"] * 20
    issued_at = sorted(ms(r["issued_at"]) for r in rows)
    tick = stack.settings.fleet_tick_s
    carry = max(1.0, 5 * tick * 2)   # the most budget carried from tick to tick (api/fleet/service.py _Pace)
    # 20 devices at 5/s: at most one tick's worth plus the carry can go ahead of the rate
    assert issued_at[-1] - issued_at[0] >= (20 - carry - max(1.0, 5 * tick) - 1) / 5 * 1000, issued_at
    for i, t in enumerate(issued_at):   # no 1-second window holds much more than 5
        in_window = sum(1 for u in issued_at[i:] if u < t + 1000)
        assert in_window <= 5 + carry + 1, (i, in_window, issued_at)
    body = await progress(stack, f["id"])
    assert body["status"] == "running" and body["counts"]["queued"] == 20 and body["counts"]["pending"] == 0


async def test_abort_rule_stops_issuing_and_leaves_issued_commands_to_finish(stack: LiveStack) -> None:
    for i in range(8):
        await stack.lock(f"jam-{i}", Behaviour(actuation_delay_s=0.01, jam_rate=1.0))
    f = await fleet(stack, {"devices": [f"jam-{i}" for i in range(8)]}, action="unlock", rate=60,
                    abort={"failure_pct": 50, "after": 2})
    assert f["abort"] == {"failure_pct": 50.0, "after": 2}
    done = await until_status(stack, f["id"], "aborted", timeout=30)
    assert done["reason"].startswith("abort rule: ") and "> 50%, after at least 2" in done["reason"]
    assert 2 <= done["counts"]["failed"] and done["issued"] < 8 and done["counts"]["pending"] == 8 - done["issued"]
    # nothing more is issued afterwards; what was issued reaches its final state on its own
    await asyncio.sleep(3 * stack.settings.fleet_tick_s + 1.1)   # > one rate interval: a device would be due

    async def settled() -> dict | None:
        body = await progress(stack, f["id"])
        return body if body["counts"]["failed"] == body["issued"] else None

    later = await eventually(settled, timeout=10, what="issued commands final")
    assert later["issued"] == done["issued"] and later["status"] == "aborted"
    failed_rows = await devices_of(stack, f["id"], status="failed")
    assert len(failed_rows) == later["issued"] and all(r["reason"] for r in failed_rows)
    assert len(await devices_of(stack, f["id"], status="pending")) == 8 - later["issued"]


async def test_cancel_stops_issuing(stack: LiveStack) -> None:
    ids = [f"can-{i:02d}" for i in range(30)]
    await bulk_devices(stack, ids, tags=("cancel-me",))
    f = await fleet(stack, {"tag": "cancel-me"}, rate=120, ttl_s=600)

    async def started() -> bool:
        return (await progress(stack, f["id"]))["issued"] >= 2

    await eventually(started, timeout=10, what="a few devices issued")
    r = await stack.http.post(f"/v1/fleet/commands/{f['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and "already issued" in r.json()["reason"]
    assert (await stack.http.post(f"/v1/fleet/commands/{f['id']}/cancel")).status_code == 409
    await asyncio.sleep(3 * stack.settings.fleet_tick_s + 0.6)   # > one rate interval (0.5 s at 120/min)
    after = await progress(stack, f["id"])
    assert after["status"] == "cancelled" and after["issued"] < 30
    rows = await devices_of(stack, f["id"])
    issued_rows = [x for x in rows if x["status"] != "pending"]
    assert len(issued_rows) == after["issued"] and {x["status"] for x in issued_rows} == {"queued"}   # left to finish
    owned = [c for c in (await stack.http.get("/v1/commands", params={"limit": 500})).json()
             if c["id"] in {x["command_id"] for x in issued_rows}]
    assert len(owned) == after["issued"]
    # wait-for-absence: a stopped fleet has no event that could be awaited; a second is two rate intervals
    await asyncio.sleep(1.0)
    assert (await progress(stack, f["id"]))["issued"] == after["issued"]   # and it stays stopped


async def test_a_device_issued_before_a_crash_is_not_issued_twice(stack: LiveStack) -> None:
    """The worker dies after creating a device's command but before recording it in fleet_target (here:
    the command is made by hand while the worker is stopped). The next worker records that same command:
    the idempotency key fleet:<id>:<seq> gives it back instead of a second one."""
    from api.db import Priority
    from api.fleet.service import device_key, fleet_owner
    from api.models import CommandCreate

    rt = stack.runtime
    await bulk_devices(stack, ["crash-0", "crash-1", "crash-2"], zone="crash")
    await rt.fleet.stop()   # no worker: the fleet command is created but nothing is issued
    f = await fleet(stack, {"zone": "crash"}, ttl_s=600)
    assert (await progress(stack, f["id"]))["issued"] == 0
    device = await rt.registry.get("crash-0")
    early, created = await rt.commands.create(device, CommandCreate(action="locate", ttl_s=600), fleet_owner(f["id"]),
                                              device_key(f["id"], 0), priority=Priority.BULK)
    assert created
    rt.fleet.start()   # "the next lease holder"

    async def all_issued() -> bool:
        return (await progress(stack, f["id"]))["issued"] == 3

    await eventually(all_issued, timeout=10, what="the fleet issued")
    rows = await devices_of(stack, f["id"])
    assert rows[0]["device_id"] == "crash-0" and rows[0]["command_id"] == early.id
    commands = (await stack.http.get("/v1/devices/crash-0/commands")).json()
    assert [c["id"] for c in commands] == [early.id]   # one command for crash-0, not two


async def test_progress_counts_and_per_device_rows(stack: LiveStack) -> None:
    """3 good locks, 2 jamming, 2 offline (an unlock to an offline lock fails at once): the counts are one
    GROUP BY of the device commands' statuses, the per-device rows filter and page."""
    for i in range(3):
        await stack.lock(f"ok-{i}")
    for i in range(2):
        await stack.lock(f"jm-{i}", Behaviour(actuation_delay_s=0.01, jam_rate=1.0))
    await stack.register("off-0")
    await stack.register("off-1")
    ids = ["ok-0", "jm-0", "off-0", "ok-1", "jm-1", "off-1", "ok-2"]
    f = await fleet(stack, {"devices": ids}, action="unlock")
    assert sum(f["counts"].values()) == 7
    done = await until_status(stack, f["id"], "completed")
    counts = done["counts"]
    assert counts["succeeded"] == 3 and counts["failed"] == 4 and counts["pending"] == 0
    assert sum(counts.values()) == done["total"] == 7 == done["issued"]
    assert set(counts) == {"pending", "queued", "sent", "received", "succeeded", "failed", "rejected", "expired",
                           "timed_out", "cancelled"}
    assert done["reason"] == "every device command is final: 3 succeeded, 4 failed"
    rows = await devices_of(stack, f["id"])
    assert [r["device_id"] for r in rows] == ids and [r["seq"] for r in rows] == list(range(7))
    failed = await devices_of(stack, f["id"], status="failed")
    assert {r["device_id"] for r in failed} == {"jm-0", "jm-1", "off-0", "off-1"}
    assert {r["reason"] for r in failed if r["device_id"].startswith("off")} == {
        "device offline: unlock is never queued for an offline device, so it cannot fire late"}
    page = (await stack.http.get(f"/v1/fleet/commands/{f['id']}/devices",
                                 params={"limit": 2, "offset": 2})).json()
    assert [r["device_id"] for r in page] == ["off-0", "ok-1"]
    assert await devices_of(stack, f["id"], status="pending") == []
    # a fleet event when it started and when it completed (operators' event log)
    events = (await stack.http.get("/v1/events", params={"after": 0})).json()["events"]
    fleet_events = [e["data"] for e in events if e["kind"] == "fleet" and e["data"]["fleet_id"] == f["id"]]
    assert [e["status"] for e in fleet_events] == ["running", "completed"]


async def test_ten_thousand_devices_rollout_does_not_starve_a_riders_unlock(stack: LiveStack) -> None:
    """10,000 offline devices (their commands wait queued) at the highest rate: while the rollout is still
    issuing, unlocks and locks of one online lock complete, each before the rollout has finished.

    The rollout is then cancelled: issuing all 10,000 takes longer than a test should (~30 s on SQLite,
    more on PostgreSQL, where each device command is a committed transaction); bench/fleet.py runs it to
    the end. What is checked here at 10,000: the snapshot, the counts and the listing over all of it."""
    n = 10_000
    t0 = time.monotonic()
    await bulk_devices(stack, [f"bulk-{i:05d}" for i in range(n)], tags=("bulk",))
    vip = await stack.lock("vip-1")
    t1 = time.monotonic()
    f = await fleet(stack, {"tag": "bulk"}, action="locate", rate=60_000, ttl_s=900)
    assert f["total"] == n and f["counts"]["pending"] >= n - 500
    created_s = time.monotonic() - t1

    async def issuing() -> bool:
        return (await progress(stack, f["id"]))["issued"] >= 200

    await eventually(issuing, timeout=30, interval=0.02, what="the rollout under way")
    during = []
    for i in range(6):
        action = "unlock" if i % 2 == 0 else "lock"
        r = await stack.command("vip-1", action, wait=10)
        assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
        during.append((await progress(stack, f["id"]))["issued"])
    assert during[-1] < n, f"the rollout finished issuing before the unlocks: {during}"   # it was under way
    assert [a for _, a in vip.actuations] == ["unlock", "lock"] * 3

    r = await stack.http.post(f"/v1/fleet/commands/{f['id']}/cancel")
    assert r.status_code == 200

    async def stable() -> dict | None:   # the batch under way when it was cancelled has been recorded
        a = await progress(stack, f["id"])
        await asyncio.sleep(stack.settings.fleet_tick_s * 2)
        b = await progress(stack, f["id"])
        return b if a == b else None

    done = await stable_progress(stable)
    issued = done["issued"]
    assert done["counts"]["pending"] == n - issued and done["counts"]["queued"] == issued
    assert sum(done["counts"].values()) == n
    rows = await devices_of(stack, f["id"])
    assert len(rows) == n and [r["seq"] for r in rows] == list(range(n))
    assert sum(1 for r in rows if r["command_id"]) == issued
    assert len({r["command_id"] for r in rows if r["command_id"]}) == issued   # one command per device
    print(f"\n10,000 devices: fleet created in {created_s:.2f}s; {issued} issued "
          f"{time.monotonic() - t1:.1f}s after; issued as the 6 commands completed: {during}; "
          f"whole test {time.monotonic() - t0:.1f}s")


async def stable_progress(check) -> dict:  # type: ignore[no-untyped-def]
    return await eventually(check, timeout=20, interval=0.05, what="progress to stop changing")


async def test_a_rollout_gives_way_to_a_busy_event_loop() -> None:
    """give_way() (before each device command of a rollout) lets whatever else is queued on the loop run
    first; on an idle loop it returns after one pass."""
    import time

    from api.fleet.service import GIVE_WAY_MAX_S, give_way

    t0 = time.monotonic()
    await give_way()
    assert time.monotonic() - t0 < GIVE_WAY_MAX_S          # idle: no waiting to speak of
    ran = 0

    async def busy() -> None:   # other work on the loop: 20 ms of (simulated) CPU per step, 30 steps
        nonlocal ran
        for _ in range(30):
            time.sleep(0.02)   # blocks the loop on purpose: this is the load, not a wait
            ran += 1
            await asyncio.sleep(0)

    other = asyncio.ensure_future(busy())
    await asyncio.sleep(0)          # it has started
    before = ran
    await give_way()
    assert ran - before >= 2        # the queued work ran ahead of the rollout, more than one step
    await asyncio.wait_for(other, 10)

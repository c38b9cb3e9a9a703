"""Rides and rider rights: a rider commands only the bike they hold; every refusal says why."""

from __future__ import annotations

import asyncio

from device_sim.lock import Behaviour
from tests.support import LiveStack, eventually, make_settings


async def ride_status(user, ride_id: str) -> str:  # type: ignore[no-untyped-def]
    return (await user.http.get(f"/v1/rides/{ride_id}")).json()["status"]


async def test_ride_unlock_lock_ends_the_ride(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    lock = await stack.lock("bike-1")
    rider = await users()
    bikes = (await rider.http.get("/v1/bikes")).json()
    assert bikes == [{**bikes[0], "id": "bike-1", "online": True, "free": True, "yours": False, "locked": True,
                      "battery": 95}]
    r = await rider.http.post("/v1/rides", json={"bike_id": "bike-1"})
    assert r.status_code == 201, r.text
    ride = r.json()
    assert ride["status"] == "starting" and ride["unlock"]["action"] == "unlock"
    unlock = (await rider.http.get(f"/v1/commands/{ride['unlock_command_id']}", params={"wait": 5})).json()
    assert unlock["status"] == "succeeded"
    await eventually(lambda: _is(rider, ride["id"], "active"), what="ride active")
    assert lock.actuations == [(unlock["id"], "unlock")]
    bike = (await rider.http.get("/v1/bikes")).json()[0]
    assert (bike["free"], bike["yours"], bike["locked"]) == (False, True, False)
    # locate while riding, then lock: the lock's "locked" report ends the ride
    r = await rider.http.post("/v1/devices/bike-1/commands", params={"wait": 5}, json={"action": "locate"})
    assert r.status_code == 201 and r.json()["status"] == "succeeded"
    r = await rider.http.post("/v1/devices/bike-1/commands", params={"wait": 5}, json={"action": "lock"})
    assert r.json()["status"] == "succeeded"

    async def ended() -> dict | None:
        body = (await rider.http.get(f"/v1/rides/{ride['id']}")).json()
        return body if body["status"] == "ended" else None

    body = await eventually(ended, what="the ride to end on the lock's report")
    assert body["reason"] == "the bike was locked" and body["ended_at"]
    # the bike is free again, and the ex-rider may not command it any more
    r = await rider.http.post("/v1/devices/bike-1/commands", json={"action": "unlock"})
    assert r.status_code == 403 and "you do not hold bike-1" in r.json()["detail"]
    assert (await rider.http.get("/v1/bikes")).json()[0]["free"] is True


async def test_end_ride_locks_an_unlocked_bike(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    lock = await stack.lock("bike-2")
    rider = await users()
    ride = (await rider.http.post("/v1/rides", json={"bike_id": "bike-2"})).json()
    await eventually(lambda: _is(rider, ride["id"], "active"), what="ride active")
    r = await rider.http.post(f"/v1/rides/{ride['id']}/end")
    assert r.status_code == 200, r.text
    ended = r.json()
    assert ended["status"] == "ended" and ended["reason"] == "ended by the rider" and ended["end_command_id"]
    done = (await rider.http.get(f"/v1/commands/{ended['end_command_id']}", params={"wait": 5})).json()
    assert done["action"] == "lock" and done["status"] == "succeeded"
    assert [a for _, a in lock.actuations] == ["unlock", "lock"]
    r = await rider.http.post(f"/v1/rides/{ride['id']}/end")
    assert r.status_code == 409 and "already ended" in r.json()["detail"]


async def _is(user, ride_id: str, status: str) -> bool:  # type: ignore[no-untyped-def]
    return await ride_status(user, ride_id) == status


async def test_refusals_say_why(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    await stack.lock("bike-a")
    await stack.lock("bike-b")
    await stack.lock("bike-off", online=False)
    alice, bob = await users(), await users()
    ride = (await alice.http.post("/v1/rides", json={"bike_id": "bike-a"})).json()
    await eventually(lambda: _is(alice, ride["id"], "active"), what="alice's ride active")
    cases = [
        (bob.http.post("/v1/rides", json={"bike_id": "bike-a"}), 409, "in use by another rider"),
        (alice.http.post("/v1/rides", json={"bike_id": "bike-b"}), 409, "you already have an open ride"),
        (bob.http.post("/v1/rides", json={"bike_id": "bike-off"}), 409, "offline"),
        (bob.http.post("/v1/rides", json={"bike_id": "bike-nope"}), 404, "no bike"),
        (bob.http.post("/v1/devices/bike-a/commands", json={"action": "lock"}), 403, "you do not hold bike-a"),
        (alice.http.post("/v1/devices/bike-a/commands", json={"action": "reboot"}), 403, "is for operators"),
        (bob.http.get(f"/v1/rides/{ride['id']}"), 403, "not yours"),
        (bob.http.post(f"/v1/rides/{ride['id']}/end"), 403, "not yours"),
        (bob.http.get(f"/v1/commands/{ride['unlock_command_id']}"), 403, "not yours"),
        (bob.http.get("/v1/rides", params={"user_id": alice.id}), 403, "only their own rides"),
        (stack.http.post("/v1/rides", json={"bike_id": "bike-b"}), 403, "admin token has no rider account"),
        (bob.http.get("/v1/devices/bike-a"), 403, "operators only"),
    ]
    for call, code, why in cases:
        r = await call
        assert r.status_code == code and why in r.json()["detail"], (code, why, r.status_code, r.text)
    # each sees their own rides; an operator sees all and may end anyone's ride
    assert [x["id"] for x in (await alice.http.get("/v1/rides")).json()] == [ride["id"]]
    assert (await bob.http.get("/v1/rides")).json() == []
    assert [x["id"] for x in (await stack.http.get("/v1/rides")).json()] == [ride["id"]]
    assert [c["id"] for c in (await bob.http.get("/v1/commands")).json()] == []
    assert [c["id"] for c in (await alice.http.get("/v1/commands")).json()] == [ride["unlock_command_id"]]
    r = await stack.http.post(f"/v1/rides/{ride['id']}/end")
    assert r.status_code == 200 and r.json()["reason"] == "ended by operator admin"


async def test_failed_unlock_fails_the_ride_and_frees_the_bike(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    await stack.lock("bike-j", Behaviour(actuation_delay_s=0.01, jam_rate=1.0))
    rider = await users()
    ride = (await rider.http.post("/v1/rides", json={"bike_id": "bike-j"})).json()
    await eventually(lambda: _is(rider, ride["id"], "failed"), what="ride failed")
    body = (await rider.http.get(f"/v1/rides/{ride['id']}")).json()
    assert body["reason"] == "unlock failed: jammed"
    assert (await rider.http.get("/v1/bikes")).json()[0]["free"] is True
    r = await rider.http.post("/v1/devices/bike-j/commands", json={"action": "unlock"})
    assert r.status_code == 403


async def test_two_riders_racing_for_one_bike_one_wins(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    await stack.lock("bike-r")
    riders = [await users() for _ in range(4)]
    rs = await asyncio.gather(*(u.http.post("/v1/rides", json={"bike_id": "bike-r"}) for u in riders))
    assert sorted(r.status_code for r in rs) == [201, 409, 409, 409]


async def test_rate_limit_is_429_with_retry_after(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from latch.stack import Stack
    from tests.api.push_support import sign_up
    from tests.support import LiveStack

    async with Stack(make_settings(tmp_path, command_burst=3, command_rate_per_s=0.5)) as st:
        async with httpx.AsyncClient(base_url=st.api_url, headers={
                "Authorization": f"Bearer {st.settings.admin_token}"}) as http:
            live = LiveStack(st, http)
            clients: list[httpx.AsyncClient] = []
            try:
                rider = await sign_up(live, clients=clients)
                codes = []
                for _ in range(4):
                    r = await rider.http.post("/v1/devices/bike-x/commands", json={"action": "locate"})
                    codes.append(r.status_code)
                assert codes == [403, 403, 403, 429]
                assert r.headers["retry-after"] == "2" and "too many commands" in r.json()["detail"]
                # the admin token (automation) is not limited
                for _ in range(5):
                    assert (await http.post("/v1/devices/bike-x/commands",
                                            json={"action": "locate"})).status_code == 404
            finally:
                for c in clients:
                    await c.aclose()

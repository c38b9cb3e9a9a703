"""GET /v1/bikes/nearby (api/riders/nearby_routes.py): free bikes nearest first, your own bike on top, taken and
offline bikes left out, pages that reach every bike, a clear 422 for a point off the globe. Positions
are what the locks report (`pos`, foundation/geo.py)."""

from __future__ import annotations

from foundation.geo import distance_m, parse_area, seeded_position
from tests.support import LiveStack, eventually


async def test_nearest_first_paged_and_yours_on_top(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    ids = [f"bike-{i}" for i in range(1, 6)]
    for i in ids:
        await stack.lock(i)
    # each lock's ack carries its reported state, position included: one locate each puts them on the map
    for i in ids:
        assert (await stack.command(i, "locate")).json()["status"] == "succeeded"
    area = parse_area(stack.settings.sim_area)
    where = {i: seeded_position(i, area) for i in ids}
    rider, other = await users(), await users()

    async def placed() -> dict | None:
        page = (await rider.http.get("/v1/bikes/nearby", params={"limit": 10})).json()
        return page if all(b["pos"] for b in page["bikes"]) else None
    page = await eventually(placed, timeout=10, interval=0.1, what="positions reported")
    assert page["total"] == 5 and page["area"] == list(area) and page["origin"] == list(area[:2])
    assert {b["id"]: b["pos"] for b in page["bikes"]} == where

    here = where["bike-4"]
    page = (await rider.http.get("/v1/bikes/nearby", params={"lat": here[0], "lon": here[1], "limit": 2})).json()
    want = sorted(ids, key=lambda i: distance_m(tuple(here), tuple(where[i])))  # type: ignore[arg-type]
    assert [b["id"] for b in page["bikes"]] == want[:2] and page["bikes"][0]["distance_m"] == 0
    rest = (await rider.http.get("/v1/bikes/nearby", params={"lat": here[0], "lon": here[1], "limit": 2,
                                                             "offset": 2})).json()
    last = (await rider.http.get("/v1/bikes/nearby", params={"lat": here[0], "lon": here[1], "limit": 2,
                                                             "offset": 4})).json()
    assert [b["id"] for b in rest["bikes"] + last["bikes"]] == want[2:]

    # someone else takes the nearest: it leaves everyone's list but theirs, where it comes first
    assert (await other.http.post("/v1/rides", json={"bike_id": want[-1]})).status_code == 201
    mine = (await other.http.get("/v1/bikes/nearby", params={"lat": here[0], "lon": here[1]})).json()
    assert mine["bikes"][0]["id"] == want[-1] and mine["bikes"][0]["yours"] is True and mine["total"] == 5
    theirs = (await rider.http.get("/v1/bikes/nearby", params={"lat": here[0], "lon": here[1]})).json()
    assert want[-1] not in [b["id"] for b in theirs["bikes"]] and theirs["total"] == 4
    # an offline lock is not offered
    await stack.locks[0].stop()
    await stack.wait_presence("bike-1", False)
    theirs = (await rider.http.get("/v1/bikes/nearby")).json()
    assert "bike-1" not in [b["id"] for b in theirs["bikes"]]


async def test_a_point_off_the_globe_is_a_clear_422(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider = await users()
    r = await rider.http.get("/v1/bikes/nearby", params={"lat": 91, "lon": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "lat"]
    assert (await rider.http.get("/v1/bikes/nearby", params={"limit": 0})).status_code == 422
    assert (await rider.http.get("/v1/bikes/nearby")).json() == {
        "origin": list(parse_area(stack.settings.sim_area)[:2]), "area": list(parse_area(stack.settings.sim_area)),
        "total": 0, "offset": 0, "bikes": []}

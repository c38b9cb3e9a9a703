"""The HTTP surface: auth, validation, 404s, registration."""

from __future__ import annotations

import httpx

from tests.support import LiveStack


async def test_no_anonymous_access(stack: LiveStack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        r = await anon.get("/v1/devices")
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        r = await anon.get("/v1/devices", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await anon.get("/healthz")).status_code == 200


async def test_registration_returns_secrets_once(stack: LiveStack) -> None:
    creds = await stack.register("bike-r")
    assert creds["mqtt_username"] == "bike-r" and len(creds["mqtt_password"]) >= 40
    assert len(bytes.fromhex(creds["command_key"])) == 32
    again = await stack.http.post("/v1/devices", json={"id": "bike-r"})
    assert again.status_code == 409
    listed = (await stack.http.get("/v1/devices/bike-r")).json()
    assert "mqtt_password" not in listed and "command_key" not in listed
    rotated = (await stack.http.post("/v1/devices/bike-r/credentials")).json()
    assert rotated["mqtt_password"] != creds["mqtt_password"]


async def test_invalid_bodies_get_422_naming_the_field(stack: LiveStack) -> None:
    r = await stack.http.post("/v1/devices", json={"id": "bad/id"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "id"]
    await stack.register("bike-v")
    r = await stack.http.post("/v1/devices/bike-v/commands", json={"action": "explode"})
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "action"] and "unlock, lock, locate, report, reboot" in detail["msg"]
    r = await stack.http.post("/v1/devices/bike-v/commands", json={"action": "unlock", "ttl_s": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "ttl_s"]
    r = await stack.http.post("/v1/devices/bike-v/commands", content=b"{not json",
                              headers={"Content-Type": "application/json"})
    assert r.status_code == 422


async def test_unknown_device_and_command_are_404(stack: LiveStack) -> None:
    assert (await stack.http.post("/v1/devices/ghost/commands", json={"action": "unlock"})).status_code == 404
    assert (await stack.http.get("/v1/devices/ghost")).status_code == 404
    assert (await stack.http.get("/v1/commands/nope")).status_code == 404
    assert (await stack.http.get("/v1/devices/ghost/commands")).status_code == 404


async def test_cancel_only_while_queued_and_command_listing(stack: LiveStack) -> None:
    await stack.lock("bike-c", online=False)
    queued = (await stack.command("bike-c", "report", wait=0)).json()
    r = await stack.http.post(f"/v1/commands/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await stack.http.post(f"/v1/commands/{queued['id']}/cancel")
    assert r.status_code == 409
    listed = (await stack.http.get("/v1/devices/bike-c/commands")).json()
    assert [c["id"] for c in listed] == [queued["id"]]


async def test_the_openapi_document_renders_and_names_every_route(stack) -> None:  # type: ignore[no-untyped-def]
    r = await stack.http.get("/openapi.json")
    assert r.status_code == 200, r.text
    paths = r.json()["paths"]
    for p in ("/v1/devices/{device_id}/commands", "/v1/events/stream", "/v1/fleet/commands",
              "/v1/broker/emqx/authn", "/v1/broker/vernemq"):
        assert p in paths, p
    assert "text/event-stream" in paths["/v1/events/stream"]["get"]["responses"]["200"]["content"]
    assert (await stack.http.get("/docs")).status_code == 200

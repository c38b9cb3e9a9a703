"""Bad input gets a clear 4xx and loses nothing (issue 12, defects 1-5): command params a lock can carry,
strict JSON bodies, bounded bodies and offsets, 422s that do not echo secrets."""

from __future__ import annotations

import json

import httpx
import pytest

from protocol import messages
from tests.support import LiveStack

RAW_JSON = {"Content-Type": "application/json"}


async def _command_rows(stack: LiveStack, device_id: str) -> list[dict]:
    r = await stack.http.get(f"/v1/devices/{device_id}/commands")
    assert r.status_code == 200, r.text
    return r.json()


async def test_params_over_what_a_lock_reads_are_refused_before_anything_is_written(stack: LiveStack) -> None:
    await stack.lock("bike-big")
    # under the body limit, over the 4 KiB a lock reads: refused with the reason, nothing written
    r = await stack.command("bike-big", "locate", params={"x": "a" * 5000})
    assert r.status_code == 413, r.text
    assert f"at most {messages.MAX_PAYLOAD}" in r.json()["detail"]
    assert await _command_rows(stack, "bike-big") == []
    # the 1.1 MB params: refused by the body limit before it is read
    r = await stack.command("bike-big", "locate", params={"x": "a" * 1_100_000})
    assert r.status_code == 413 and "LATCH_MAX_BODY_BYTES" in r.json()["detail"]
    assert await _command_rows(stack, "bike-big") == []
    # the shared broker link is untouched: the next unlock works
    assert stack.runtime.link.is_connected
    r = await stack.command("bike-big", "unlock")
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text


@pytest.mark.parametrize("raw_params", [
    '{"volume": 0.5}', '{"v": NaN}', '{"v": Infinity}', '{"v": -Infinity}', '{"v": 1e400}',
    '{"v": "\\ud800"}', '{"v": "a\\u0000b"}', '{"v": 9007199254740993}',
    "{\"v\": " + "[" * 900 + "]" * 900 + "}", "{\"v\": " + "[" * 9 + "]" * 9 + "}",
])
async def test_unsignable_params_get_422_and_nothing_is_written(stack: LiveStack, raw_params: str) -> None:
    await stack.register("bike-p")
    body = '{"action": "locate", "params": %s}' % raw_params
    r = await stack.http.post("/v1/devices/bike-p/commands", content=body.encode(), headers=RAW_JSON)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    assert await _command_rows(stack, "bike-p") == []
    for path in ("/v1/commands", "/v1/devices/bike-p/commands"):   # no list is poisoned
        assert (await stack.http.get(path)).status_code == 200


async def test_signable_params_are_sent_and_read_back(stack: LiveStack) -> None:
    await stack.lock("bike-ok")
    params = {"tune": "ünïcødé ✓", "n": -(2**53 - 1), "flags": [True, False, None], "deep": {"a": {"b": [1, 2]}}}
    r = await stack.command("bike-ok", "locate", params=params)
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    assert r.json()["params"] == params
    got = (await stack.http.get(f"/v1/commands/{r.json()['id']}")).json()
    assert got["params"] == params


async def test_offsets_are_bounded_on_every_list(stack: LiveStack) -> None:
    await stack.register("bike-o")
    for path in ("/v1/rides", "/v1/commands", "/v1/devices", "/v1/users", "/v1/fleet/commands",
                 "/v1/devices/bike-o/commands"):
        r = await stack.http.get(path, params={"offset": 2**63})
        assert r.status_code == 422, (path, r.text)
        assert (await stack.http.get(path, params={"offset": 100_000})).status_code == 200, path


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/rides", '{"bike_id": "\\ud800"}'),
    ("/v1/devices", '{"id": "bike-s", "name": "\\ud800"}'),
    ("/v1/devices", '{"id": "bike-s", "name": "a\\u0000"}'),
    ("/v1/devices", '{"id": "bike-s", "name": NaN}'),
    ("/v1/devices/bike-x/commands", '{"action": "unlock", "ttl_s": NaN}'),
    ("/v1/auth/login", '{"email": NaN, "password": "x"}'),
])
async def test_bodies_that_are_not_strict_json_get_422(stack: LiveStack, path: str, body: str) -> None:
    r = await stack.http.post(path, content=body.encode(), headers=RAW_JSON)
    assert r.status_code == 422, r.text
    assert "strict JSON" in r.json()["detail"][0]["msg"]
    assert (await stack.http.get("/v1/devices")).json() == []


async def test_body_limit_is_enforced_before_parsing(stack: LiveStack) -> None:
    limit = stack.settings.max_body_bytes
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        big = json.dumps({"email": "a@example.org", "password": "p" * limit})
        r = await anon.post("/v1/auth/login", content=big.encode(), headers=RAW_JSON)
        assert r.status_code == 413 and str(limit) in r.json()["detail"]

        async def chunks():   # no Content-Length: refused as soon as it passes the limit
            for _ in range(limit // 1024 + 2):
                yield b" " * 1024

        r = await anon.post("/v1/auth/login", content=chunks(), headers=RAW_JSON)
        assert r.status_code == 413


async def test_422_never_echoes_secrets_or_long_input(stack: LiveStack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        r = await anon.post("/v1/auth/login", json={"email": "x" * 5000, "password": ["hunter2"]})
    assert r.status_code == 422
    text = r.text
    assert "hunter2" not in text
    assert "x" * 100 not in text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert ["body", "password"] in locs


async def test_ws_command_frame_with_bad_params_gets_a_reply_and_the_socket_stays(stack: LiveStack) -> None:
    from websockets.asyncio.client import connect

    await stack.lock("bike-w")
    url = stack.api_url.replace("http://", "ws://") + "/v1/ws"
    async with connect(url, additional_headers={"Authorization": f"Bearer {stack.admin_token}"}) as ws:
        for i, params in enumerate(['{"x": 0.5}', '{"x": "\\ud800"}', '{"x": "%s"}' % ("a" * 5000)]):
            await ws.send('{"type": "command", "request_id": "r%d", "device_id": "bike-w", "action": "locate", '
                          '"params": %s}' % (i, params))
            reply = json.loads(await ws.recv())
            assert reply.get("ok") is not True, reply
            assert reply.get("status") in (413, 422) or reply["type"] == "error", reply
        await ws.send(json.dumps({"type": "ping", "request_id": "p"}))
        assert json.loads(await ws.recv())["type"] == "pong"
    assert await _command_rows(stack, "bike-w") == []

"""X-Request-ID: a sane one from the client is kept, anything else replaced, and every response carries it
(a 200, a 404, a 401, BodyGuard's 413, a WebSocket handshake); a real uvicorn behind live_stack."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import websockets

from tests.support import live_stack

GENERATED = re.compile(r"[0-9a-f]{32}")


async def test_request_id_is_kept_when_sane_and_made_otherwise(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as live:
        r = await live.http.get("/healthz", headers={"X-Request-ID": "edge-7f3a.1:x_y"})
        assert r.headers["x-request-id"] == "edge-7f3a.1:x_y"
        for bad in ("", "a" * 129, "has space", "new\\nline", "<script>", "ünï"):
            r = await live.http.get("/healthz", headers={"X-Request-ID": bad.encode("utf-8")})
            assert GENERATED.fullmatch(r.headers["x-request-id"]), (bad, r.headers["x-request-id"])
        first = (await live.http.get("/v1/devices")).headers["x-request-id"]
        second = (await live.http.get("/v1/devices")).headers["x-request-id"]
        assert GENERATED.fullmatch(first) and first != second
        assert (await live.http.get("/v1/devices/nope",
                                    headers={"X-Request-ID": "r404"})).headers["x-request-id"] == "r404"
        async with httpx.AsyncClient(base_url=live.api_url) as anon:
            r = await anon.get("/v1/devices", headers={"X-Request-ID": "r401"})
            assert r.status_code == 401 and r.headers["x-request-id"] == "r401"
            r = await anon.post("/v1/devices", content=b"x" * (live.settings.max_body_bytes + 1),
                                headers={"X-Request-ID": "r413", "Content-Type": "application/json"})
            assert r.status_code == 413 and r.headers["x-request-id"] == "r413"
            assert len(r.headers.get_list("x-request-id")) == 1
        token = (await live.http.post("/v1/auth/stream-token")).json()["token"]
        ws_url = live.api_url.replace("http://", "ws://") + f"/v1/ws?token={token}"
        async with websockets.connect(ws_url, additional_headers={"X-Request-ID": "rws"},
                                      origin=live.api_url) as ws:
            assert ws.response.headers["x-request-id"] == "rws"

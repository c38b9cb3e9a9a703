"""Pages and sockets a browser reaches (issue 12, defects 12 and 13): security headers, /docs served
offline, WebSocket Origin check, a cap on open event streams per user."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.api.push_support import sign_up
from tests.support import LiveStack, live_stack


async def test_pages_and_api_send_security_headers(stack: LiveStack) -> None:
    for path in ("/", "/ops", "/docs", "/v1/devices", "/healthz"):
        r = await stack.http.get(path)
        assert r.status_code == 200, path
        h = r.headers
        assert h["x-content-type-options"] == "nosniff", path
        assert h["x-frame-options"] == "DENY", path
        csp = h["content-security-policy"]
        assert "frame-ancestors 'none'" in csp, path
        if path in ("/", "/ops", "/docs"):
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        else:
            assert csp.startswith("default-src 'none'")


async def test_docs_load_their_assets_from_latch_not_a_cdn(stack: LiveStack) -> None:
    page = (await stack.http.get("/docs")).text
    assert "cdn." not in page and "https://" not in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs-assets/{asset}" in page
        r = await stack.http.get(f"/docs-assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000


async def test_websocket_refuses_a_foreign_origin(stack: LiveStack) -> None:
    url = stack.api_url.replace("http://", "ws://") + "/v1/ws"
    auth = {"Authorization": f"Bearer {stack.admin_token}"}
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers=auth, origin="https://evil.example"):   # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    host = stack.api_url.removeprefix("http://")
    async with connect(url, additional_headers=auth, origin=f"http://{host}") as ws:   # type: ignore[arg-type]
        await ws.send('{"type": "ping"}')
        assert "pong" in await ws.recv()
    async with connect(url, additional_headers=auth) as ws:   # no Origin: not a browser
        await ws.send('{"type": "ping"}')
        assert "pong" in await ws.recv()


async def test_open_event_streams_per_user_are_capped(tmp_path: Path) -> None:
    async with live_stack(tmp_path, max_streams_per_user=2) as live:
        http = live.http
        rider = await sign_up(live)
        try:
            async with contextlib.AsyncExitStack() as held:
                for _ in range(2):
                    r = await held.enter_async_context(rider.http.stream("GET", "/v1/events/stream"))
                    assert r.status_code == 200
                r = await rider.http.get("/v1/events/stream")
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert "LATCH_MAX_STREAMS_PER_USER" in r.json()["detail"]
                r = await rider.http.get("/v1/events", params={"wait": 1})   # a held long poll is a stream too
                assert r.status_code == 429
                # the admin token (automation) is not capped
                async with http.stream("GET", "/v1/events/stream") as r:
                    assert r.status_code == 200

            async def freed() -> bool:   # closing streams frees their slots
                return (await rider.http.get("/v1/events", params={"wait": 0})).status_code == 200
            from tests.support import eventually
            await eventually(freed, what="stream slots freed")
        finally:
            await rider.http.aclose()

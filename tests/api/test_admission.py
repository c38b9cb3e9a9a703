"""Admission control (issue 13, goal 4): an overloaded API refuses new commands at once with 503 and
Retry-After, before anything is written, and keeps finishing the ones it accepted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from api.admission import StandingDelay
from tests.support import live_stack


def test_standing_delay_is_the_shortest_wait_of_the_last_window() -> None:
    now = [0.0]
    d = StandingDelay(window_s=0.5, clock=lambda: now[0])
    for wait in (0.3, 0.2, 0.4):          # a window in which every write waited: a standing queue
        d.observe(wait)
        now[0] += 0.1
    now[0] = 0.5
    d.observe(0.25)                        # rolls the window
    assert d.standing_s() == 0.2
    for wait in (0.3, 0.0, 0.3):           # one write that did not wait: the queue drained in this window
        now[0] += 0.1
        d.observe(wait)
    now[0] = 1.0
    d.observe(0.3)
    assert d.standing_s() == 0.0
    now[0] = 5.0                           # no writes for a while: nothing is queued
    assert d.standing_s() == 0.0


async def test_an_overloaded_api_refuses_new_commands_at_once_and_writes_nothing(tmp_path: Path) -> None:
    async with live_stack(tmp_path, admit_max_creating=1) as live:
        await live.lock("bike-a")
        # one command being created holds the only slot (held here as a slow create would: blocking the
        # database writer itself is driver-specific, and the async drivers share the event loop with it)
        with live.runtime.admission.creating_one():
            refused = await live.command("bike-a", "unlock", wait=10)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["detail"]
            ws_url = live.api_url.replace("http://", "ws://") + "/v1/ws"
            from websockets.asyncio.client import connect
            async with connect(ws_url, additional_headers={"Authorization": f"Bearer {live.admin_token}"}) as ws:
                await ws.send(json.dumps({"type": "command", "request_id": "r", "device_id": "bike-a",
                                          "action": "unlock"}))
                reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert reply["status"] == 503 and reply["ok"] is False, reply
        assert (await live.http.get("/v1/devices/bike-a/commands")).json() == []   # nothing was written
        assert live.runtime.admission.refused == 2
        accepted = await live.command("bike-a", "unlock", wait=10)
        assert accepted.status_code == 201 and accepted.json()["status"] == "succeeded", accepted.text

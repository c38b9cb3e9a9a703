"""Admission control (issue 13, goal 4): an overloaded API refuses new commands at once with 503 and
Retry-After, before anything is written, and keeps finishing the ones it accepted."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path


from api.admission import StandingDelay
from tests.support import eventually, live_stack


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
        http = live.http
        lock = await live.lock("bike-a")
        try:
            release = threading.Event()
            blocked = asyncio.ensure_future(live.runtime.db.write(lambda s: release.wait(30)))   # the writer is busy
            first = asyncio.ensure_future(live.command("bike-a", "unlock", wait=10))
            await eventually(lambda: live.runtime.admission.creating == 1, what="the first command admitted")
            refused = await live.command("bike-a", "unlock", wait=10)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["detail"]
            release.set()
            await blocked
            accepted = await first
            assert accepted.status_code == 201 and accepted.json()["status"] == "succeeded", accepted.text
            listed = (await http.get("/v1/devices/bike-a/commands")).json()
            assert [c["id"] for c in listed] == [accepted.json()["id"]]   # the refused one left no row
            assert (await live.command("bike-a", "lock")).json()["status"] == "succeeded"
        finally:
            await lock.stop()

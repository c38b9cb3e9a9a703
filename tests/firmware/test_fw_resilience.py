"""The firmware process against `latch serve` in its own process: killed and restarted,
frozen with SIGSTOP and thawed. The device must notice on its own and recover."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.firmware.fwsupport import FirmwareProcess, ServeProcess, device_config
from tests.support import eventually

DEV = "bike-0001"


@pytest.fixture
async def serve(tmp_path):
    s = ServeProcess(tmp_path / "serve")
    await s.start()
    async with httpx.AsyncClient(base_url=s.api_url, timeout=30,
                                 headers={"Authorization": f"Bearer {s.admin_token}"}) as http:
        s.http = http
        try:
            yield s
        finally:
            s.kill()


async def online(serve, device_id=DEV):
    async def check():
        try:
            r = await serve.http.get(f"/v1/devices/{device_id}", timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json()["online"] is True
    await eventually(check, timeout=30, interval=0.1, what=f"{device_id} online")


async def unlock(serve, action="unlock"):
    r = await serve.http.post(f"/v1/devices/{DEV}/commands", params={"wait": 10}, json={"action": action})
    return r.json()


@pytest.fixture
async def device(serve, micropython, tmp_path):
    r = await serve.http.post("/v1/devices", json={"id": DEV})
    assert r.status_code == 201, r.text
    cfg = device_config(r.json(), serve.host, serve.mqtt_port, tmp_path / DEV, keepalive_s=2)
    fw = FirmwareProcess(micropython, tmp_path / DEV, cfg)
    await fw.start()
    try:
        await fw.wait_line("clock synchronised", timeout=20)
        await online(serve)
        yield fw
    finally:
        await fw.stop()


async def test_broker_killed_and_restarted(serve, device):
    fw = device
    assert (await unlock(serve))["status"] == "succeeded", fw.output()
    serve.kill()
    mark = len(fw.lines)
    await fw.wait_line(r"link down", after=mark, timeout=15)
    await serve.start()
    # whether the restarted broker kept the session or not (then the device subscribes again,
    # see test_fw_mqtt.py for that on the wire), the next command must get through
    await fw.wait_line(r"connected session_present=(0, subscribed|1)$", after=mark, timeout=30)
    await fw.wait_line(r"clock synchronised", after=mark, timeout=15)
    await online(serve)
    body = await unlock(serve, "lock")
    assert body["status"] == "succeeded", str(body) + "\n" + fw.output()
    assert fw.motor_runs() == 2


async def test_broker_frozen_then_thawed(serve, device):
    fw = device
    assert (await unlock(serve))["status"] == "succeeded", fw.output()
    mark = len(fw.lines)
    t0 = time.monotonic()
    serve.freeze()
    try:
        # the TCP connection stays open; only the device's own receive timeout can tell
        await fw.wait_line(r"link down: .*receive timeout", after=mark, timeout=20)
        noticed = time.monotonic() - t0
    finally:
        serve.thaw()
    assert noticed < 2 * 2 + 2, noticed  # keepalive 2 s: noticed within about that
    # the broker kept the session (and our subscription) through the freeze
    await fw.wait_line(r"connected session_present=1$", after=mark, timeout=40)
    await fw.wait_line(r"clock synchronised", after=mark, timeout=40)
    await online(serve)
    body = await unlock(serve, "lock")
    assert body["status"] == "succeeded", str(body) + "\n" + fw.output()
    assert fw.motor_runs() == 2

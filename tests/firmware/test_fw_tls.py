"""The firmware over TLS to Latch's broker: verified against the provisioned CA (DER), with the
broker's name checked; a wrong CA or a wrong name never gets a connection."""
from __future__ import annotations

import base64

import httpx
import pytest

from latch.stack import Stack
from tests.firmware.fwsupport import FirmwareProcess, ScratchCA, device_config, free_port, need_module
from tests.support import LiveStack, make_settings

DEV = "bike-0001"


@pytest.fixture
def ca():
    need_module("cryptography")
    return ScratchCA()


@pytest.fixture
async def tls_stack(tmp_path, ca):
    cert, key = ca.issue(tmp_path / "tls", hostnames=("broker.latch.test", "localhost"))
    # a free port: the broker reads tls_port=0 as "the default, 8883"
    settings = make_settings(tmp_path, tls_cert=cert, tls_key=key, tls_port=free_port())
    async with Stack(settings) as st:
        async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {settings.admin_token}"}) as http:
            live = LiveStack(st, http)
            live.tls_port = st.broker.ports["tls"]
            try:
                yield live
            finally:
                for fw in live.locks:
                    await fw.stop()


async def run_device(stack, micropython, tmp_path, ca_der: bytes, server_hostname: str, device_id=DEV):
    reg = await stack.register(device_id)
    cfg = device_config(reg, "127.0.0.1", stack.tls_port, tmp_path / device_id,
                        broker={"tls": True, "ca_der": base64.b64encode(ca_der).decode(),
                                "server_hostname": server_hostname})
    fw = FirmwareProcess(micropython, tmp_path / device_id, cfg)
    await fw.start()
    stack.locks.append(fw)
    return fw


async def test_unlock_over_tls(tls_stack, micropython, tmp_path, ca):
    fw = await run_device(tls_stack, micropython, tmp_path, ca.der(), "broker.latch.test")
    await fw.wait_line("clock synchronised", timeout=30)
    await tls_stack.wait_presence(DEV, True)
    r = await tls_stack.command(DEV, "unlock", wait=10)
    assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
    assert fw.motor_runs() == 1


async def test_wrong_ca_is_rejected(tls_stack, micropython, tmp_path, ca):
    fw = await run_device(tls_stack, micropython, tmp_path, ScratchCA("Somebody Else's CA").der(), "broker.latch.test")
    await fw.wait_line(r"link down: .*not correctly signed by the trusted CA", timeout=20)
    await fw.wait_line(r"reconnect in", timeout=10)
    assert fw.count("connected session_present") == 0
    r = await tls_stack.http.get(f"/v1/devices/{DEV}")
    assert r.json()["online"] is False


async def test_wrong_hostname_is_rejected(tls_stack, micropython, tmp_path, ca):
    fw = await run_device(tls_stack, micropython, tmp_path, ca.der(), "evil.example.com")
    await fw.wait_line(r"link down: .*(CN|name)", timeout=20)
    await fw.wait_line(r"reconnect in", timeout=10)
    assert fw.count("connected session_present") == 0

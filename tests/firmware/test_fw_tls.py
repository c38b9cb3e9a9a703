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
async def tls_stack(tmp_path, ca, request):
    # the names in the broker's certificate (indirect parametrization), and its IP 127.0.0.1
    names = getattr(request, "param", ("broker.latch.test", "localhost"))
    cert, key = ca.issue(tmp_path / "tls", hostnames=names)
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


async def run_device(stack, micropython, tmp_path, ca_der: bytes, server_hostname: str | None, device_id=DEV,
                     hosts=None):
    reg = await stack.register(device_id)
    cfg = device_config(reg, "127.0.0.1", stack.tls_port, tmp_path / device_id,
                        broker={"tls": True, "ca_der": base64.b64encode(ca_der).decode(),
                                "server_hostname": server_hostname})
    if hosts is not None:  # a clustered broker's nodes (issue 18)
        del cfg["broker"]["host"], cfg["broker"]["port"]
        cfg["broker"]["hosts"] = hosts
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


@pytest.mark.parametrize("tls_stack", [("broker.latch.test",)], indirect=True)  # no "localhost" in it
async def test_several_nodes_each_checked_by_its_own_name(tls_stack, micropython, tmp_path, ca):
    """No server_hostname configured: each node's certificate is checked against that node's own host. The
    first node is named "localhost", which its certificate does not list: refused; the next, 127.0.0.1 (an IP
    the certificate lists), is taken, so the name the lock checks moved with it."""
    port = tls_stack.tls_port
    fw = await run_device(tls_stack, micropython, tmp_path, ca.der(), None,
                          hosts=[["localhost", port], ["127.0.0.1", port]])
    await fw.wait_line("clock synchronised", timeout=30)
    await fw.wait_line(r"link down: .*(CN|name)", timeout=5)          # localhost: refused by its name
    await fw.wait_line(r"connected session_present", timeout=30)
    # the connection that was made is the one to 127.0.0.1, the node whose name the certificate lists
    first_connected = next(i for i, line in enumerate(fw.lines) if "connected session_present" in line)
    tried = [line for line in fw.lines[:first_connected] if "connecting to" in line]
    assert tried and f"connecting to 127.0.0.1:{port}" in tried[-1], fw.output()
    assert fw.count(r"connecting to localhost:%d" % port) >= 1, fw.output()
    await tls_stack.wait_presence(DEV, True)
    r = await tls_stack.command(DEV, "unlock", wait=10)
    assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()


async def test_several_nodes_one_configured_name(tls_stack, micropython, tmp_path, ca):
    """server_hostname configured: the one name checked on every node (a cluster's shared certificate)."""
    dead = free_port()
    fw = await run_device(tls_stack, micropython, tmp_path, ca.der(), "broker.latch.test",
                          hosts=[["127.0.0.1", dead], ["127.0.0.1", tls_stack.tls_port]])
    await fw.wait_line("clock synchronised", timeout=30)
    assert fw.count(r"connecting to 127\.0\.0\.1:%d" % dead) == 1
    await tls_stack.wait_presence(DEV, True)
    r = await tls_stack.command(DEV, "unlock", wait=10)
    assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
    # and a wrong one is wrong on every node
    fw2 = await run_device(tls_stack, micropython, tmp_path, ca.der(), "evil.example.com", device_id="bike-0002",
                           hosts=[["127.0.0.1", dead], ["127.0.0.1", tls_stack.tls_port]])
    await fw2.wait_line(r"link down: .*(CN|name)", timeout=20)
    mark = len(fw2.lines)
    await fw2.wait_line(r"connecting to 127\.0\.0\.1:%d" % dead, after=mark, timeout=10)  # round again
    assert fw2.count("connected session_present") == 0

"""`--broker mqtts://HOST:PORT`: the API's link and the simulated locks (in-process and `latch sim`) reach
Mosquitto over TLS, verifying its certificate against LATCH_BROKER_CA (default: the system's trust store)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from broker.identity import SERVICE_USERNAME
from device_sim.lock import Behaviour, Credentials, SimulatedLock
from foundation.settings import broker_tls_context
from mqtt_client import MqttClient, MqttConnectError
from tests.broker.test_listeners import CA, x509
from tests.external.mosquitto import Mosquitto, Tls, require_mosquitto
from tests.external.support import api_before_mosquitto
from tests.latch.test_cli import read_until, running
from tests.support import require

pytestmark = pytest.mark.timeout(120)


def _pki(tmp_path: Path) -> tuple[CA, Tls]:
    require_mosquitto()
    require(x509 is not None, "the cryptography package (to make test certificates)")
    ca = CA(tmp_path / "pki", "Latch Test CA")
    cert, key = ca.issue("broker", server=True)
    return ca, Tls(cert, key)


def _tls_url(mq: Mosquitto) -> str:
    return f"mqtts://127.0.0.1:{mq.tls_port}"


def _came_over_tls(mq: Mosquitto, client_id: str) -> bool:
    """Mosquitto logs "New connection from ADDR on port P" and then "New client connected from ADDR as ID"."""
    connected = mq.find(rf"New client connected from (\S+) as {re.escape(client_id)} ")
    if connected is None:
        return False
    addr = re.search(r"connected from (\S+) as", mq.lines[connected]).group(1)  # type: ignore[union-attr]
    return mq.find(rf"New connection from {re.escape(addr)} on port {mq.tls_port}\.") is not None


async def test_mqtts_the_api_and_a_lock_unlock_through_mosquitto_over_tls(tmp_path: Path) -> None:
    ca, tls = _pki(tmp_path)
    async with api_before_mosquitto(tmp_path, tls=tls, broker_url=_tls_url, broker_ca=ca.path) as (live, mq):
        assert live.settings.broker == _tls_url(mq)
        assert _came_over_tls(mq, SERVICE_USERNAME), mq.log()

        creds = Credentials.from_registration(await live.register("bike-tls"))
        lock = SimulatedLock(creds, Behaviour(actuation_delay_s=0.01))
        live.locks.append(lock)
        await lock.start("127.0.0.1", mq.tls_port, tls=live.settings.broker_tls())   # type: ignore[arg-type]
        await live.wait_presence("bike-tls", True)
        assert _came_over_tls(mq, "bike-tls"), mq.log()
        r = await live.command("bike-tls", "unlock")
        assert r.json()["status"] == "succeeded", r.text

        # without the test CA (the system's trust store only) the broker's certificate is refused
        untrusted = MqttClient("bike-tls-2", username="bike-tls", password=creds.mqtt_password, clean_session=True)
        with pytest.raises(MqttConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await untrusted.connect("127.0.0.1", mq.tls_port, tls=broker_tls_context(_tls_url(mq)))  # type: ignore[arg-type]


async def test_latch_sim_with_an_mqtts_broker(tmp_path: Path) -> None:
    ca, tls = _pki(tmp_path)
    async with api_before_mosquitto(tmp_path, tls=tls, broker_url=_tls_url, broker_ca=ca.path) as (live, mq):
        async with running("sim", "--devices", "2", "--prefix", "tls-", "--broker", _tls_url(mq), "--api", live.api_url,
                           "--token", live.admin_token or "", "--data-dir", str(tmp_path / "sim"),
                           env={"LATCH_BROKER_CA": str(ca.path)}) as sim:
            await read_until(sim, r"2 simulated locks online \(tls-0001\.\.tls-0002\) on 127\.0\.0\.1:\d+ \(TLS\)")
            assert _came_over_tls(mq, "tls-0002"), mq.log()
            await live.wait_presence("tls-0002", True)
            r = await live.command("tls-0002", "unlock")
            assert r.json()["status"] == "succeeded", r.text
        assert not os.environ.get("LATCH_BROKER_CA")   # the CA came from the sim's environment only


async def test_serve_with_an_external_mqtts_broker_runs_its_demo_fleet_there(tmp_path: Path) -> None:
    """`latch serve --broker mqtts://… --demo-fleet N`: the demo locks are registered through the API's
    own registry (so Mosquitto's password file gains them and is reloaded) and connect over TLS."""
    ca, tls = _pki(tmp_path)
    async with api_before_mosquitto(tmp_path, tls=tls, broker_url=_tls_url, broker_ca=ca.path,
                                    demo_fleet=3) as (live, mq):
        for device_id in ("bike-0001", "bike-0002", "bike-0003"):
            await live.wait_presence(device_id, True)
            assert _came_over_tls(mq, device_id), mq.log()
        r = await live.command("bike-0002", "unlock")
        assert r.json()["status"] == "succeeded", r.text
        assert [a for _, a in live.stack.fleet.locks["bike-0002"].actuations] == ["unlock"]   # type: ignore[union-attr]

"""`DELETE /v1/devices/{id}` on Latch's own broker, and `--broker` URLs (mqtt://, mqtts://)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from foundation.settings import Settings, broker_tls_context, parse_broker, parse_broker_url
from mqtt_client import MqttClient, MqttConnectError
from protocol import topics
from tests.support import LiveStack


async def test_revoking_a_device_refuses_its_next_login_on_latchs_broker(stack: LiveStack) -> None:
    creds = await stack.register("bike-r")
    ok = MqttClient("bike-r", username="bike-r", password=creds["mqtt_password"], clean_session=True)
    await ok.connect(stack.mqtt_host, stack.mqtt_port)
    await ok.disconnect()

    r = await stack.http.delete("/v1/devices/bike-r")
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert (await stack.http.delete("/v1/devices/bike-r")).status_code == 200     # idempotent
    assert (await stack.http.get("/v1/devices/bike-r")).json()["revoked"] is True
    refused = MqttClient("bike-r", username="bike-r", password=creds["mqtt_password"], clean_session=True)
    with pytest.raises(MqttConnectError):
        await refused.connect(stack.mqtt_host, stack.mqtt_port)

    rotated = (await stack.http.post("/v1/devices/bike-r/credentials")).json()      # rotating lets it back in
    assert rotated["revoked"] is False
    back = MqttClient("bike-r", username="bike-r", password=rotated["mqtt_password"], clean_session=True)
    await back.connect(stack.mqtt_host, stack.mqtt_port)
    await back.disconnect()

    assert (await stack.http.delete("/v1/devices/nope")).status_code == 404
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        assert (await anon.delete("/v1/devices/bike-r")).status_code == 401
        r = await anon.post("/v1/auth/signup", json={"email": "rider@example.org", "password": "correct horse"})
        rider = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert (await anon.delete("/v1/devices/bike-r", headers=rider)).status_code == 403   # operators only


def test_broker_urls() -> None:
    assert parse_broker("mqtt://broker.example:1884") == ("broker.example", 1884, False)
    assert parse_broker("mqtts://broker.example:8884") == ("broker.example", 8884, True)
    assert parse_broker("mqtts://broker.example") == ("broker.example", 8883, True)
    assert parse_broker("mqtt://[::1]") == ("::1", 1883, False)
    assert parse_broker("127.0.0.1:1883") == ("127.0.0.1", 1883, False)
    assert parse_broker_url("mqtts://h:2") == ("h", 2)
    for bad in ("nonsense", "http://h:1", "mqtt://h:0", "mqtt://:1", "mqtts://h:x"):
        with pytest.raises(ValueError):
            parse_broker(bad)
    assert broker_tls_context("mqtt://h:1") is None
    assert broker_tls_context("mqtts://h:1") is not None
    with pytest.raises(ValueError, match="LATCH_BROKER_CA"):
        broker_tls_context("mqtts://h:1", Path("/nonexistent/ca.pem"))
    assert Settings(broker=None).broker_tls() is None
    assert Settings(broker="mqtts://h:1").broker_tls() is not None


async def test_revoking_or_rotating_closes_the_open_connection_on_latchs_broker(stack: LiveStack) -> None:
    """Credentials that stop working stop an open session too, not only the next login: the API asks
    Latch's broker (latch/v1/svc/drop/<id>) to close the device's connections; the will says offline."""
    revoked = await stack.lock("bike-rv")
    rotated = await stack.lock("bike-ro")
    bystander = await stack.lock("bike-by")
    assert revoked.client.is_connected and rotated.client.is_connected

    assert (await stack.http.delete("/v1/devices/bike-rv")).status_code == 200
    await asyncio.wait_for(revoked.client.disconnected.wait(), 10)
    await stack.wait_presence("bike-rv", False)

    assert (await stack.http.post("/v1/devices/bike-ro/credentials")).status_code == 200
    await asyncio.wait_for(rotated.client.disconnected.wait(), 10)
    await stack.wait_presence("bike-ro", False)

    # nobody else is touched, and only the service identity may ask: a device's request is refused
    assert bystander.client.is_connected
    bystander.client.publish(topics.drop_topic("bike-by"), b"revoked", qos=1)
    r = await stack.command("bike-by", "unlock")                    # a round trip after that publish
    assert r.json()["status"] == "succeeded" and bystander.client.is_connected
    assert stack.stack.broker is not None
    assert stack.stack.broker.core.stats["connections_dropped_on_revoke"] == 2

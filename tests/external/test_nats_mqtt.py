"""NATS server's MQTT listener (issue 18's first facts), on a real nats-server with JetStream (one node).

- NATS refuses an MQTT client id with a space ("invalid character in client ID"): the paho suite's
  "clean retained" could not connect. Every client id Latch makes — a device id (the locks, the simulator, the
  firmware), the API's LATCH_API_CLIENT_ID — uses only [A-Za-z0-9_-], which NATS accepts; the setting refuses
  anything else at start.
- With nats-server's default limits, once 1,000 devices hold a QoS 1 subscription each, a controller's QoS 1
  subscription to every device's acks (`latch/v1/d/+/ack`, the API's) is refused ("maximum consumers limit reached (10026)"): every QoS 1 MQTT
  subscription is a JetStream consumer. Reproduced here as measured; the configuration that holds a fleet is
  issue 18's work (not done yet).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from latch.settings import Settings
from mqtt_client import MqttClient, MqttConnectError
from protocol import topics
from tests.natsserver import NatsServer


@pytest.fixture
async def nats_mqtt(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = await NatsServer(tmp_path / "nats", mqtt=True).start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_client_id_with_a_space_is_refused(nats_mqtt: NatsServer) -> None:
    client = MqttClient("clean retained", clean_session=True)
    with pytest.raises(MqttConnectError, match="identifier rejected"):
        await client.connect("127.0.0.1", nats_mqtt.mqtt_port, timeout=10)
    assert any("invalid character in client ID" in line for line in nats_mqtt.log)


async def test_every_client_id_latch_makes_is_accepted(nats_mqtt: NatsServer) -> None:
    allowed = "".join(sorted(set(topics._ID_CHARS)))
    device_ids = [allowed[:topics.MAX_DEVICE_ID_LEN], allowed[-topics.MAX_DEVICE_ID_LEN:], "bike-0042", "sim-0001"]
    assert all(topics.valid_device_id(d) for d in device_ids)
    api_ids = [Settings.model_fields["api_client_id"].default, "latch-api-2"]
    for client_id in device_ids + api_ids:
        client = MqttClient(client_id, clean_session=True)
        await client.connect("127.0.0.1", nats_mqtt.mqtt_port, timeout=10)
        await client.disconnect()
    with pytest.raises(ValidationError, match="api_client_id"):
        Settings(api_client_id="latch api")   # refused at start, with the pattern in the message


async def test_default_limits_refuse_a_fleets_controller_subscription(nats_mqtt: NatsServer) -> None:
    clients: list[MqttClient] = []
    try:
        for i in range(1000):   # bounded: the fleet
            c = MqttClient(f"bike-{i:04d}", clean_session=False)
            await c.connect("127.0.0.1", nats_mqtt.mqtt_port, timeout=10)
            assert await c.subscribe([(topics.cmd_topic(f"bike-{i:04d}"), 1)]) == [1]   # a lock's own subscription
            clients.append(c)
        controller = MqttClient("latch-api", clean_session=False)
        await controller.connect("127.0.0.1", nats_mqtt.mqtt_port, timeout=10)
        clients.append(controller)
        # the API's subscription to every lock's answers
        assert await controller.subscribe([(topics.all_devices_filter(topics.ACK), 1)]) == [0x80]   # refused
        assert any("maximum consumers limit reached (10026)" in line for line in nats_mqtt.log)
    finally:
        for c in clients:
            await c.disconnect()

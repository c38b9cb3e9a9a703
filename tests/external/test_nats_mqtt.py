"""NATS server's MQTT listener (issue 18's first facts), on a real nats-server with JetStream (one node).

- NATS refuses an MQTT client id with a space ("invalid character in client ID"): the paho suite's
  "clean retained" could not connect. Every client id Latch makes — a device id (the locks, the simulator, the
  firmware), the API's LATCH_API_CLIENT_ID — uses only [A-Za-z0-9_-], which NATS accepts; the setting refuses
  anything else at start.
- With nats-server's default limits, once 1,000 devices hold a QoS 1 subscription each, a controller's QoS 1
  subscription to every device's acks (`latch/v1/d/+/ack`, the API's) is refused
  ("maximum consumers limit reached (10026)"): every QoS 1 MQTT
  subscription is a JetStream consumer. The limit that matters is the account's JetStream `max_consumers`:
  left unset, nats-server 2.15 holds an account to 1,000 consumers (the 1,001st was refused, whatever its
  subject); an account that sets it (sized from the fleet) holds the fleet and the API. Writing that
  configuration from the registry is issue 18's work (not done yet).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from foundation.settings import Settings
from mqtt_client import MqttClient, MqttConnectError
from protocol import topics
from tests.natsserver import NatsServer
from tests.support import eventually


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
    await eventually(lambda: any("invalid character in client ID" in line for line in nats_mqtt.log),
                     what="nats-server to log why")


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


async def subscribe_a_fleet(server: NatsServer, clients: list[MqttClient], n: int = 1000) -> list[int]:
    """n locks with a QoS 1 subscription to their command topic each, then the API's to every lock's acks:
    what the API was granted."""
    for i in range(n):   # bounded: the fleet
        c = MqttClient(f"bike-{i:04d}", clean_session=False)
        await c.connect("127.0.0.1", server.mqtt_port, timeout=10)
        clients.append(c)
        assert await c.subscribe([(topics.cmd_topic(f"bike-{i:04d}"), 1)]) == [1]   # a lock's own subscription
    api = MqttClient("latch-api", clean_session=False)
    await api.connect("127.0.0.1", server.mqtt_port, timeout=10)
    clients.append(api)
    return await api.subscribe([(topics.all_devices_filter(topics.ACK), 1)])


async def test_default_limits_refuse_a_fleets_controller_subscription(nats_mqtt: NatsServer) -> None:
    clients: list[MqttClient] = []
    try:
        assert await subscribe_a_fleet(nats_mqtt, clients) == [0x80]   # refused
        await eventually(lambda: any("maximum consumers limit reached (10026)" in line for line in nats_mqtt.log),
                         what="nats-server to log why")
    finally:
        for c in clients:
            await c.disconnect()


async def test_an_account_whose_consumer_limit_is_sized_from_the_fleet_holds_it(tmp_path: Path) -> None:
    fleet = 1000
    conf = ("accounts { LATCH: { jetstream: { max_consumers: %d }, users: [ { user: any, password: any } ] } }\n"
            "no_auth_user: any\n" % (2 * fleet + 100))   # each lock's subscription, the API's, room to grow
    server = await NatsServer(tmp_path / "nats", mqtt=True, conf=conf).start()
    clients: list[MqttClient] = []
    try:
        assert await subscribe_a_fleet(server, clients, fleet) == [1]
        assert not any("maximum consumers limit reached" in line for line in server.log)
    finally:
        for c in clients:
            await c.disconnect()
        await server.stop()


async def test_a_three_node_cluster_carries_mqtt_between_its_nodes(tmp_path: Path) -> None:
    """The cluster issue 18 runs Latch on (tests/natsserver.py NatsCluster): MQTT state replicated on all three
    nodes; a QoS 1 subscriber on one node gets what a client publishes on another."""
    from tests.natsserver import NatsCluster
    from tests.support import eventually

    cluster = await NatsCluster(tmp_path / "cluster").start()
    got: list[bytes] = []

    async def handler(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        got.append(payload)

    api = MqttClient("latch-api", clean_session=False, handler=handler)
    lock = MqttClient("bike-0001", clean_session=True)
    try:
        a, b, c = cluster.mqtt_addresses
        await api.connect(*c, timeout=30)
        assert await api.subscribe([(topics.all_devices_filter(topics.ACK), 1)], timeout=30) == [1]
        await lock.connect(*b, timeout=30)
        lock.publish(topics.ack_topic("bike-0001"), b"received", qos=1)
        await eventually(lambda: got == [b"received"], timeout=20, what="the ack across nodes")
    finally:
        await api.disconnect()
        await lock.disconnect()
        await cluster.stop()

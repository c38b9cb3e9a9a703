"""Facts about our dependencies that the design relies on, reproduced rather than assumed."""

from __future__ import annotations

import asyncio

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from broker.identity import SERVICE_USERNAME
from tests.support import LiveStack


async def test_gmqtt_mqtt5_default_is_refused_with_code_1_and_gmqtt_falls_back(stack: LiveStack) -> None:
    """gmqtt's default CONNECT is MQTT 5. amqtt never answered it (a hang); Latch's broker answers
    CONNACK 1 (unacceptable protocol version) [MQTT-3.1.2-2], on which gmqtt retries with 3.1.1.
    mqtt_client still passes version=MQTTv311 to skip the round trip."""
    reader, writer = await asyncio.open_connection(stack.mqtt_host, stack.mqtt_port)
    try:
        props = b"\x00"
        body = b"\x00\x04MQTT\x05\x02\x00\x3c" + props + b"\x00\x02v5"
        writer.write(bytes((0x10, len(body))) + body)
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x20\x02\x00\x01"
        assert await asyncio.wait_for(reader.read(1), 5) == b""          # and the connection is closed
    finally:
        writer.close()
    client = gmqtt.Client("fact-v5")
    client.set_config({"reconnect_retries": 3, "reconnect_delay": 0.05})
    client.set_auth_credentials(SERVICE_USERNAME, stack.settings.service_secret)
    connected = asyncio.Event()
    client.on_connect = lambda *a: connected.set()
    try:
        await asyncio.wait_for(client.connect(stack.mqtt_host, stack.mqtt_port, version=MQTTv50), 5)
        await asyncio.wait_for(connected.wait(), 5)
    finally:
        await client.disconnect()

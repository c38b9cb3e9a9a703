"""Facts about our dependencies that the design relies on, reproduced rather than assumed."""

from __future__ import annotations

import asyncio

import gmqtt
import pytest
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from broker.identity import SERVICE_USERNAME
from tests.support import LiveStack


async def _connect(stack: LiveStack, version: int, timeout: float) -> None:
    client = gmqtt.Client(f"fact-{version}")
    client.set_auth_credentials(SERVICE_USERNAME, stack.settings.service_secret)
    try:
        await asyncio.wait_for(client.connect(stack.mqtt_host, stack.mqtt_port, version=version), timeout)
    finally:
        if client.is_connected:
            await client.disconnect()
        else:
            client._is_active = False
            if client._connection is not None:
                client._connection._transport.abort()


async def test_gmqtt_defaults_to_mqtt5_which_amqtt_does_not_answer(stack: LiveStack) -> None:
    """Why mqtt_client always passes version=MQTTv311: gmqtt's default CONNECT (MQTT 5) gets no CONNACK."""
    await _connect(stack, MQTTv311, timeout=5)            # 3.1.1 connects at once
    with pytest.raises(asyncio.TimeoutError):  # a hang, not an error: no CONNACK, no close
        await _connect(stack, MQTTv50, timeout=2)         # bounded: MQTT 5 would wait forever

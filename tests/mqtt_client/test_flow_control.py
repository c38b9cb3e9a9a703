"""mqtt_client's flow control: MQTT gives one connection 65,535 packet ids, one per unacknowledged QoS 1
message. Issue 14 measured a notification to every rider (one QoS 1 message each, on the API's one link)
running gmqtt out of them, after which it raised OverflowError for every publish, commands included. Here
the broker's PUBACKs are withheld by a proxy on the route (tests/firmware/mqttproxy.py), against Latch's
broker process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from mqtt_client import MqttClient, MqttError
from tests.broker.brokersupport import latch_broker
from tests.firmware.mqttproxy import MqttProxy
from tests.support import eventually


@contextlib.asynccontextmanager
async def withheld(client_id: str) -> AsyncIterator[tuple[MqttClient, MqttProxy]]:
    """A client connected to Latch's broker through a proxy that withholds the broker's PUBACKs."""
    async with latch_broker() as (host, port):
        proxy = await MqttProxy(host, port).start()
        client = MqttClient(client_id, clean_session=True)
        try:
            await client.connect("127.0.0.1", proxy.port)
            proxy.hold_pubacks = True
            yield client, proxy
        finally:
            await client.disconnect()
            await proxy.close()


async def test_past_the_last_packet_id_publish_says_so_and_queues_nothing() -> None:
    async with withheld("bulk-1") as (client, proxy):
        sent = 0
        with pytest.raises(MqttError, match="messages already wait for the broker's acknowledgement") as refused:
            for i in range(65_536):   # gmqtt hands out 65,534 of MQTT's 65,535 ids
                client.publish("t/bulk", b"%d" % i, qos=1)
                sent += 1
        assert sent >= 65_000 and client.in_flight == sent and f"{sent} messages" in str(refused.value)
        with pytest.raises(MqttError):
            client.publish("t/bulk", b"one too many", qos=1)
        assert client.in_flight == sent   # nothing was queued
        # the acknowledgements arrive: the ids are free again
        await eventually(lambda: len(proxy.held) == sent, timeout=60, what="every PUBACK to reach the proxy")
        proxy.hold_pubacks = False
        proxy.inject_down(b"".join(proxy.held))
        await eventually(lambda: client.in_flight == 0, timeout=30, what="the PUBACKs to be read")
        client.publish("t/bulk", b"after", qos=1)


async def test_room_holds_a_bulk_sender_below_its_limit_until_acknowledgements_come() -> None:
    async with withheld("bulk-2") as (client, proxy):
        highest = 0

        async def bulk() -> None:
            nonlocal highest
            for i in range(100):
                await client.room(40)
                client.publish("t/bulk", b"%d" % i, qos=1)
                highest = max(highest, client.in_flight)

        sender = asyncio.ensure_future(bulk())
        await eventually(lambda: len(proxy.held) == 40, timeout=10, what="40 PUBACKs withheld")
        assert not sender.done() and client.in_flight == 40 and highest == 40
        # commands are not held back by room(): the link still takes them
        client.publish("t/cmd", b"unlock", qos=1)
        assert client.in_flight == 41
        proxy.hold_pubacks = False
        proxy.inject_down(b"".join(proxy.held))
        await asyncio.wait_for(sender, 30)
        assert highest <= 41
        await eventually(lambda: client.in_flight == 0, timeout=30, what="every message acknowledged")

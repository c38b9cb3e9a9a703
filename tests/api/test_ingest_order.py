"""One device's messages are applied in the order it sent them, though they are handled concurrently
(on PostgreSQL by several writer threads): the last report wins, never an older one that overtook it."""

from __future__ import annotations

from mqtt_client import MqttClient
from protocol import messages, topics
from tests.support import LiveStack, eventually


async def test_a_burst_of_reports_from_one_lock_ends_at_the_last_one(stack: LiveStack) -> None:
    reg = await stack.register("bike-burst")
    dev = MqttClient("bike-burst", username="bike-burst", password=reg["mqtt_password"], clean_session=True)
    await dev.connect(stack.mqtt_host, stack.mqtt_port)
    try:
        n = 40
        for i in range(n):   # alternating presence and lock state, as fast as the client sends them
            dev.publish(topics.presence_topic("bike-burst"), messages.ONLINE if i % 2 else messages.OFFLINE,
                        qos=1, retain=True)
            dev.publish(topics.state_topic("bike-burst"), messages.encode_state({"locked": i % 2 == 0}, i), qos=1)
        # the marker: a battery reading sent after everything else
        dev.publish(topics.state_topic("bike-burst"), messages.encode_state({"battery": 42}, n), qos=1)

        async def marker_applied() -> dict | None:
            d = (await stack.http.get("/v1/devices/bike-burst")).json()
            return d if d["reported"].get("battery") == 42 else None
        device = await eventually(marker_applied, timeout=15, what="the last report applied")
        assert device["online"] is True                     # i = 39: online
        assert device["reported"]["locked"] is False        # i = 39: locked = False
    finally:
        await dev.disconnect()

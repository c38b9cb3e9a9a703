"""The broker's doors and fences: who may connect, subscribe, publish and receive what."""

from __future__ import annotations

import asyncio

import pytest

from amqtt.contexts import Action

from broker.identity import SERVICE_USERNAME
from mqtt_client import MqttClient, MqttConnectError
from protocol import messages, topics
from tests.support import LiveStack, eventually


async def device_client(stack: LiveStack, creds: dict, handler=None) -> MqttClient:  # type: ignore[no-untyped-def]
    c = MqttClient(creds["id"], username=creds["id"], password=creds["mqtt_password"], handler=handler)
    await c.connect(stack.mqtt_host, stack.mqtt_port)
    return c


async def test_wrong_password_unknown_device_and_anonymous_are_refused(stack: LiveStack) -> None:
    creds = await stack.register("bike-x")
    for username, password in [("bike-x", "wrong"), ("ghost", "x"), (None, None), (SERVICE_USERNAME, "guess")]:
        c = MqttClient("bike-x" if username == "bike-x" else "someone", username=username, password=password)
        with pytest.raises(MqttConnectError):
            await c.connect(stack.mqtt_host, stack.mqtt_port, timeout=5)
        await c.disconnect()
    ok = await device_client(stack, creds)
    await ok.disconnect()


async def test_device_must_use_its_id_as_client_id(stack: LiveStack) -> None:
    creds = await stack.register("bike-y")
    c = MqttClient("not-bike-y", username="bike-y", password=creds["mqtt_password"])
    with pytest.raises(MqttConnectError):
        await c.connect(stack.mqtt_host, stack.mqtt_port, timeout=5)
    await c.disconnect()


async def test_rotated_secret_stops_the_old_one(stack: LiveStack) -> None:
    creds = await stack.register("bike-z")
    await stack.http.post("/v1/devices/bike-z/credentials")
    c = MqttClient("bike-z", username="bike-z", password=creds["mqtt_password"])
    with pytest.raises(MqttConnectError):
        await c.connect(stack.mqtt_host, stack.mqtt_port, timeout=5)
    await c.disconnect()


async def test_device_can_subscribe_only_to_its_own_command_topic(stack: LiveStack) -> None:
    creds = await stack.register("bike-s")
    await stack.register("bike-t")
    c = await device_client(stack, creds)
    try:
        granted = await c.subscribe([
            (topics.cmd_topic("bike-s"), 1),
            (topics.cmd_topic("bike-t"), 1),
            ("latch/v1/d/+/cmd", 1),
            ("#", 0),
            (topics.state_topic("bike-t"), 1),
        ])
    finally:
        await c.disconnect()
    assert granted == [1, 0x80, 0x80, 0x80, 0x80]


async def test_device_cannot_publish_on_another_devices_topics(stack: LiveStack) -> None:
    attacker = await stack.register("bike-evil")
    await stack.register("bike-good")
    seen: list[str] = []

    async def watch(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        seen.append(topic)

    observer = MqttClient("observer", username=SERVICE_USERNAME, password=stack.settings.service_secret,
                          clean_session=True, handler=watch)
    await observer.connect(stack.mqtt_host, stack.mqtt_port)
    await observer.subscribe([("latch/v1/d/#", 1)])
    evil = await device_client(stack, attacker)
    try:
        for kind in (topics.ACK, topics.STATE, topics.PRESENCE, topics.TELEMETRY, topics.CMD):
            evil.publish(topics.topic("bike-good", kind), messages.encode_ack("x", "succeeded", 0), qos=1)
        evil.publish(topics.cmd_topic("bike-evil"), b"self-command", qos=1)   # devices never command
        evil.publish(topics.telemetry_topic("bike-evil"), b"marker", qos=1)
        await eventually(lambda: topics.telemetry_topic("bike-evil") in seen, what="the marker")
    finally:
        await evil.disconnect()
        await observer.disconnect()
    assert not [t for t in seen if "bike-good" in t or t.endswith("/cmd")], seen


async def test_retained_state_of_other_devices_does_not_leak_to_a_reconnecting_device(stack: LiveStack) -> None:
    """amqtt as shipped sends a reconnecting persistent client every retained message matching *any*
    client's subscription, bypassing the ACL; broker.server.LatchBroker mends that."""
    await stack.lock("bike-other")                       # publishes retained presence and state
    creds = await stack.register("bike-me")
    received: list[str] = []

    async def record(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        received.append(topic)

    first = await device_client(stack, creds, record)
    await first.subscribe([(topics.cmd_topic("bike-me"), 1)])
    await first.disconnect()
    again = await device_client(stack, creds, record)   # persistent session: clean_session=False
    try:
        # a signed time reply on its own topic proves delivery works; nothing else may arrive
        again.publish(topics.sync_topic("bike-me"), messages.encode_sync(1), qos=1)
        await eventually(lambda: topics.cmd_topic("bike-me") in received, what="the time reply")
    finally:
        await again.disconnect()
    assert set(received) == {topics.cmd_topic("bike-me")}, received


async def test_a_subscribe_during_a_broadcast_loses_no_message(stack: LiveStack) -> None:
    """amqtt 0.12.1 iterates its subscription dict across an await while broadcasting; a SUBSCRIBE
    landing then raises 'dictionary changed size during iteration' and the message is lost for the
    remaining subscribers (seen at start-up with a fleet subscribing). The interleaving is forced
    here: the first RECEIVE check of the broadcast lets a concurrent subscription in."""
    amqtt_broker = stack.stack.broker.amqtt  # type: ignore[union-attr]
    got: dict[str, list[bytes]] = {"a": [], "b": []}

    def recorder(name: str):  # type: ignore[no-untyped-def]
        async def record(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            got[name].append(payload)
        return record

    clients = []
    for name, flt in (("a", "test/burst"), ("b", "test/+")):
        c = MqttClient(f"sub-{name}", username=SERVICE_USERNAME, password=stack.settings.service_secret,
                       clean_session=True, handler=recorder(name))
        await c.connect(stack.mqtt_host, stack.mqtt_port)
        await c.subscribe([(flt, 1)])
        clients.append(c)
    late = MqttClient("late", username=SERVICE_USERNAME, password=stack.settings.service_secret, clean_session=True)
    await late.connect(stack.mqtt_host, stack.mqtt_port)
    clients.append(late)
    original = amqtt_broker._topic_filtering
    injected = asyncio.Event()

    async def interleaving(session, topic, action):  # type: ignore[no-untyped-def]
        allowed = await original(session, topic, action)
        if topic == "test/burst" and action == Action.RECEIVE and not injected.is_set():
            injected.set()
            await late.subscribe([("test/late/#", 1)])   # a new filter while the broadcast is mid-loop
        return allowed

    amqtt_broker._topic_filtering = interleaving
    try:
        clients[0].publish("test/burst", b"m1", qos=1)
        await eventually(lambda: got["a"] and got["b"], what="both subscribers to get the message")
    finally:
        amqtt_broker._topic_filtering = original
        await asyncio.gather(*(c.disconnect() for c in clients))
    assert got == {"a": [b"m1"], "b": [b"m1"]}

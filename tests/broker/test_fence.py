"""The broker's doors and fences: who may connect, subscribe, publish and receive what."""

from __future__ import annotations

import asyncio

import pytest

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
    """amqtt as shipped sent a reconnecting persistent client every retained message matching *any*
    client's subscription, bypassing the ACL; Latch's broker sends retained messages only for the
    client's own new subscriptions, each through the delivery fence."""
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


async def test_subscribes_during_a_burst_lose_no_message(stack: LiveStack) -> None:
    """amqtt 0.12.1 lost a broadcast when a SUBSCRIBE landed while it iterated its subscription dict
    across an await. Latch's broker routes each PUBLISH synchronously against its index, so a fleet
    subscribing while messages flow cannot disturb delivery to those already subscribed."""
    got: list[bytes] = []

    async def record(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        got.append(payload)

    def service(name: str, handler=None) -> MqttClient:  # type: ignore[no-untyped-def]
        return MqttClient(name, username=SERVICE_USERNAME, password=stack.settings.service_secret,
                          clean_session=True, handler=handler)

    sub = service("burst-sub", record)
    pub = service("burst-pub")
    joiners = [service(f"joiner-{i}") for i in range(20)]
    for c in (sub, pub, *joiners):
        await c.connect(stack.mqtt_host, stack.mqtt_port)
    try:
        await sub.subscribe([("test/burst", 1)])
        for i in range(200):
            pub.publish("test/burst", str(i).encode(), qos=1)
        await asyncio.gather(*(j.subscribe([(f"test/late/{n}/#", 1), ("test/+", 1)])
                               for n, j in enumerate(joiners)))
        await eventually(lambda: len(got) >= 200, what="all 200 messages")
    finally:
        await asyncio.gather(*(c.disconnect() for c in (sub, pub, *joiners)))
    assert got == [str(i).encode() for i in range(200)]


async def test_anonymous_clients_cannot_squat_or_take_over_a_devices_session(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Sessions belong to identities: with --allow-anonymous on, an anonymous client that took a
    device's client id is pushed out when the device logs in, and cannot take the device's session
    (or kick it off) while the device owns it."""
    import httpx

    from latch.stack import Stack
    from tests.support import make_settings

    async with Stack(make_settings(tmp_path, allow_anonymous=True)) as st:
        async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {st.settings.admin_token}"}) as http:
            live = LiveStack(st, http)
            creds = await live.register("bike-sq")
            squatter = MqttClient("bike-sq", clean_session=False)            # anonymous, the device's id
            await squatter.connect(live.mqtt_host, live.mqtt_port)
            assert await squatter.subscribe([("dev/null", 1), (topics.cmd_topic("bike-sq"), 1)]) == [1, 0x80]
            device = await device_client(live, creds)
            await eventually(lambda: not squatter.is_connected, what="the squatter to be pushed out")
            thief = MqttClient("bike-sq", clean_session=False)
            thief._client.set_config({"reconnect_retries": 0})
            with pytest.raises(MqttConnectError):
                await thief.connect(live.mqtt_host, live.mqtt_port, timeout=5)
            await thief.disconnect()
            assert device.is_connected
            await squatter.disconnect()
            await device.disconnect()

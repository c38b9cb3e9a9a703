"""MQTT push: a rider's app on MQTT over WebSocket reads its own events topic, and only that."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from amqtt.client import ClientError, ConnectError, MQTTClient
from amqtt.mqtt.constants import QOS_1

from protocol import topics
from tests.api.push_support import User, sign_up
from tests.support import LiveStack, eventually, live_stack


@pytest.fixture
async def ws_stack(tmp_path: Path) -> AsyncIterator[LiveStack]:
    async with live_stack(tmp_path, ws_port=0) as live:
        yield live


async def mqtt_ws(stack: LiveStack, user: User, client_id: str | None = None, clean: bool = True) -> MQTTClient:
    assert stack.stack.broker is not None
    port = stack.stack.broker.ports["ws"]
    client = MQTTClient(client_id=client_id or f"{user.id}-app", config={"auto_reconnect": False})
    await client.connect(f"ws://{user.id}:{user.token}@127.0.0.1:{port}/", cleansession=clean)
    return client


async def test_rider_receives_their_events_over_mqtt_websocket_and_nothing_else(ws_stack: LiveStack) -> None:
    stack = ws_stack
    await stack.lock("bike-1")
    clients: list[httpx.AsyncClient] = []
    alice, bob = await sign_up(stack, clients=clients), await sign_up(stack, clients=clients)
    app = await mqtt_ws(stack, alice)
    try:
        granted = await app.subscribe([(topics.user_events_topic(alice.id), QOS_1),
                                       (topics.user_events_topic(bob.id), QOS_1),
                                       ("latch/v1/u/+/events", QOS_1), (topics.cmd_topic("bike-1"), QOS_1)])
        assert granted == [QOS_1, 0x80, 0x80, 0x80]   # their own topic only: no one else's, no wildcard
        ride = (await alice.http.post("/v1/rides", json={"bike_id": "bike-1"})).json()
        received: list[dict] = []
        for _ in range(20):   # bounded: the ride's events, until it is active
            msg = await app.deliver_message(timeout_duration=10)
            assert msg is not None and msg.topic == topics.user_events_topic(alice.id)
            received.append(json.loads(bytes(msg.data)))
            if received[-1]["kind"] == "ride" and received[-1]["data"]["status"] == "active":
                break
        assert received[0]["data"] == {**received[0]["data"], "ride_id": ride["id"], "status": "starting"}
        # the same events, with the same ids, as the HTTP log
        page = (await alice.http.get("/v1/events", params={"after": 0})).json()
        by_id = {e["id"]: e for e in page["events"]}
        assert all(by_id[e["id"]] == e for e in received)
        assert [e["id"] for e in received] == sorted(e["id"] for e in received)
        # read-only: a publish to their own topic goes nowhere. Then end the ride: once its "ended" event
        # arrives, everything published before it has arrived too (one connection, in order).
        await app.publish(topics.user_events_topic(alice.id), b'{"kind": "forged"}', qos=QOS_1)
        r = await alice.http.post(f"/v1/rides/{ride['id']}/end")
        assert r.status_code == 200, r.text
        later: list[dict] = []
        for _ in range(40):   # bounded: until the ride's end arrives
            msg = await app.deliver_message(timeout_duration=10)
            assert msg is not None
            later.append(json.loads(bytes(msg.data)))
            if later[-1]["kind"] == "ride" and later[-1]["data"]["status"] == "ended":
                break
        assert later[-1]["data"]["status"] == "ended"
        assert all(e["kind"] != "forged" and isinstance(e["id"], int) for e in later)
    finally:
        await app.disconnect()
        for c in clients:
            await c.aclose()


async def test_mqtt_login_needs_a_valid_token_for_that_user_and_a_fenced_client_id(ws_stack: LiveStack) -> None:
    stack = ws_stack
    clients: list[httpx.AsyncClient] = []
    alice, bob = await sign_up(stack, clients=clients), await sign_up(stack, clients=clients)
    try:
        for user, client_id in ((User(alice.id, "", bob.token, "rider", alice.http), None),   # bob's token
                                (User(alice.id, "", "a.b.c", "rider", alice.http), None),     # forged
                                (alice, "bike-0001")):                                        # a lock's client id
            with pytest.raises((ConnectError, ClientError)):
                await mqtt_ws(stack, user, client_id)
        ok = await mqtt_ws(stack, alice, client_id=alice.id)
        await ok.disconnect()
    finally:
        for c in clients:
            await c.aclose()


async def test_a_persistent_session_gets_what_happened_while_away(ws_stack: LiveStack) -> None:
    stack = ws_stack
    await stack.lock("bike-2")
    clients: list[httpx.AsyncClient] = []
    rider = await sign_up(stack, clients=clients)
    try:
        app = await mqtt_ws(stack, rider, clean=False)
        assert await app.subscribe([(topics.user_events_topic(rider.id), QOS_1)]) == [QOS_1]
        await app.disconnect()
        ride = (await rider.http.post("/v1/rides", json={"bike_id": "bike-2"})).json()

        async def active() -> bool:
            return (await rider.http.get(f"/v1/rides/{ride['id']}")).json()["status"] == "active"

        await eventually(active, what="the ride to be active")
        app = await mqtt_ws(stack, rider, clean=False)
        try:
            got = []
            for _ in range(20):
                msg = await app.deliver_message(timeout_duration=10)
                assert msg is not None
                got.append(json.loads(bytes(msg.data)))
                if got[-1]["kind"] == "ride" and got[-1]["data"]["status"] == "active":
                    break
            assert got[0]["kind"] == "ride" and got[0]["data"]["status"] == "starting"
        finally:
            await app.disconnect()
    finally:
        for c in clients:
            await c.aclose()

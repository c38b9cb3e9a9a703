"""The shared broker link survives what one command can do to it (issue 12, defects 1 and 11)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from broker.core import Limits
from broker.server import BrokerOptions, EmbeddedBroker
from mqtt_client import MqttClient
from tests.support import eventually, live_stack


async def test_a_publish_the_broker_would_refuse_fails_that_command_only(tmp_path: Path) -> None:
    # the broker takes packets up to 1,500 bytes; the lock would read 4 KiB: the link refuses the publish
    async with live_stack(tmp_path, mqtt_max_packet_size=1500) as live:
        await live.lock("bike-1")
        r = await live.command("bike-1", "locate", params={"x": "a" * 2000})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["status"] == "failed" and "packet limit" in body["reason"], body
        assert [h["to_status"] for h in body["history"] if h["applied"]] == ["queued", "sent", "failed"]
        assert live.runtime.link.is_connected
        r = await live.command("bike-1", "unlock")
        assert r.json()["status"] == "succeeded", r.text


async def test_a_message_that_keeps_killing_the_connection_is_dropped_from_the_replay(tmp_path: Path) -> None:
    """The broker closes the connection on a packet over its limit; gmqtt would replay it on every
    reconnect forever. After `max_replays` it is dropped and reported, and the connection carries on."""
    options = BrokerOptions(port=0, allow_anonymous=True, limits=dataclasses.replace(Limits(), max_packet_size=600))
    broker = EmbeddedBroker(options, None)
    await broker.start()
    dropped: list[tuple[str, bytes]] = []
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        await got.put(payload)

    sender = MqttClient("sender", clean_session=False, reconnect_delay=0.05, max_replays=2,
                        on_dropped=lambda t, p: dropped.append((t, p)))
    receiver = MqttClient("receiver", clean_session=True, handler=on_message)
    try:
        await receiver.connect("127.0.0.1", broker.port)
        await receiver.subscribe([("t/#", 1)])
        await sender.connect("127.0.0.1", broker.port)
        sender.publish("t/big", b"x" * 2000, qos=1)
        await eventually(lambda: dropped, timeout=20, what="the poison message dropped")
        assert dropped == [("t/big", b"x" * 2000)]
        await eventually(lambda: sender.is_connected, timeout=10, what="sender connected again")
        sender.publish("t/small", b"fine", qos=1)
        assert await asyncio.wait_for(got.get(), 10) == b"fine"
    finally:
        await sender.disconnect()
        await receiver.disconnect()
        await broker.stop()


async def test_on_a_cluster_a_message_is_replayed_through_more_deaths_before_it_counts_as_the_cause() -> None:
    """A node's death and a cluster's failover end the connection a few times in a row whatever is in flight (the
    NATS tier, measured: an unlock failed as "the broker kept closing the connection on it" while JetStream elected
    new leaders). With a broker's nodes given, a message is dropped only after max_replays deaths per node."""
    from tests.conformance.brokers import free_port

    options = BrokerOptions(port=0, allow_anonymous=True, limits=dataclasses.replace(Limits(), max_packet_size=600))
    broker = EmbeddedBroker(options, None)
    await broker.start()
    dropped: list[tuple[str, bytes]] = []
    connects: list[bool] = []
    sender = MqttClient("sender", clean_session=False, reconnect_delay=0.05, max_replays=2,
                        on_dropped=lambda t, p: dropped.append((t, p)))
    sender.on_connect_callbacks.append(connects.append)
    try:
        await sender.connect("127.0.0.1", broker.port, fallbacks=[("127.0.0.1", free_port())])   # 2 nodes, 1 dead
        sender.publish("t/big", b"x" * 2000, qos=1)   # closes the connection each time it is sent
        await eventually(lambda: dropped, timeout=30, what="the message dropped")
        assert dropped == [("t/big", b"x" * 2000)]
        assert len(connects) == 1 + 2 * 2 + 1, connects   # the first, 2 replays per node kept, the one that drops
    finally:
        await sender.disconnect()
        await broker.stop()


async def test_healthz_is_503_while_the_broker_link_is_down_and_unlocks_resume_quickly(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as live:
        http, st = live.http, live.stack
        await live.lock("bike-h")
        assert (await http.get("/healthz")).json() == {"status": "ok", "broker_connected": True}
        broker = st.broker
        assert broker is not None
        port = broker.port
        await broker.stop()

        async def degraded() -> bool:
            r = await http.get("/healthz")
            return r.status_code == 503 and r.json()["status"] == "degraded"
        await eventually(degraded, timeout=10, what="healthz 503")
        r = await live.command("bike-h", "unlock")
        assert r.status_code == 201 and r.json()["status"] == "failed" and "broker" in r.json()["reason"], r.text

        broker.options = dataclasses.replace(broker.options, port=port)
        await broker.start()
        up = time.monotonic()

        async def unlocked() -> bool:
            r = await live.command("bike-h", "unlock", wait=5)
            return r.json()["status"] == "succeeded"
        await eventually(unlocked, timeout=15, interval=0.05, what="an unlock after the outage")
        # printed, not asserted (speed is measured, not timed in tests): 0.98 s on an idle machine, most of it
        # the lock's own reconnect delay; the API's link retries every 0.25 s (it waited ~7 s before)
        print(f"unlock succeeded {time.monotonic() - up:.2f}s after the broker was back")
        assert (await http.get("/healthz")).status_code == 200


async def test_a_start_up_that_cannot_reach_the_broker_leaves_nothing_open(tmp_path: Path) -> None:
    """The broker link is the last part to start: when it fails, every part started before it is stopped again
    (api/app.py lifespan, one AsyncExitStack): the database's connections, and on PostgreSQL its LISTEN
    connection, are closed, and the error names the broker."""
    import pytest
    from sqlalchemy import text

    from api import schema
    from api.app import create_app
    from api.db import Database
    from mqtt_client import MqttConnectError
    from tests.conformance.brokers import free_port
    from tests.support import make_settings

    settings = make_settings(tmp_path, broker=f"mqtt://127.0.0.1:{free_port()}")   # nobody listens there
    settings.ensure_secrets()
    probe = Database(settings.resolved_database_url())
    await schema.upgrade(probe)

    async def others() -> int:   # connections to this database other than the probe's own
        return int(await probe.read(lambda s: s.connection().execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")).scalar_one()))

    before = await others() if probe.is_postgres else 0
    app = create_app(settings)
    database = app.state.runtime.db
    with pytest.raises(MqttConnectError, match=str(settings.broker_addresses()[0][1])):
        async with app.router.lifespan_context(app):
            raise AssertionError("started without a broker")
    if probe.is_postgres:
        await eventually(lambda: _equal(others, before), timeout=10,
                         what="the API's PostgreSQL connections closed")
    else:
        with pytest.raises(RuntimeError, match="shutdown"):   # its threads are gone: closed
            await database.read(lambda s: s.connection().execute(text("SELECT 1")).scalar_one())
    await probe.close()


async def _equal(count, wanted: int) -> bool:  # type: ignore[no-untyped-def]
    return await count() == wanted


async def test_a_command_queued_while_the_link_was_down_is_sent_when_it_returns(tmp_path: Path) -> None:
    """A lock that stays online through the API's own link outage: a "lock" command created meanwhile waits
    queued (nothing can be sent), and is sent once the link is back. Before, only the device's coming online
    sent queued commands, so this one stayed queued until it expired (a CI run through Mosquitto: the
    command's only history was "created")."""
    async with live_stack(tmp_path) as live:
        await live.lock("bike-q")
        core = live.stack.broker.core   # type: ignore[union-attr]
        link = live.runtime.link
        for _ in range(10):   # bounded: the link comes back within ~0.25 s, the command must be made before
            core.sessions[live.stack.settings.api_client_id].conn.abort()
            await eventually(lambda: not link.is_connected, timeout=5, interval=0.001, what="the link to drop")
            r = await live.command("bike-q", "lock", wait=0)
            assert r.status_code == 201, r.text
            if r.json()["status"] == "queued":
                break
            await eventually(lambda: link.is_connected, timeout=10, what="the link to come back")
        else:
            raise AssertionError("the link was never down when a command was made")
        cmd_id = r.json()["id"]
        done = await live.http.get(f"/v1/commands/{cmd_id}", params={"wait": 15})
        assert done.json()["status"] == "succeeded", done.text
        assert [h["event"] for h in done.json()["history"]][:2] == ["created", "dispatch"]

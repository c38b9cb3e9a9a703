"""mqtt_client with several broker addresses (the nodes of one clustered broker, issue 18): `connect` tries them
in order, and a client whose node goes away moves on to the next by itself. Against Latch's broker processes
standing in for the nodes (they share no session: that a clustered broker keeps one across its nodes is the
broker's part, measured in issue 18's benchmark, not the client's)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from mqtt_client import MqttClient, MqttConnectError
from tests.broker.brokersupport import latch_broker
from tests.conformance.brokers import free_port
from tests.support import eventually


async def test_connect_tries_the_next_address_when_one_does_not_answer() -> None:
    closed = ("127.0.0.1", free_port())   # nothing listens here
    async with latch_broker() as node:
        client = MqttClient("bike-0001", clean_session=True)
        await client.connect(*closed, fallbacks=[node])
        try:
            assert client.address == node and client.is_connected
        finally:
            await client.disconnect()
    alone = MqttClient("bike-0002", clean_session=True)
    with pytest.raises(MqttConnectError, match=r"cannot connect .*also tried"):
        await alone.connect(*closed, fallbacks=[("127.0.0.1", free_port())], timeout=5)


async def test_a_client_whose_node_goes_away_moves_to_the_next(tmp_path: Path) -> None:
    connects: list[bool] = []
    async with latch_broker() as second, contextlib.AsyncExitStack() as first_node:
        first = await first_node.enter_async_context(latch_broker())
        client = MqttClient("latch-api", clean_session=False, reconnect_delay=0.1)
        client.on_connect_callbacks.append(connects.append)
        await client.connect(*first, fallbacks=[second])
        try:
            assert client.address == first
            await first_node.aclose()   # the first node stops
            await eventually(lambda: client.address == second and client.is_connected, timeout=30,
                             what="the client on the second node")
            assert len(connects) == 2   # connected twice; each node a session of its own here
            client.publish("t/after", b"moved", qos=1)   # and it works there
        finally:
            await client.disconnect()


def test_settings_take_a_clusters_nodes_comma_separated() -> None:
    from foundation.settings import Settings

    s = Settings(broker="mqtt://n1:1883, mqtt://n2:1884,n3:1885")
    assert s.broker_addresses() == [("n1", 1883), ("n2", 1884), ("n3", 1885)] and s.broker_address() == ("n1", 1883)
    with pytest.raises(ValueError, match="mix mqtt:// and mqtts://"):
        Settings(broker="mqtt://n1,mqtts://n2").broker_addresses()


async def test_the_api_and_a_lock_start_on_the_node_that_answers(tmp_path: Path) -> None:
    """`latch api --broker` listing a node that does not answer first: the API's link starts on the next, so
    does a simulated lock given the same list, and an unlock goes through (settings -> api/app.py -> BrokerLink;
    device_sim)."""
    import httpx

    from device_sim.lock import Behaviour, Credentials, SimulatedLock
    from tests.procs import drain, read_until, running

    data = tmp_path / "data"
    env = {"LATCH_ADMIN_TOKEN": "failover-admin-token", "LATCH_SERVICE_SECRET": "failover-service-secret"}
    async with running("broker", "--data-dir", str(data), "--mqtt-port", "0", env=env) as broker:
        m, _ = await read_until(broker, r"default 127\.0\.0\.1:(\d+)")
        drain(broker)
        nodes = [("127.0.0.1", free_port()), ("127.0.0.1", int(m.group(1)))]   # the first: nothing listens
        listed = ",".join(f"mqtt://{h}:{p}" for h, p in nodes)
        async with running("api", "--data-dir", str(data), "--broker", listed, "--http-port", "0", env=env) as api:
            m, _ = await read_until(api, r"API:\s+(http\S+)")
            drain(api)
            async with httpx.AsyncClient(base_url=m.group(1), timeout=30,
                                         headers={"Authorization": "Bearer failover-admin-token"}) as http:
                assert (await http.get("/healthz")).json()["broker_connected"] is True
                r = await http.post("/v1/devices", json={"id": "bike-0042"})
                assert r.status_code == 201, r.text
                lock = SimulatedLock(Credentials.from_registration(r.json()), Behaviour(actuation_delay_s=0.01))
                await lock.start(*nodes[0], fallbacks=nodes[1:])
                try:
                    async def online() -> bool:
                        return (await http.get("/v1/devices/bike-0042")).json()["online"] is True
                    await eventually(online, timeout=20, what="the lock online")
                    r = await http.post("/v1/devices/bike-0042/commands", params={"wait": 10},
                                        json={"action": "unlock"})
                    assert r.json()["status"] == "succeeded", r.text
                finally:
                    await lock.stop()

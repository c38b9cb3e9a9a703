"""Latch on a 3-node NATS cluster (its MQTT listeners), configured by `latch broker-config nats`, logins decided by
the API through NATS's auth callout (api/registry/nats_auth.py; issue 18).

The fence checks are those tests/external/test_mosquitto.py makes against Mosquitto, with the clients spread over
the three nodes. Negative checks ("nothing arrived") use a marker sent after the forbidden message on the same
connection: NATS keeps one publisher's messages in order, so once the marker is in, a forbidden message that got
through would be there already.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest

from api import schema
from api.db import Database
from api.models import DeviceCreate
from api.registry.devices import DeviceRegistry
from api.registry.nats_auth import NatsAuth
from broker.identity import SERVICE_USERNAME
from device_sim.lock import Behaviour, Credentials, SimulatedLock
from foundation.settings import Settings
from latch import nats_config
from latch.stack import Stack
from mqtt_client import MqttClient, MqttConnectError
from protocol import topics
from tests.external.support import Recorder
from tests.natsserver import GeneratedCluster
from tests.support import LiveStack, eventually, make_settings

pytestmark = pytest.mark.timeout(180)


async def nats_client(address: tuple[str, int], client_id: str, username: str, password: str,
                      handler: Recorder | None = None, timeout: float = 30) -> MqttClient:
    c = MqttClient(client_id, username=username, password=password, clean_session=True, handler=handler,
                   reconnect_delay=0.2)
    await c.connect(*address, timeout=timeout)
    return c


async def migrated(settings: Settings) -> Database:
    settings.ensure_secrets()
    db = Database(settings.resolved_database_url())
    await schema.upgrade(db)
    return db


@contextlib.asynccontextmanager
async def cluster_for(tmp_path: Path, settings: Settings, fleet: int = 100,
                      tls: tuple[Path, Path] | None = None) -> AsyncIterator[GeneratedCluster]:
    """Three nodes from `latch broker-config nats`'s files (written with the same code the command runs)."""
    cluster = GeneratedCluster(tmp_path / "nats")
    nats_config.write(tmp_path / "nats-conf", settings, cluster.spec, fleet, tmp_path / "nats" / "store", tls)
    await cluster.start(tmp_path / "nats-conf")
    try:
        yield cluster
    finally:
        await cluster.stop()


async def test_the_fence_holds_on_a_three_node_cluster(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, nats_auth_url="")
    db = await migrated(settings)
    registry = DeviceRegistry(db)
    creds = {d: (await registry.register(DeviceCreate(id=d))).mqtt_password for d in ("bike-a", "bike-b", "bike-c")}
    async with cluster_for(tmp_path, settings) as cluster:
        settings.nats_auth_url = cluster.nats_url
        auth = NatsAuth(db, settings)
        await auth.start()
        n1, n2, n3 = cluster.mqtt_addresses
        seen_by_service = Recorder()
        service = await nats_client(n3, "observer", SERVICE_USERNAME, settings.service_secret or "", seen_by_service)
        got_a, got_b = Recorder(), Recorder()
        a = await nats_client(n1, "bike-a", "bike-a", creds["bike-a"], got_a)
        b = await nats_client(n2, "bike-b", "bike-b", creds["bike-b"], got_b)
        try:
            assert await service.subscribe([("latch/v1/#", 1)], timeout=30) == [1]
            # B's own traffic passes (the positive control): its retained state and its command topic
            b.publish(topics.state_topic("bike-b"), b'{"locked": true}', qos=1, retain=True)
            await seen_by_service.wait_for(topics.state_topic("bike-b"), timeout=30)
            assert await b.subscribe([(topics.cmd_topic("bike-b"), 1)], timeout=30) == [1]

            # A may not read B's commands, directly or through wildcards: nats-server refuses those subscriptions
            refused = await a.subscribe([(topics.cmd_topic("bike-b"), 1), ("latch/v1/d/+/cmd", 1),
                                         ("latch/v1/d/bike-b/#", 1), ("#", 1), (topics.cmd_topic("bike-a"), 1)],
                                        timeout=30)
            assert refused == [0x80, 0x80, 0x80, 0x80, 1]
            service.publish(topics.cmd_topic("bike-b"), b"for-b-only", qos=1)
            service.publish(topics.cmd_topic("bike-a"), b"marker-a", qos=1)
            await got_b.wait_for(topics.cmd_topic("bike-b"), b"for-b-only", timeout=30)
            await got_a.wait_for(topics.cmd_topic("bike-a"), b"marker-a", timeout=30)
            assert set(got_a.topics()) == {topics.cmd_topic("bike-a")}, got_a.messages

            # A may not write B's uplink nor anyone's commands; its own uplink passes (the marker)
            await seen_by_service.wait_for(topics.cmd_topic("bike-a"), b"marker-a", timeout=30)
            mark = len(seen_by_service.messages)
            a.publish(topics.ack_topic("bike-b"), b"forged-ack", qos=1)
            a.publish(topics.state_topic("bike-b"), b'{"locked": false}', qos=1, retain=True)
            a.publish(topics.presence_topic("bike-b"), b"offline", qos=1, retain=True)
            a.publish(topics.cmd_topic("bike-b"), b"forged-cmd", qos=1)
            a.publish(topics.telemetry_topic("bike-a"), b"marker-a-up", qos=1)
            await seen_by_service.wait_for(topics.telemetry_topic("bike-a"), b"marker-a-up", timeout=30)
            assert seen_by_service.messages[mark:] == [(topics.telemetry_topic("bike-a"), b"marker-a-up")]
            assert (topics.cmd_topic("bike-b"), b"forged-cmd") not in got_b.messages

            # a new subscription gets B's own retained state, not A's forgery
            mark = len(seen_by_service.messages)
            await service.subscribe([(topics.state_topic("bike-b"), 1)], timeout=30)
            i = await seen_by_service.wait_for(topics.state_topic("bike-b"), after=mark, timeout=30)
            assert seen_by_service.messages[i][1] == b'{"locked": true}'

            # C logging in with B's client id is refused (a device's client id is its id): B stays
            with pytest.raises(MqttConnectError):
                await nats_client(n1, "bike-b", "bike-c", creds["bike-c"])
            service.publish(topics.cmd_topic("bike-b"), b"still-b", qos=1)
            await got_b.wait_for(topics.cmd_topic("bike-b"), b"still-b", timeout=30)

            # wrong password, unknown device, the service's name with a device's secret, no credentials: refused
            for username, password in (("bike-a", creds["bike-b"]), ("bike-zz", creds["bike-a"]),
                                       (SERVICE_USERNAME, creds["bike-a"])):
                with pytest.raises(MqttConnectError):
                    await nats_client(n2, username, username, password)
            anonymous = MqttClient("anon", clean_session=True, reconnect_delay=0.2)
            with pytest.raises(MqttConnectError):
                await anonymous.connect(*n2, timeout=30)
            # a device's secret opens MQTT only: over NATS's own protocol it is refused
            with pytest.raises(nats.errors.Error):
                await nats.connect(cluster.nats_url.split(",")[0], user="bike-a", password=creds["bike-a"],
                                   allow_reconnect=False, connect_timeout=10)
            assert auth.refused >= 6 and auth.answered >= 4
        finally:
            for c in (a, b, service):
                await c.disconnect()
            await auth.stop()
    await db.close()


@contextlib.asynccontextmanager
async def api_on_cluster(tmp_path: Path, nats_events: bool = False, tls: tuple[Path, Path] | None = None,
                         **overrides: object) -> AsyncIterator[tuple[LiveStack, GeneratedCluster]]:
    """The real API (uvicorn on a real socket) on the cluster: its MQTT link to the nodes (all three addresses),
    the callout answered by it; with `nats_events`, its event stream on the same cluster (3 replicas)."""
    settings = make_settings(tmp_path, nats_auth_url="", **overrides)
    db = await migrated(settings)
    await db.close()
    async with cluster_for(tmp_path, settings, tls=tls) as cluster:
        settings.nats_auth_url, settings.broker = cluster.nats_url, cluster.broker_url
        if tls is not None:
            settings.broker = cluster.broker_url.replace("mqtt://", "mqtts://")
        if nats_events:
            settings.nats_url, settings.nats_replicas = cluster.nats_url, 3
        async with Stack(settings, embedded_broker=False) as st:
            async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                         headers={"Authorization": f"Bearer {settings.admin_token}"}) as http:
                live = LiveStack(st, http)
                live.mqtt_host, live.mqtt_port = cluster.mqtt_addresses[1]   # locks start on node 2
                try:
                    yield live, cluster
                finally:
                    await asyncio.gather(*(lock.stop() for lock in live.locks), return_exceptions=True)


async def test_unlock_round_trip_and_register_rotate_revoke_on_the_cluster(tmp_path: Path) -> None:
    async with api_on_cluster(tmp_path) as (live, cluster):
        auth: NatsAuth = live.stack._server.config.app.state.nats_auth   # type: ignore[union-attr]
        lock = await live.lock("bike-0001")          # registered through the API: it logs in at once
        other = await live.lock("bike-0009")         # a bystander: nothing below may touch its connection
        other_connects: list[bool] = []
        other.client.on_connect_callbacks.append(other_connects.append)
        r = await live.command("bike-0001", "unlock", wait=20)
        assert r.json()["status"] == "succeeded", r.text
        assert [a for _, a in lock.actuations] == ["unlock"]

        # a rider's app: its own events topic only, and the node refuses the rest
        async with httpx.AsyncClient(base_url=live.api_url) as anon:
            r = await anon.post("/v1/auth/signup", json={"email": "ada@example.org", "password": "correct horse"})
            assert r.status_code == 201, r.text
        rider_id, token = r.json()["user"]["id"], r.json()["access_token"]
        app = await nats_client(cluster.mqtt_addresses[0], f"{rider_id}-app", rider_id, token)
        assert await app.subscribe([(topics.user_events_topic(rider_id), 1), (topics.cmd_topic("bike-0001"), 1),
                                    ("latch/v1/u/+/events", 1)], timeout=30) == [1, 0x80, 0x80]
        await app.disconnect()
        with pytest.raises(MqttConnectError):   # a token is no device secret, nor another rider's
            await nats_client(cluster.mqtt_addresses[0], "bike-0001", "bike-0001", token)

        # rotating: the node closes the old secret's connection (the API kicks it); the old secret is refused
        old_password = lock.creds.mqtt_password
        r = await live.http.post("/v1/devices/bike-0001/credentials")
        assert r.status_code == 200
        new = r.json()
        await asyncio.wait_for(lock.client.disconnected.wait(), 20)
        with pytest.raises(MqttConnectError):
            await nats_client(cluster.mqtt_addresses[0], "bike-0001", "bike-0001", old_password)
        await lock.stop(abrupt=True)   # its client would retry the old secret
        lock2 = SimulatedLock(Credentials.from_registration(new), Behaviour(actuation_delay_s=0.01))
        live.locks.append(lock2)
        await live.start_lock(lock2)
        r = await live.command("bike-0001", "lock", wait=20)
        assert r.json()["status"] == "succeeded", r.text

        # revoking: kicked from its node, refused after, shown offline, no more commands
        r = await live.http.delete("/v1/devices/bike-0001")
        assert r.status_code == 200 and r.json()["revoked"] is True
        await asyncio.wait_for(lock2.client.disconnected.wait(), 20)
        with pytest.raises(MqttConnectError):
            await nats_client(cluster.mqtt_addresses[2], "bike-0001", "bike-0001", new["mqtt_password"])
        await live.wait_presence("bike-0001", False)
        r = await live.command("bike-0001", "unlock")
        assert r.status_code == 409 and "revoked" in r.text, r.text
        assert auth.kicked >= 2
        r = await live.command("bike-0009", "unlock", wait=20)   # the bystander kept its one connection
        assert r.json()["status"] == "succeeded" and other_connects == [] and other.client.is_connected, r.text


async def test_a_node_killed_the_lock_and_the_api_move_and_unlocks_go_on(tmp_path: Path) -> None:
    async with api_on_cluster(tmp_path) as (live, cluster):
        creds = Credentials.from_registration(await live.register("bike-0002"))
        lock = SimulatedLock(creds, Behaviour(actuation_delay_s=0.01))
        live.locks.append(lock)
        n1, n2, n3 = cluster.mqtt_addresses
        await lock.start(*n2, fallbacks=[n3, n1])
        await live.wait_presence("bike-0002", True)
        r = await live.command("bike-0002", "unlock", wait=20)
        assert r.json()["status"] == "succeeded", r.text

        cluster.kill(1)   # the lock's node (the API sits on node 1)
        await asyncio.wait_for(lock.client.disconnected.wait(), 30)

        async def unlocked_again() -> bool:
            r = await live.command("bike-0002", "unlock", wait=10)
            return r.status_code == 201 and r.json()["status"] == "succeeded"
        await eventually(unlocked_again, timeout=90, interval=1.0, what="an unlock through another node")
        assert lock.client.is_connected


async def test_broker_config_cli_writes_the_node_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = make_settings(tmp_path)
    db = await migrated(settings)
    await db.close()
    out = tmp_path / "conf"
    cli = [sys.executable, "-m", "latch.cli", "broker-config", "nats", "--out", str(out), "--data-dir", str(data),
           "--nodes", "127.0.0.1:4222:6222:1883,127.0.0.1:4223:6223:1884,127.0.0.1:4224:6224:1885"]
    if settings.database_url:
        cli += ["--database-url", settings.database_url]

    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, stdout.decode()

    code, printed = await run(*cli)
    assert code == 0, printed
    assert "3 node(s)" in printed and "LATCH_NATS_AUTH_URL=nats://127.0.0.1:4222" in printed
    files = sorted(out.glob("node-*.conf"))
    assert [f.name for f in files] == ["node-1.conf", "node-2.conf", "node-3.conf"]
    first = files[0].read_text()
    secret = (data / "nats-auth.secret").read_text().strip()
    seed = (data / "nats-issuer.seed").read_text().strip()
    assert stat.S_IMODE((data / "nats-issuer.seed").stat().st_mode) == 0o600
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o644
    assert secret not in first and seed not in first                  # the files hold no secret
    for needle in ("stream_replicas: 3", "max_consumers: 3000", 'listen: "127.0.0.1:1883"',
                   "nats-route://127.0.0.1:6224", "auth_callout", "system_account: SYS"):
        assert needle in first, needle
    before = [f.read_text() for f in files]
    code, printed = await run(*cli)                                    # again: the same files (the same hash)
    assert code == 0 and [f.read_text() for f in files] == before
    code, printed = await run(*cli[:-2], "--nodes", "127.0.0.1:4222")  # a node without its ports: told how
    assert code == 1 and "HOST:CLIENT_PORT:CLUSTER_PORT:MQTT_PORT" in printed


async def test_the_firmware_under_micropython_unlocks_through_the_cluster_and_moves_when_its_node_dies(
        tmp_path: Path) -> None:
    """The lock's own firmware (micropython, Unix HAL), given two of the nodes (node 3 first): it logs in through
    the callout, syncs its clock and executes a signed unlock the API sent through node 1; node 3 is killed,
    and the firmware moves to node 1, where the next unlock reaches it."""
    from tests.firmware.fwsupport import FirmwareProcess, device_config, need_tool

    micropython = need_tool("micropython")
    async with api_on_cluster(tmp_path) as (live, cluster):
        reg = await live.register("bike-0003")
        n1, _, n3 = cluster.mqtt_addresses
        cfg = device_config(reg, *n3, tmp_path / "fw", broker={"hosts": [list(n3), list(n1)]})
        cfg["broker"].pop("host"), cfg["broker"].pop("port")
        fw = FirmwareProcess(micropython, tmp_path / "fw", cfg)
        await fw.start()
        try:
            await fw.wait_line(r"clock synchronised", timeout=60)
            await live.wait_presence("bike-0003", True)
            r = await live.command("bike-0003", "unlock", wait=20)
            assert r.json()["status"] == "succeeded", (r.text, fw.output())
            assert fw.motor_runs() == 1

            mark = len(fw.lines)
            cluster.kill(2)
            await fw.wait_line(rf"connecting to 127\.0\.0\.1:{n1[1]}", timeout=60, after=mark)
            await fw.wait_line(r"connected session_present", timeout=60, after=mark)   # on node 1: node 3 is dead
            r = await live.command("bike-0003", "lock", wait=20)
            assert r.json()["status"] == "succeeded", (r.text, fw.output())
            assert fw.motor_runs() == 2
        finally:
            await fw.stop()


async def test_one_cluster_is_both_the_mqtt_broker_and_the_event_stream(tmp_path: Path) -> None:
    """LATCH_NATS_URL on the same cluster: the API's JetStream connection logs in as the service through the
    callout, the event stream is kept on all three nodes, and a command's events reach an operator's stream."""
    async with api_on_cluster(tmp_path, nats_events=True) as (live, cluster):
        await live.lock("bike-0004")
        r = await live.command("bike-0004", "unlock", wait=20)
        assert r.json()["status"] == "succeeded", r.text
        command_id = r.json()["id"]

        async def final_event_streamed() -> bool:
            r = await live.http.get("/v1/events", params={"after": 0, "wait": 0})
            return any(command_id in str(e["data"]) and "succeeded" in str(e["data"]) for e in r.json()["events"])
        await eventually(final_event_streamed, timeout=30, interval=0.2, what="the command's final event")
        assert (await live.http.get("/healthz")).json().get("nats_connected") is True
        js = await nats.connect(cluster.nats_url.split(","), user=SERVICE_USERNAME,
                                password=live.settings.service_secret or "",
                                connect_timeout=10, allow_reconnect=False)
        try:
            info = await js.jetstream().stream_info(live.settings.nats_stream)
            assert info.config.num_replicas == 3 and info.state.messages >= 2
        finally:
            await js.close()


async def test_mqtts_the_api_and_a_lock_reach_the_cluster_over_tls(tmp_path: Path) -> None:
    """`--tls-cert/--tls-key`: the nodes' MQTT listeners speak TLS only; the API (mqtts://, LATCH_BROKER_CA) and a
    lock verifying the nodes' certificate unlock through them; a plain MQTT client is not let in."""
    from tests.broker.test_listeners import CA, x509
    from tests.support import require

    require(x509 is not None, "the cryptography package (to make test certificates)")
    ca = CA(tmp_path / "pki", "Latch Test CA")
    cert, key = ca.issue("broker", server=True)
    async with api_on_cluster(tmp_path, tls=(cert, key), broker_ca=ca.path) as (live, cluster):
        assert live.settings.broker.startswith("mqtts://")
        creds = Credentials.from_registration(await live.register("bike-tls"))
        lock = SimulatedLock(creds, Behaviour(actuation_delay_s=0.01))
        live.locks.append(lock)
        n1, n2, n3 = cluster.mqtt_addresses
        await lock.start(*n2, tls=live.settings.broker_tls(), fallbacks=[n3, n1])   # type: ignore[arg-type]
        await live.wait_presence("bike-tls", True)
        r = await live.command("bike-tls", "unlock", wait=20)
        assert r.json()["status"] == "succeeded", r.text
        with pytest.raises(MqttConnectError):
            await nats_client(n1, "bike-tls", "bike-tls", creds.mqtt_password, timeout=3)   # no TLS: no CONNACK

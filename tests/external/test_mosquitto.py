"""Latch against Debian's Mosquitto 2.0.11, configured by `latch broker-config mosquitto`: the fence holds
there too, the API and simulated locks work through it unchanged, and registering, rotating and revoking
a device take effect at the reload the API triggers.

Negative checks ("nothing arrived") are made with a marker: the forbidden message is sent first and a
permitted one after it on the same connection; Mosquitto keeps one publisher's messages in order, so once
the marker has arrived, a forbidden message that got through would already be there.
"""

from __future__ import annotations

import asyncio
import stat
import sys
from pathlib import Path

import pytest

from api import schema
from api.db import Database
from api.models import DeviceCreate
from api.registry import mosquitto_config
from api.registry.devices import DeviceRegistry
from broker.identity import SERVICE_USERNAME
from device_sim.lock import Behaviour, Credentials, SimulatedLock
from mqtt_client import MqttClient, MqttConnectError
from protocol import topics
from tests.external.mosquitto import require_mosquitto, running_mosquitto
from tests.external.support import Recorder, api_before_mosquitto, client
from tests.support import make_settings

pytestmark = pytest.mark.timeout(120)


async def test_a_device_cannot_read_or_write_another_devices_topics_on_mosquitto(tmp_path: Path) -> None:
    require_mosquitto()
    settings = make_settings(tmp_path)
    settings.ensure_secrets()
    db = Database(settings.resolved_database_url())
    await schema.upgrade(db)
    registry = DeviceRegistry(db)
    creds = {d: (await registry.register(DeviceCreate(id=d))).mqtt_password for d in ("bike-a", "bike-b", "bike-c")}
    out = tmp_path / "mosquitto" / "latch"
    written = await mosquitto_config.generate(db, settings.service_secret or "", out)
    await db.close()
    assert written.devices == 3 and not written.skipped

    async with running_mosquitto(out) as mq:
        seen_by_service = Recorder()
        service = await client(mq.port, "observer", SERVICE_USERNAME, settings.service_secret or "", seen_by_service)
        assert await service.subscribe([("latch/v1/#", 1)]) == [1]
        got_a, got_b = Recorder(), Recorder()
        a = await client(mq.port, "bike-a", "bike-a", creds["bike-a"], got_a)
        b = await client(mq.port, "bike-b", "bike-b", creds["bike-b"], got_b)
        try:
            # B's own traffic passes (the positive control): its retained state and its command topic
            b.publish(topics.state_topic("bike-b"), b'{"locked": true}', qos=1, retain=True)
            await seen_by_service.wait_for(topics.state_topic("bike-b"))
            assert await b.subscribe([(topics.cmd_topic("bike-b"), 1)]) == [1]

            # A tries to read B's commands, directly and through wildcards. Mosquitto 2.0.11 grants every
            # SUBSCRIBE (SUBACK QoS 1) and checks each message against the ACL as it is delivered.
            await a.subscribe([(topics.cmd_topic("bike-b"), 1), ("latch/v1/d/+/cmd", 1), ("latch/v1/d/bike-b/#", 1),
                               ("#", 1), (topics.cmd_topic("bike-a"), 1)])
            service.publish(topics.cmd_topic("bike-b"), b"for-b-only", qos=1)
            service.publish(topics.cmd_topic("bike-a"), b"marker-a", qos=1)
            await got_b.wait_for(topics.cmd_topic("bike-b"), b"for-b-only")
            await got_a.wait_for(topics.cmd_topic("bike-a"), b"marker-a")
            assert set(got_a.topics()) == {topics.cmd_topic("bike-a")}, got_a.messages   # not B's retained state either

            # A tries to write B's uplink (a forged ack, a forged retained state, presence), then a marker of its own
            await seen_by_service.wait_for(topics.cmd_topic("bike-a"), b"marker-a")   # the service's own echo
            mark = len(seen_by_service.messages)
            a.publish(topics.ack_topic("bike-b"), b"forged-ack", qos=1)
            a.publish(topics.state_topic("bike-b"), b'{"locked": false}', qos=1, retain=True)
            a.publish(topics.presence_topic("bike-b"), b"offline", qos=1, retain=True)
            a.publish(topics.cmd_topic("bike-b"), b"forged-cmd", qos=1)     # nor commands to anyone
            a.publish(topics.telemetry_topic("bike-a"), b"marker-a-up", qos=1)
            await seen_by_service.wait_for(topics.telemetry_topic("bike-a"), b"marker-a-up")
            assert seen_by_service.messages[mark:] == [(topics.telemetry_topic("bike-a"), b"marker-a-up")]
            assert (topics.cmd_topic("bike-b"), b"forged-cmd") not in got_b.messages

            # a new subscription still gets B's own retained state, not A's forgery (one service connection
            # only: with use_username_as_clientid a second one would take this one's place)
            mark = len(seen_by_service.messages)
            await service.subscribe([(topics.state_topic("bike-b"), 1)])
            i = await seen_by_service.wait_for(topics.state_topic("bike-b"), after=mark)
            assert seen_by_service.messages[i][1] == b'{"locked": true}'

            # C logging in with B's client id does not take over B's session (use_username_as_clientid)
            b_connects: list[bool] = []
            b.on_connect_callbacks.append(b_connects.append)
            squatter = await client(mq.port, "bike-b", "bike-c", creds["bike-c"])
            service.publish(topics.cmd_topic("bike-b"), b"still-b", qos=1)
            await got_b.wait_for(topics.cmd_topic("bike-b"), b"still-b")
            assert b_connects == [] and b.is_connected
            await squatter.disconnect()

            # wrong password, unknown device, no credentials: refused (CONNACK 5)
            for username, password in (("bike-a", creds["bike-b"]), ("bike-zz", creds["bike-a"]),
                                       (SERVICE_USERNAME, creds["bike-a"])):
                with pytest.raises(MqttConnectError):
                    await client(mq.port, username, username, password)
            anonymous = MqttClient("anon", clean_session=True, reconnect_delay=0.2)
            with pytest.raises(MqttConnectError):
                await anonymous.connect("127.0.0.1", mq.port)
        finally:
            for c in (a, b, service):
                await c.disconnect()


async def test_unlock_round_trip_and_register_rotate_revoke_through_mosquitto(tmp_path: Path) -> None:
    require_mosquitto()
    async with api_before_mosquitto(tmp_path) as (live, mq):
        # the API reached Mosquitto as its service identity (client id forced to the username)
        assert mq.find(rf"New client connected from .* as {SERVICE_USERNAME} ") is not None, mq.log()

        # registering through the API rewrites the files and reloads Mosquitto: the new lock connects at once
        mark = mq.mark()
        lock = await live.lock("bike-0001")
        assert mq.find(r"Reloading config\.", mark) is not None
        r = await live.command("bike-0001", "unlock")
        assert r.json()["status"] == "succeeded", r.text
        assert [a for _, a in lock.actuations] == ["unlock"]
        assert (await live.http.get("/v1/devices/bike-0001")).json()["reported"]["locked"] is False

        # rotating: Mosquitto re-checks connected clients at the reload and drops the old secret's connection
        old_password = lock.creds.mqtt_password
        connects: list[bool] = []
        lock.client.on_connect_callbacks.append(connects.append)
        r = await live.http.post("/v1/devices/bike-0001/credentials")
        assert r.status_code == 200
        new = r.json()
        await asyncio.wait_for(lock.client.disconnected.wait(), 10)
        with pytest.raises(MqttConnectError):
            await client(mq.port, "bike-0001", "bike-0001", old_password)
        await lock.stop(abrupt=True)   # its client would retry the old secret
        lock2 = SimulatedLock(Credentials.from_registration(new), Behaviour(actuation_delay_s=0.01))
        live.locks.append(lock2)
        await live.start_lock(lock2)
        r = await live.command("bike-0001", "lock")
        assert r.json()["status"] == "succeeded", r.text

        # revoking: 200 with the device; Mosquitto drops the connection at the reload and refuses it after
        mark = mq.mark()
        r = await live.http.delete("/v1/devices/bike-0001")
        assert r.status_code == 200 and r.json()["revoked"] is True and r.json()["id"] == "bike-0001"
        await asyncio.wait_for(lock2.client.disconnected.wait(), 10)
        await mq.wait_log(r"Client bike-0001 disconnected", after=mark)
        with pytest.raises(MqttConnectError):
            await client(mq.port, "bike-0001", "bike-0001", new["mqtt_password"])
        # Mosquitto drops it without publishing its will; the API announces it offline in its place
        await live.wait_presence("bike-0001", False)
        r = await live.command("bike-0001", "unlock")
        assert r.status_code == 409 and "revoked" in r.text, r.text       # and the API sends it nothing

        assert (await live.http.delete("/v1/devices/nope")).status_code == 404
        assert "bike-0001" not in (mq.pid_file.parent / "latch" / "password_file").read_text()
        assert live.stack._server.config.app.state.mosquitto.failures == 0   # type: ignore[union-attr]


async def test_broker_config_cli_writes_the_files_and_reloads_mosquitto(tmp_path: Path) -> None:
    require_mosquitto()
    data = tmp_path / "data"
    settings = make_settings(tmp_path)
    settings.ensure_secrets()
    db = Database(settings.resolved_database_url())
    await schema.upgrade(db)
    registry = DeviceRegistry(db)
    creds = (await registry.register(DeviceCreate(id="bike-x"))).mqtt_password
    out = tmp_path / "mosquitto" / "latch"
    cli = [sys.executable, "-m", "latch.cli", "broker-config", "mosquitto", "--out", str(out), "--data-dir", str(data)]
    if settings.database_url:
        cli += ["--database-url", settings.database_url]

    async def run(*extra: str) -> str:
        proc = await asyncio.create_subprocess_exec(*cli, *extra, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stdout.decode()
        return stdout.decode()

    printed = await run("--port", "1883")
    assert "1 device(s)" in printed and "password_file" in printed
    assert stat.S_IMODE((out / "password_file").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "acl_file").stat().st_mode) == 0o644
    lines = (out / "password_file").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == [SERVICE_USERNAME, "bike-x"]
    conf = (out / "latch.conf").read_text()
    for needle in ("listener 1883 127.0.0.1", "allow_anonymous false", f"password_file {out.resolve()}/password_file",
                   f"acl_file {out.resolve()}/acl_file", "use_username_as_clientid true"):
        assert needle in conf

    async with running_mosquitto(out) as mq:
        with pytest.raises(MqttConnectError):
            await client(mq.port, "bike-y", "bike-y", "whatever")
        y = (await registry.register(DeviceCreate(id="bike-y"))).mqtt_password   # not through the API: no reload
        with pytest.raises(MqttConnectError):
            await client(mq.port, "bike-y", "bike-y", y)
        mark = mq.mark()
        printed = await run("--port", str(mq.port), "--reload-pid-file", str(mq.pid_file))
        assert f"SIGHUP sent to Mosquitto (pid {mq.proc.pid})" in printed
        await mq.wait_log(r"Reloading config\.", after=mark)
        for device, password in (("bike-y", y), ("bike-x", creds)):
            c = await client(mq.port, device, device, password)
            await c.disconnect()
        before = (out / "password_file").read_text()
        printed = await run("--port", str(mq.port))                              # nothing changed: untouched
        assert "unchanged" in printed and (out / "password_file").read_text() == before
    await db.close()

    proc = await asyncio.create_subprocess_exec(*cli, "--reload-pid-file", str(tmp_path / "no.pid"),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and b"cannot read Mosquitto's pid file" in stdout, stdout


async def test_a_failed_reload_is_logged_and_the_api_keeps_serving(tmp_path: Path) -> None:
    require_mosquitto()
    async with api_before_mosquitto(tmp_path) as (live, mq):
        sync = live.stack._server.config.app.state.mosquitto   # type: ignore[union-attr]
        sync.pid_file = tmp_path / "gone.pid"                  # Mosquitto cannot be told any more
        r = await live.http.post("/v1/devices", json={"id": "bike-0002"})
        assert r.status_code == 201                            # registered all the same
        password = r.json()["mqtt_password"]
        assert sync.failures == 1
        assert "bike-0002" in (tmp_path / "mosquitto" / "latch" / "password_file").read_text()
        with pytest.raises(MqttConnectError):                   # Mosquitto still has the old files
            await client(mq.port, "bike-0002", "bike-0002", password)
        # the next sync (any change, or this one with none) delivers the reload the failed one owed
        sync.pid_file = mq.pid_file
        reloads = sync.reloads
        assert await sync.sync("retry") is True
        assert sync.reloads == reloads + 1 and sync.failures == 1
        c = await client(mq.port, "bike-0002", "bike-0002", password)
        await c.disconnect()


async def test_api_replicas_keep_their_own_client_ids_on_the_service_listener_devices_do_not(tmp_path: Path) -> None:
    """Several API replicas share the service username; on the devices' listener Mosquitto forces the
    client id to the username (so they would take each other's place), on the service listener it does not."""
    require_mosquitto()
    async with api_before_mosquitto(tmp_path) as (live, mq):
        secret = live.settings.service_secret or ""
        assert mq.service_port is not None
        replicas = [await client(mq.service_port, f"latch-api-{i}", SERVICE_USERNAME, secret) for i in (2, 3)]
        try:
            for i in (2, 3):
                await mq.wait_log(rf"New client connected from .* as latch-api-{i} .*u'{SERVICE_USERNAME}'")
            # both stay connected: a round trip through each proves it
            for r in replicas:
                rec = Recorder()
                probe = await client(mq.service_port, f"probe-{id(r)}", SERVICE_USERNAME, secret, handler=rec)
                await probe.subscribe([("latch/v1/d/x/state", 1)])
                r.publish("latch/v1/d/x/state", b"{}", qos=1)
                await rec.wait_for("latch/v1/d/x/state")
                await probe.disconnect()
                assert r.is_connected
            # a device on its own listener: whatever client id it asks for, it gets its username
            creds = Credentials.from_registration(await live.register("bike-id"))
            mark = mq.mark()
            dev = await client(mq.port, "latch-api-2", creds.device_id, creds.mqtt_password)
            await mq.wait_log(r"New client connected from .* as bike-id .*u'bike-id'", mark)
            assert all(r.is_connected for r in replicas)
            await dev.disconnect()
        finally:
            for r in replicas:
                await r.disconnect()

"""The simulator keeps the firmware's promises (issue 12, defect 10), tested over the real broker and real MQTT:

- once-only across a restart: the controller's record is persisted (firmware/store.py format) before
  the lock acts on it, so a restarted lock answers a replayed command from the record, never actuating;
- an answer made while the link is down is sent after the reconnect (firmware/mqtt.py's queue);
- the controller's periodic tick runs: actuation watchdog, heartbeat state, telemetry;
- after a reconnect the lock announces presence and state again.
"""

from __future__ import annotations

import binascii
import json
from pathlib import Path

from device_sim.actuations import read_actuations
from device_sim.lock import Behaviour, Credentials, SimulatedLock
from device_sim.outbox import MAX_QUEUED, Outbox
from device_sim.store import state_path
from firmware.store import decode
from mqtt_client import MqttClient
from protocol import messages, topics
from tests.device_sim.relay import Relay
from tests.support import LiveStack, eventually


async def _replay(stack, lock, device_id: str, cid: str, client_id: str) -> dict:  # type: ignore[no-untyped-def]
    """Publish command `cid`'s signed message again, as the service identity; the lock's answer to it."""
    svc = await _service_client(stack, client_id)
    try:
        svc.publish(topics.cmd_topic(device_id), await _signed_bytes(stack, cid), qos=1)
        await eventually(lambda: any(a["id"] == cid for a in lock.answers), what="the restarted lock's answer")
    finally:
        await svc.disconnect()
    return [a for a in lock.answers if a["id"] == cid][-1]


async def _service_client(stack: LiveStack, client_id: str, handler=None) -> MqttClient:  # type: ignore[no-untyped-def]
    from broker.identity import SERVICE_USERNAME
    c = MqttClient(client_id, username=SERVICE_USERNAME, password=stack.settings.service_secret,
                   clean_session=True, handler=handler)
    await c.connect(stack.mqtt_host, stack.mqtt_port)
    return c


async def _signed_bytes(stack: LiveStack, command_id: str) -> bytes:
    """The signed command exactly as the API sent it (rebuilt from its row and the device's key)."""
    row = await stack.runtime.commands.get(command_id)
    device = await stack.runtime.registry.get(row.device_id)
    return messages.encode_command(messages.make_command(
        row.id, row.device_id, row.action, row.params, row.created_at, row.expires_at,
        key=binascii.unhexlify(device.command_key)))


async def _sim_lock(stack: LiveStack, creds: Credentials, data_dir: Path | None, behaviour: Behaviour | None = None,
                    port: int | None = None, **config: object) -> SimulatedLock:
    lock = SimulatedLock(creds, behaviour or Behaviour(actuation_delay_s=0.01), data_dir=data_dir, config=config)
    stack.locks.append(lock)   # stopped by the fixture
    await lock.start(stack.mqtt_host, port or stack.mqtt_port)
    await stack.wait_presence(lock.device_id, True)
    return lock


def _actuated(data_dir: Path, command_id: str) -> list[dict]:
    return [a for a in read_actuations(data_dir) if a["event"] == "actuate" and a["command_id"] == command_id]


async def test_a_restarted_lock_answers_a_replayed_command_from_its_record_and_does_not_actuate(
        stack: LiveStack, tmp_path: Path) -> None:
    data_dir = tmp_path / "sim"
    creds = Credentials.from_registration(await stack.register("rs-1"))
    first = await _sim_lock(stack, creds, data_dir)
    done = (await stack.command("rs-1", "unlock", ttl_s=120)).json()
    assert done["status"] == "succeeded"
    cid = done["id"]
    assert [(a["action"], a["before_expiry"]) for a in _actuated(data_dir, cid)] == [("unlock", True)]

    await first.stop(abrupt=True)            # the process dies (kill -9): no goodbye, the will fires
    await stack.wait_presence("rs-1", False)
    again = await _sim_lock(stack, creds, data_dir)   # the same lock, restarted with the same data dir
    answer = await _replay(stack, again, "rs-1", cid, "replayer")
    assert answer["result"] == messages.SUCCEEDED        # answered from the record ...
    assert again.actuations == []                        # ... not actuated again
    assert len(_actuated(data_dir, cid)) == 1            # the actuation record agrees: one execution in all


async def test_the_record_is_durable_in_the_firmware_format_before_the_lock_says_succeeded(
        stack: LiveStack, tmp_path: Path) -> None:
    data_dir = tmp_path / "sim"
    creds = Credentials.from_registration(await stack.register("rs-3"))
    await _sim_lock(stack, creds, data_dir)
    done = (await stack.command("rs-3", "unlock")).json()
    assert done["status"] == "succeeded"
    # read at once, no waiting: the lock published "succeeded" only after this was on disk
    seq_record = decode(state_path(data_dir, "rs-3").read_bytes())
    assert seq_record is not None, "the state file is not in firmware/store.py's format"
    row = await stack.runtime.commands.get(done["id"])
    assert seq_record[1]["executed"] == [[done["id"], row.expires_at, messages.SUCCEEDED, None]]


async def test_a_lock_restarted_mid_actuation_reports_it_interrupted_and_does_not_redo_it(
        stack: LiveStack, tmp_path: Path) -> None:
    """Power lost while the motor ran: the record says in progress; at the next start the controller makes
    that failed / interrupted, and a redelivery is answered so, never actuated a second time."""
    data_dir = tmp_path / "sim"
    creds = Credentials.from_registration(await stack.register("rs-2"))
    first = await _sim_lock(stack, creds, data_dir, Behaviour(hang_rate=1.0))
    r = await stack.command("rs-2", "unlock", wait=0, ttl_s=120)
    cid = r.json()["id"]
    await eventually(lambda: first.actuations, what="the motor to start")
    await first.stop(abrupt=True)
    again = await _sim_lock(stack, creds, data_dir)
    answer = await _replay(stack, again, "rs-2", cid, "replayer-2")
    assert (answer["result"], answer.get("reason")) == (messages.FAILED, "interrupted by restart")
    assert again.actuations == [] and len(_actuated(data_dir, cid)) == 1


async def test_an_answer_made_while_the_link_is_down_arrives_after_the_reconnect(
        stack: LiveStack, tmp_path: Path) -> None:
    relay = Relay(stack.mqtt_host, stack.mqtt_port)
    port = await relay.start()
    try:
        creds = Credentials.from_registration(await stack.register("ln-1"))
        # a motor slow enough that the cut surely lands while it runs, even on a busy machine
        lock = await _sim_lock(stack, creds, tmp_path / "sim", Behaviour(actuation_delay_s=1.5), port=port)
        cid = (await stack.command("ln-1", "unlock", wait=0)).json()["id"]
        await eventually(lambda: lock.actuations, what="the motor to start")
        relay.cut()                                       # the link goes down while the motor runs
        await eventually(lambda: any(a["id"] == cid and a["result"] == messages.SUCCEEDED for a in lock.answers),
                         what="the lock to finish the unlock while offline")
        history = (await stack.http.get(f"/v1/commands/{cid}")).json()["history"]
        assert "device_succeeded" not in [h["event"] for h in history]   # the API has not heard it yet
        relay.restore()
        final = (await stack.http.get(f"/v1/commands/{cid}", params={"wait": 10})).json()
        assert final["status"] == "succeeded", final
        assert lock.reconnects >= 1
    finally:
        await relay.close()


async def test_after_a_reconnect_the_lock_announces_presence_and_state_again(
        stack: LiveStack, tmp_path: Path) -> None:
    relay = Relay(stack.mqtt_host, stack.mqtt_port)
    port = await relay.start()
    try:
        creds = Credentials.from_registration(await stack.register("ln-2"))
        lock = await _sim_lock(stack, creds, None, port=port)
        relay.cut()
        await stack.wait_presence("ln-2", False)          # the broker published the lock's will
        relay.restore()
        await stack.wait_presence("ln-2", True)           # the lock said "online" again after reconnecting
        assert lock.reconnects >= 1
        assert (await stack.command("ln-2", "unlock")).json()["status"] == "succeeded"
    finally:
        await relay.close()


async def test_the_watchdog_ends_an_actuation_whose_driver_never_returns(stack: LiveStack) -> None:
    creds = Credentials.from_registration(await stack.register("wd-1"))
    await _sim_lock(stack, creds, None, Behaviour(hang_rate=1.0), actuation_timeout_ms=300, tick_ms=20)
    r = (await stack.command("wd-1", "unlock", wait=5)).json()
    assert (r["status"], r["reason"]) == ("failed", messages.REASON_ACTUATION_TIMEOUT)


async def test_heartbeat_state_and_telemetry_follow_the_firmware_schedule(stack: LiveStack) -> None:
    seen: dict[str, int] = {"state": 0, "telemetry": 0}

    async def count(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        for kind in seen:
            if topic.endswith("/" + kind):
                seen[kind] += 1

    creds = Credentials.from_registration(await stack.register("hb-1"))
    svc = await _service_client(stack, "listener", handler=count)
    try:
        await svc.subscribe([(topics.state_topic("hb-1"), 1), (topics.telemetry_topic("hb-1"), 0)])
        await _sim_lock(stack, creds, None, heartbeat_s=0.2, telemetry_s=0.3, tick_ms=20)
        # nothing changes on the lock: every further state is a heartbeat, every telemetry a tick's
        await eventually(lambda: seen["state"] >= 5 and seen["telemetry"] >= 3, timeout=10,
                         what=f"heartbeats and telemetry (seen {seen})")
    finally:
        await svc.disconnect()


def test_the_outbox_keeps_the_firmware_queue_rules() -> None:
    box = Outbox()                                   # no link at all: everything waits
    box.publish("t/state", b"1", 1, True)
    box.publish("t/state", b"2", 1, True)            # supersedes the unsent retained one
    assert [q.payload for q in box.pending] == [b"2"]
    box.publish("t/telemetry", b"x", 0, False)       # QoS 0 offline: dropped
    assert len(box.pending) == 1
    for i in range(MAX_QUEUED + 3):
        box.publish("t/ack", json.dumps(i).encode(), 1, False)
    assert len(box.pending) == MAX_QUEUED            # bounded: the oldest went
    assert box.pending[-1].payload == str(MAX_QUEUED + 2).encode()
    assert box.dropped == 4
    big = Outbox(max_bytes=1536)                     # a bound in bytes too, when one is set
    for i in range(3):
        big.publish("t/ack", bytes([48 + i]) * 700, 1, False)
    assert [q.payload[:1] for q in big.pending] == [b"1", b"2"]
    assert sum(q.size for q in big.pending) <= 1536


def test_the_outbox_bound_is_the_firmware_s() -> None:
    """firmware/mqtt.py cannot be imported under CPython (MicroPython's ticks_ms): read its constant, so a
    change to the firmware's queue fails here until the simulator follows it."""
    import re

    source = (Path(__file__).parents[2] / "firmware" / "mqtt.py").read_text()
    found = re.search(r"^_MAX_QUEUED = const\((\d+)\)", source, re.M)
    assert found is not None, "firmware/mqtt.py no longer defines _MAX_QUEUED: follow its new queue rules"
    assert int(found.group(1)) == MAX_QUEUED
    assert "_MAX_QUEUED_BYTES" not in source, "the firmware bounds its queue in bytes now: set Outbox.max_bytes"

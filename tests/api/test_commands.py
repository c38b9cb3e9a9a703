"""Commands end to end: real broker, real API on a socket, simulated locks over real MQTT."""

from __future__ import annotations

import asyncio

from device_sim.lock import Behaviour
from mqtt_client import MqttClient
from protocol import messages, topics
from tests.support import LiveStack, eventually


def statuses(body: dict) -> list[str | None]:
    return [h["to_status"] for h in body["history"] if h["applied"]]


async def test_unlock_round_trip(stack: LiveStack) -> None:
    lock = await stack.lock("bike-1")
    r = await stack.command("bike-1", "unlock")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["final"] is True
    assert statuses(body) == ["queued", "sent", "received", "succeeded"]
    assert lock.actuations == [(body["id"], "unlock")]
    device = (await stack.http.get("/v1/devices/bike-1")).json()
    assert device["reported"]["locked"] is False and device["online"] is True
    # and back: the reported state follows the sensor
    r = await stack.command("bike-1", "lock")
    assert r.json()["status"] == "succeeded"
    assert (await stack.http.get("/v1/devices/bike-1")).json()["reported"]["locked"] is True


async def test_jammed_lock_reports_failed_with_reason_and_sensor_state(stack: LiveStack) -> None:
    await stack.lock("bike-j", Behaviour(actuation_delay_s=0.01, jam_rate=1.0))
    body = (await stack.command("bike-j", "unlock")).json()
    assert body["status"] == "failed" and body["reason"] == messages.REASON_JAMMED
    assert (await stack.http.get("/v1/devices/bike-j")).json()["reported"]["locked"] is True


async def test_idempotency_same_body_same_command_different_body_409(stack: LiveStack) -> None:
    lock = await stack.lock("bike-2")
    headers = {"Idempotency-Key": "tap-123"}
    first = await stack.http.post("/v1/devices/bike-2/commands", params={"wait": 5},
                                  json={"action": "unlock"}, headers=headers)
    again = await stack.http.post("/v1/devices/bike-2/commands", json={"action": "unlock"}, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(lock.actuations) == 1
    other = await stack.http.post("/v1/devices/bike-2/commands", json={"action": "lock"}, headers=headers)
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]


async def test_wait_returns_early_and_get_can_wait_too(stack: LiveStack) -> None:
    await stack.lock("bike-3", Behaviour(actuation_delay_s=0.3))
    r = await stack.command("bike-3", "unlock", wait=0)
    assert r.json()["status"] in ("sent", "received")
    got = await stack.http.get(f"/v1/commands/{r.json()['id']}", params={"wait": 5})
    assert got.json()["status"] == "succeeded"
    # a wait that ends before the outcome answers with the state as it then is
    r2 = await stack.command("bike-3", "lock", wait=0.05)
    assert r2.json()["status"] in ("sent", "received") and r2.json()["final"] is False


async def test_wait_is_bounded_by_the_api(stack: LiveStack) -> None:
    await stack.lock("bike-w")
    r = await stack.http.post("/v1/devices/bike-w/commands", params={"wait": 61}, json={"action": "unlock"})
    assert r.status_code == 422 and "wait" in r.text


async def test_offline_unlock_fails_fast_but_other_actions_wait_until_online(stack: LiveStack) -> None:
    lock = await stack.lock("bike-4", online=False)
    r = await stack.command("bike-4", "unlock", wait=0)
    assert r.json()["status"] == "failed" and "device offline" in r.json()["reason"]
    locate = await stack.command("bike-4", "locate", wait=0, ttl_s=30)
    assert locate.json()["status"] == "queued"
    await stack.start_lock(lock)
    done = await stack.http.get(f"/v1/commands/{locate.json()['id']}", params={"wait": 5})
    assert done.json()["status"] == "succeeded"
    assert [a for _, a in lock.actuations] == ["beep"]      # the unlock never fired


async def test_queued_command_expires_after_its_ttl(stack: LiveStack) -> None:
    await stack.lock("bike-5", online=False)
    r = await stack.command("bike-5", "report", wait=0, ttl_s=1)
    assert r.json()["status"] == "queued"
    done = await stack.http.get(f"/v1/commands/{r.json()['id']}", params={"wait": 5})
    assert done.json()["status"] == "expired"
    assert "expired before it could be delivered" in done.json()["reason"]


async def test_command_times_out_when_the_device_never_answers(stack: LiveStack) -> None:
    lock = await stack.lock("bike-6", Behaviour(drop_rate=1.0))
    r = await stack.command("bike-6", "unlock", wait=5, ttl_s=1)
    body = r.json()
    assert body["status"] == "timed_out" and statuses(body)[-1] == "timed_out"
    assert lock.actuations == []


async def test_device_goes_offline_abruptly_and_its_will_marks_it_offline(stack: LiveStack) -> None:
    lock = await stack.lock("bike-7")
    await lock.stop(abrupt=True)
    await stack.wait_presence("bike-7", False)
    r = await stack.command("bike-7", "unlock", wait=0)
    assert r.json()["status"] == "failed"


async def _service_client(stack: LiveStack, client_id: str) -> MqttClient:
    from broker.identity import SERVICE_USERNAME
    c = MqttClient(client_id, username=SERVICE_USERNAME, password=stack.settings.service_secret,
                   clean_session=True)
    await c.connect(stack.mqtt_host, stack.mqtt_port)
    return c


async def test_duplicate_and_late_acks_are_recorded_but_never_move_a_final_state(stack: LiveStack) -> None:
    lock = await stack.lock("bike-8")
    body = (await stack.command("bike-8", "unlock")).json()
    assert body["status"] == "succeeded"
    cid = body["id"]
    # the lock answers again (a QoS 1 redelivery) and then contradicts itself (late/bogus)
    for result in (messages.SUCCEEDED, messages.RECEIVED, messages.FAILED):
        lock.client.publish(topics.ack_topic("bike-8"), messages.encode_ack(cid, result, 0, "late"), qos=1)

    async def recorded() -> list[dict] | None:
        hist = (await stack.http.get(f"/v1/commands/{cid}")).json()["history"]
        ignored = [h for h in hist if not h["applied"]]
        return ignored if len(ignored) >= 3 else None

    ignored = await eventually(recorded, what="three unapplied history entries")
    # the API handles messages concurrently, so their order in the history may differ
    assert sorted(h["event"] for h in ignored) == ["device_failed", "device_received", "device_succeeded"]
    final = (await stack.http.get(f"/v1/commands/{cid}")).json()
    assert final["status"] == "succeeded" and final["reason"] is None


async def test_redelivered_command_is_answered_again_but_actuated_once(stack: LiveStack) -> None:
    lock = await stack.lock("bike-9")
    body = (await stack.command("bike-9", "unlock")).json()
    cmd_payload = None
    # replay the exact signed command the API sent, as a QoS 1 redelivery would
    row = await stack.runtime.commands.get(body["id"])
    device = await stack.runtime.registry.get("bike-9")
    import binascii
    cmd_payload = messages.encode_command(messages.make_command(
        row.id, row.device_id, row.action, row.params, row.created_at, row.expires_at,
        key=binascii.unhexlify(device.command_key)))
    svc = await _service_client(stack, "replayer")
    try:
        answers_before = len(lock.answers)
        svc.publish(topics.cmd_topic("bike-9"), cmd_payload, qos=1)
        await eventually(lambda: len(lock.answers) > answers_before, what="the lock to answer the replay")
    finally:
        await svc.disconnect()
    assert lock.answers[-1]["result"] == messages.SUCCEEDED
    assert len(lock.actuations) == 1


async def test_forged_command_is_rejected_by_the_lock(stack: LiveStack) -> None:
    lock = await stack.lock("bike-f")
    forged = messages.make_command("f" * 32, "bike-f", "unlock", {}, 0, 2**41, key=b"not the key")
    svc = await _service_client(stack, "forger")
    try:
        svc.publish(topics.cmd_topic("bike-f"), messages.encode_command(forged), qos=1)
        await eventually(lambda: lock.answers, what="the lock's answer")
    finally:
        await svc.disconnect()
    assert lock.answers[-1]["result"] == messages.REJECTED
    assert lock.answers[-1]["reason"] == messages.REASON_BAD_SIGNATURE
    assert lock.actuations == []


async def test_ack_for_another_devices_command_is_refused(stack: LiveStack) -> None:
    victim = await stack.lock("bike-a", Behaviour(drop_rate=1.0))
    attacker = await stack.lock("bike-b")
    cmd = (await stack.command("bike-a", "unlock", wait=0, ttl_s=30)).json()
    # 1. on the victim's topic: the broker refuses the publish
    attacker.client.publish(topics.ack_topic("bike-a"), messages.encode_ack(cmd["id"], messages.SUCCEEDED, 0), qos=1)
    # 2. on its own topic, naming the victim's command: the API refuses it
    attacker.client.publish(topics.ack_topic("bike-b"), messages.encode_ack(cmd["id"], messages.SUCCEEDED, 0), qos=1)
    await eventually(lambda: stack.metrics(), what="metrics")

    async def refused() -> bool:
        return (await stack.metrics()).get("dropped_foreign_ack", 0) >= 1

    await eventually(refused, what="the foreign ack to be counted")
    now = (await stack.http.get(f"/v1/commands/{cmd['id']}")).json()
    assert now["status"] == "sent" and all(h["event"] != "device_succeeded" for h in now["history"])
    assert victim.actuations == []


async def test_malformed_and_oversize_payloads_are_counted_and_everyone_else_is_served(stack: LiveStack) -> None:
    noisy = await stack.lock("bike-n")
    await stack.lock("bike-ok")
    garbage = [b"", b"\xff\x00", b"not json", b"[]", b'{"v": 1}', b'{"v": 9, "id": "x", "result": "received"}',
               b"{" + b" " * (messages.MAX_PAYLOAD + 10) + b"}"]
    for payload in garbage:
        noisy.client.publish(topics.ack_topic("bike-n"), payload, qos=1)
    noisy.client.publish(topics.state_topic("bike-n"), b'{"v": 1, "battery": "full"}', qos=1)
    noisy.client.publish(topics.presence_topic("bike-n"), b"sleepy", qos=1)

    async def counted() -> bool:
        return (await stack.metrics()).get("dropped_malformed", 0) >= len(garbage) + 2

    await eventually(counted, what="every malformed payload to be counted")
    r = await stack.command("bike-ok", "unlock")
    assert r.json()["status"] == "succeeded"
    assert (await stack.http.get("/healthz")).json()["status"] == "ok"


async def test_many_commands_in_parallel_all_reach_a_final_state(stack: LiveStack) -> None:
    locks = [await stack.lock(f"bike-p{i}", Behaviour(actuation_delay_s=0.01)) for i in range(5)]
    rs = await asyncio.gather(*(stack.command(f"bike-p{i % 5}", "locate" if i % 2 else "report")
                                for i in range(40)))
    assert all(r.status_code in (200, 201) for r in rs), [(r.status_code, r.text) for r in rs]
    bodies = [r.json() for r in rs]
    assert all(b["final"] for b in bodies), [b["status"] for b in bodies]
    locates = [b for b in bodies if b["action"] == "locate"]
    # a lock that is already beeping refuses another actuation ("busy") rather than queueing it
    assert all(b["status"] == "succeeded" or b["reason"] == messages.REASON_BUSY for b in locates)
    beeped = sum(b["status"] == "succeeded" for b in locates)
    assert sum(len(lock.actuations) for lock in locks) == beeped   # one beep per accepted locate, none for reports
    assert all(b["status"] == "succeeded" for b in bodies if b["action"] == "report")


async def test_a_state_report_repeating_the_acks_state_costs_no_write(stack: LiveStack) -> None:
    """The lock reports its state in the final ack and again, retained, right after: the second is not
    written again (docs/performance.md), and the device's record is right either way."""
    from tests.support import eventually

    await stack.lock("bike-rep")
    r = await stack.command("bike-rep", "unlock")
    assert r.json()["status"] == "succeeded"
    await eventually(lambda: stack.runtime.metrics.counts.get("state_reports_repeating_an_ack", 0) >= 1,
                     what="the repeated state report recognised")
    assert (await stack.http.get("/v1/devices/bike-rep")).json()["reported"]["locked"] is False
    r = await stack.command("bike-rep", "lock")
    assert r.json()["status"] == "succeeded"
    assert (await stack.http.get("/v1/devices/bike-rep")).json()["reported"]["locked"] is True


async def test_the_wait_answer_is_what_the_database_holds(stack: LiveStack) -> None:
    """`?wait=` answers from the change that made the command final (no read back): the answer must equal
    what a later read of the command returns, history and all, for a success, a device's failure and a
    command failed at once."""
    await stack.lock("bike-w1")
    await stack.lock("bike-w2", Behaviour(actuation_delay_s=0.01, jam_rate=1.0))
    await stack.lock("bike-w3", online=False)
    before = (await stack.metrics()).get("wait_answers_in_hand", 0)
    answers = [(await stack.command(d, "unlock")).json() for d in ("bike-w1", "bike-w2", "bike-w3")]
    assert (await stack.metrics()).get("wait_answers_in_hand", 0) - before == 3   # none was read back
    for answer in answers:
        stored = (await stack.http.get(f"/v1/commands/{answer['id']}")).json()
        assert answer == stored
    assert [a["status"] for a in answers] == ["succeeded", "failed", "failed"]
    assert len(answers[0]["history"]) == 4 and answers[0]["history"][-1]["to_status"] == "succeeded"


async def test_the_command_path_sees_presence_revocation_and_rotation_at_once(stack: LiveStack) -> None:
    """The command route keeps what a command needs of a device in memory (api/registry/devices.py get_for_command):
    each change of it must hold for the very next command."""
    lock = await stack.lock("bike-c1")
    assert (await stack.command("bike-c1", "unlock")).json()["status"] == "succeeded"   # now kept in memory
    await lock.stop()
    await stack.wait_presence("bike-c1", False)
    r = await stack.command("bike-c1", "unlock", wait=0)
    assert r.json()["status"] == "failed" and "device offline" in r.json()["reason"]
    await stack.start_lock(lock)
    assert (await stack.command("bike-c1", "lock")).json()["status"] == "succeeded"
    assert (await stack.http.delete("/v1/devices/bike-c1")).status_code == 200
    refused = await stack.command("bike-c1", "unlock", wait=0)
    assert refused.status_code == 409 and "revoked" in refused.json()["detail"]
    # rotating its credentials lets it back in: the next command is no longer refused as revoked
    rotated = await stack.http.post("/v1/devices/bike-c1/credentials")
    assert rotated.status_code == 200, rotated.text
    assert (await stack.command("bike-c1", "unlock", wait=0)).status_code == 201

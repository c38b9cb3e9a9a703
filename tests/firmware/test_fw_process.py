"""The firmware process itself (`micropython -m firmware.main` with the Unix HAL and a
generated config) against Latch's broker and API, on loopback."""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from datetime import datetime, timedelta, timezone

from firmware.tools.build import build
from protocol import messages as m
from protocol import topics
from tests.firmware.fwsupport import FirmwareProcess, Injector, device_config, free_port
from tests.support import eventually

DEV = "bike-0001"


async def start_firmware(stack, micropython, tmp_path, device_id=DEV, heap=None, reg=None, code_dir=None,
                         **overrides):
    reg = reg or await stack.register(device_id)
    cfg = device_config(reg, stack.mqtt_host, stack.mqtt_port, tmp_path / device_id, **overrides)
    fw = FirmwareProcess(micropython, tmp_path / device_id, cfg, heap=heap, code_dir=code_dir)
    await fw.start()
    stack.locks.append(fw)  # stopped at teardown
    await fw.wait_line(r"clock synchronised", timeout=20)
    await stack.wait_presence(device_id, True)
    return fw, reg


def signed_command(reg, action="unlock", ttl_ms=30000, expires_at=None, key=None, command_id=None):
    now = int(time.time() * 1000)
    key = key or bytes.fromhex(reg["command_key"])
    cmd = m.make_command(command_id or uuid.uuid4().hex, reg["id"], action, {}, now,
                         expires_at if expires_at is not None else now + ttl_ms, key)
    return cmd, m.encode_command(cmd)


def ack_line(cid, result):
    return (r'ack .*"id": "%s".*' % cid if result is None
            else r'ack (?=.*"id": "%s")(?=.*"result": "%s")' % (cid, result))


async def test_unlock_round_trip(stack, micropython, tmp_path):
    fw, reg = await start_firmware(stack, micropython, tmp_path)
    r = await stack.command(DEV, "unlock", wait=10)
    body = r.json()
    assert body["status"] == "succeeded", (body, fw.output())
    assert fw.motor_runs() == 1
    # the state comes from the sensor: the simulated bolt is out
    await fw.wait_line(r'ack (?=.*"result": "succeeded")(?=.*"locked": false)')
    assert fw.count(r"SIM motor stop: unlocked") == 1
    r = await stack.command(DEV, "lock", wait=10)
    assert r.json()["status"] == "succeeded", r.text
    assert fw.motor_runs() == 2


async def test_jammed_lock_reports_failed(stack, micropython, tmp_path):
    fw, reg = await start_firmware(stack, micropython, tmp_path, driver_timeout_ms=600, actuation_timeout_ms=1500)
    fw.knobs(jam=True)
    r = await stack.command(DEV, "unlock", wait=10)
    body = r.json()
    assert body["status"] == "failed" and body["reason"] == m.REASON_JAMMED, (body, fw.output())
    # the reported state is what the sensor reads: still locked
    await fw.wait_line(r'ack (?=.*"result": "failed")(?=.*"locked": true)')
    # a driver that never returns: the controller gives up after actuation_timeout_ms
    fw.knobs(jam=False, hang=True)
    r = await stack.command(DEV, "unlock", wait=10)
    body = r.json()
    assert body["status"] == "failed" and body["reason"] == m.REASON_ACTUATION_TIMEOUT, (body, fw.output())


async def test_forged_signature_rejected(stack, micropython, tmp_path):
    fw, reg = await start_firmware(stack, micropython, tmp_path)
    async with Injector(stack.mqtt_host, stack.mqtt_port, stack.settings.service_secret) as forger:
        cmd, payload = signed_command(reg, key=os.urandom(32))
        forger.publish(topics.cmd_topic(DEV), payload)
        await fw.wait_line(ack_line(cmd["id"], "rejected") + r'.*"bad signature"')
        # a genuine command signed for the device, tampered in transit
        cmd, _ = signed_command(reg, action="lock")
        cmd["action"] = "unlock"
        forger.publish(topics.cmd_topic(DEV), m.encode_command(cmd))
        await fw.wait_line(ack_line(cmd["id"], "rejected") + r'.*"bad signature"')
    assert fw.motor_runs() == 0
    # end to end: a device holding a different key than the API's rejects the API's commands
    reg2 = dict(await stack.register("bike-0002"), command_key=os.urandom(32).hex())
    cfg = device_config(reg2, stack.mqtt_host, stack.mqtt_port, tmp_path / "bike-0002")
    fw2 = FirmwareProcess(micropython, tmp_path / "bike-0002", cfg)
    await fw2.start()
    stack.locks.append(fw2)
    await stack.wait_presence("bike-0002", True)
    r = await stack.command("bike-0002", "unlock", wait=10)
    body = r.json()
    assert body["status"] == "rejected" and body["reason"] == m.REASON_BAD_SIGNATURE, (body, fw2.output())
    assert fw2.motor_runs() == 0


async def test_expired_command_rejected_on_device(stack, micropython, tmp_path):
    fw, reg = await start_firmware(stack, micropython, tmp_path)
    async with Injector(stack.mqtt_host, stack.mqtt_port, stack.settings.service_secret) as inj:
        cmd, payload = signed_command(reg, expires_at=int(time.time() * 1000) - 2000)
        inj.publish(topics.cmd_topic(DEV), payload)
        await fw.wait_line(ack_line(cmd["id"], "rejected") + r'.*"expired on device"')
    assert fw.motor_runs() == 0
    # a real late delivery: the device is frozen while a short-lived command is sent,
    # and wakes up after its expiry; it must not open
    fw.signal(19)  # SIGSTOP
    try:
        r = await stack.http.post(f"/v1/devices/{DEV}/commands", params={"wait": 0},
                                  json={"action": "unlock", "ttl_s": 1})
        body = r.json()
        assert body["status"] in ("sent", "queued"), body
        deadline = time.monotonic() + 1.5  # the command's ttl, and then some
        await eventually(lambda: time.monotonic() > deadline, timeout=5, what="the command's expiry")
    finally:
        fw.signal(18)  # SIGCONT
    await fw.wait_line(ack_line(body["id"], "rejected") + r'.*"expired on device"', timeout=15)
    assert fw.motor_runs() == 0


async def test_same_command_twice_actuates_once(stack, micropython, tmp_path):
    fw, reg = await start_firmware(stack, micropython, tmp_path)
    async with Injector(stack.mqtt_host, stack.mqtt_port, stack.settings.service_secret) as inj:
        await inj.subscribe(topics.cmd_topic(DEV))
        r = await stack.command(DEV, "unlock", wait=10)
        assert r.json()["status"] == "succeeded", r.text
        cid = r.json()["id"]
        # the exact bytes the API sent, delivered again (as a broker redelivery would)
        sent = await eventually(lambda: [p for t, p in inj.received if cid.encode() in p], what="the API's command")
        inj.publish(topics.cmd_topic(DEV), sent[0])
        await fw.wait_line(ack_line(cid, "succeeded"), after=len(fw.lines))
        assert fw.count(ack_line(cid, "succeeded")) == 2
        assert fw.motor_runs() == 1
        # and again after a power cut: the executed id was persisted
        await fw.kill()
        mark = len(fw.lines)
        await fw.start()
        await fw.wait_line(r"state: file, 1 executed ids", after=mark)
        await fw.wait_line(r"clock synchronised", after=mark, timeout=20)
        inj.publish(topics.cmd_topic(DEV), sent[0], retain=True)  # the RETAIN flag changes nothing
        await fw.wait_line(ack_line(cid, "succeeded"), after=mark)
        assert fw.motor_runs() == 1
        inj.publish(topics.cmd_topic(DEV), b"", retain=True)  # clear the retained message


async def test_runs_in_64k_heap(stack, micropython, mpy_cross, tmp_path):
    """The deployable build (mpy-cross output, run from the root of a folder laid out like the
    board's flash) in a 64 KiB MicroPython heap, with every remembered command id filled in."""
    build(tmp_path / "build", mpy_cross=mpy_cross, log=lambda *a: None)
    # each remembered id costs ~230 bytes here (64-bit objects, twice an ESP32's); an ESP32 keeps 64
    records = 8
    fw, reg = await start_firmware(stack, micropython, tmp_path, heap="64k", code_dir=tmp_path / "build",
                                   max_records=records)
    n = 3 * records
    ttl_s = 1
    r = None
    for i in range(n):
        if i and i % records == 0:
            # the id list is full of unexpired commands, which the lock refuses to forget
            # (firmware/controller.py _make_room): wait until the batch's expiry has passed
            assert r is not None
            expires = datetime.fromisoformat(r.json()["expires_at"].replace("Z", "+00:00"))
            await eventually(lambda: datetime.now(timezone.utc) > expires + timedelta(milliseconds=200),
                             timeout=5, what="the batch to expire")
        r = await stack.command(DEV, "unlock" if i % 2 == 0 else "lock", wait=10, ttl_s=ttl_s)
        assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output(2000)
    assert fw.motor_runs() == n
    assert fw.running

    def frees() -> list[int]:
        return [int(x) for x in re.findall(r"actuated .* free=(\d+)", "\n".join(fw.lines))]
    # the lock prints its free heap after it answered: the last line may still be on its way to the reader
    await eventually(lambda: len(frees()) >= n, timeout=10, what=f"{n} 'actuated ... free=' lines")
    free = frees()
    print("\n64 KiB heap, free bytes after each command:", free)
    assert len(free) == n and min(free[-records:]) > 6000, free  # and steady once the id list is full
    print("\n64k heap: free after each command:", free)
    state = json.loads((tmp_path / DEV / "state.json").read_text().splitlines()[0])
    assert len(state["data"]["executed"]) == records


async def test_round_trip_latency(stack, micropython, tmp_path):
    """API POST -> "succeeded" with the firmware process (not the simulator) on loopback.
    The simulated bolt takes 20 ms; everything else is Latch: API, broker, MQTT, the device."""
    fw, reg = await start_firmware(stack, micropython, tmp_path, sim={"actuation_ms": 20})
    times = []
    for i in range(20):
        t0 = time.perf_counter()
        r = await stack.command(DEV, "unlock" if i % 2 == 0 else "lock", wait=10)
        times.append((time.perf_counter() - t0) * 1000)
        assert r.json()["status"] == "succeeded", r.text
    times.sort()
    p50, p95 = times[len(times) // 2], times[int(len(times) * 0.95) - 1]
    print(f"\nfirmware round trip (POST -> succeeded, 20 ms actuation): n={len(times)} "
          f"min={times[0]:.1f} p50={p50:.1f} p95={p95:.1f} max={times[-1]:.1f} ms")
    assert p95 < 2000, times


async def test_state_and_telemetry_follow_the_sensor(stack, micropython, tmp_path):
    fw, reg = await start_firmware(stack, micropython, tmp_path, heartbeat_s=1, telemetry_s=1)

    async def reported(key, value):
        async def check():
            dev = (await stack.http.get(f"/v1/devices/{DEV}")).json()
            return dev["reported"].get(key) == value
        await eventually(check, timeout=10, what=f"reported {key}={value}")

    await reported("locked", True)
    assert (await stack.command(DEV, "unlock", wait=10)).json()["status"] == "succeeded"
    await reported("locked", False)
    # somebody closes the lock by hand: the sensor sees it, the API hears it, no command involved
    fw.knobs(manual="lock")
    await fw.wait_line("SIM manual lock")
    await reported("locked", True)
    fw.knobs(battery=42, rssi=-77)
    await reported("battery", 42)


async def test_reboot_command(stack, micropython, tmp_path):
    fw, reg = await start_firmware(stack, micropython, tmp_path)
    r = await stack.command(DEV, "reboot", wait=10)
    assert r.json()["status"] == "succeeded", r.text
    await fw.wait_line("SIM reset")
    await asyncio.wait_for(fw.proc.wait(), 10)
    assert fw.proc.returncode == 3  # the Unix HAL's reset: a supervisor (or the chip) starts it again
    await fw._wait()
    mark = len(fw.lines)
    await fw.start()
    await fw.wait_line(r"state: file, 1 executed ids", after=mark)
    await fw.wait_line("clock synchronised", after=mark, timeout=20)
    await stack.wait_presence(DEV, True)
    assert (await stack.command(DEV, "unlock", wait=10)).json()["status"] == "succeeded"


async def test_watchdog_fed_only_while_healthy(stack, micropython, tmp_path):
    # healthy: connected, the watchdog (1 s) is fed and nothing resets
    fw, reg = await start_firmware(stack, micropython, tmp_path, wdt_ms=1000)
    deadline = time.monotonic() + 2.5
    await eventually(lambda: time.monotonic() > deadline, timeout=5, what="a few watchdog periods")
    assert fw.running and fw.count("watchdog") == 0
    assert (await stack.command(DEV, "unlock", wait=10)).json()["status"] == "succeeded"
    # unhealthy: no broker for longer than offline_reset_s -> not fed -> the watchdog resets the device
    reg2 = await stack.register("bike-0002")
    cfg = device_config(reg2, "127.0.0.1", free_port(), tmp_path / "bike-0002", wdt_ms=1000, offline_reset_s=1)
    fw2 = FirmwareProcess(micropython, tmp_path / "bike-0002", cfg)
    await fw2.start()
    stack.locks.append(fw2)
    await fw2.wait_line("SIM watchdog reset", timeout=15)
    await asyncio.wait_for(fw2.proc.wait(), 10)
    assert fw2.proc.returncode == -9



async def test_64k_heap_stays_bounded_on_a_link_that_loses_the_way_back(stack, micropython, mpy_cross, tmp_path):
    """Issue 12, defect 14: under CPU contention the 64 KiB firmware ran out of heap. What piles up on a
    slow link is what the lock keeps until the broker confirms it: its unacknowledged QoS 1 messages
    (acks, state). Here the broker's PUBACKs never reach the lock (a proxy on its route withholds them)
    while commands keep coming: the lock must stay up, answer every command, and keep its heap bounded."""
    from tests.firmware.mqttproxy import MqttProxy

    build(tmp_path / "build", mpy_cross=mpy_cross, log=lambda *a: None)
    proxy = await MqttProxy(stack.mqtt_host, stack.mqtt_port).start()
    try:
        records = 8
        reg = await stack.register(DEV)
        cfg = device_config(reg, "127.0.0.1", proxy.port, tmp_path / DEV, max_records=records)
        fw = FirmwareProcess(micropython, tmp_path / DEV, cfg, heap="64k", code_dir=tmp_path / "build")
        stack.locks.append(fw)
        await fw.start()
        await fw.wait_line(r"clock synchronised", timeout=20)
        await stack.wait_presence(DEV, True)
        proxy.hold_pubacks = True
        n = 3 * records
        r = None
        for i in range(n):
            if i and i % records == 0:  # the id list is full of unexpired ids: let the batch expire
                assert r is not None
                expires = datetime.fromisoformat(r.json()["expires_at"].replace("Z", "+00:00"))
                await eventually(lambda: datetime.now(timezone.utc) > expires + timedelta(milliseconds=200),
                                 timeout=5, what="the batch to expire")
            r = await stack.command(DEV, "unlock" if i % 2 == 0 else "lock", wait=10, ttl_s=1)
            assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output(2000)

        def frees() -> list[int]:
            return [int(x) for x in re.findall(r"actuated .* free=(\d+)", "\n".join(fw.lines))]
        # the lock prints its free heap after it answered: the last line may still be on its way to the reader
        await eventually(lambda: len(frees()) >= n, timeout=10, what=f"{n} 'actuated ... free=' lines")
        # no MemoryError anywhere: the lock never broke. A packet put off for want of memory (firmware/mqtt.py
        # push(): "no memory ... now", kept queued and sent later) is the designed answer to a fragmented heap, not a
        # failure: it happened once in a CI run (2026-12-07) after several broker addresses cost ~128 bytes of
        # heap; every command still succeeded, and the queue drains below once the way back returns
        assert fw.running and fw.count("MemoryError") == 0, fw.output()
        deferred = fw.count("no memory")
        free = frees()
        print("\n64 KiB heap, PUBACKs withheld: free bytes after each command:", free, "held:", len(proxy.held),
              "packets put off for want of memory:", deferred)
        # measured (2026-12-07, 15 runs, 7 of them with 3 CPU burners): min 7616, first 10336; before the writes
        # lost their lock and task, 1 run in ~10 failed with a MemoryError at ~8 KB free (fragmentation)
        assert len(free) == n and min(free) > 6500, free
        # the way back returns: the lock's queue drains on the next connection (resent with DUP, acknowledged)
        proxy.hold_pubacks = False
        mark = len(fw.lines)
        proxy.drop_lock_connections()
        await fw.wait_line(r"clock synchronised", after=mark, timeout=20)
        assert (await stack.command(DEV, "unlock", wait=10)).json()["status"] == "succeeded", fw.output()
    finally:
        await proxy.close()

"""Clock rollback (issue 12, defect 9), against the firmware process under `micropython`.

The attack: an attacker on the lock's route recorded signed time replies in an earlier boot.
After a reboot the lock asks for the time; the attacker drops the request and answers with a
recorded reply for the lock's nonce. If the lock believes it, its clock is 64 h behind and a
64-hour-old signed unlock (recorded too) is "still valid" and opens the lock.

The replies "the API signed 64 h ago" are signed here with the device's key, exactly as the API
signs them (protocol.messages.make_time_reply): a test cannot wait 64 hours. The attacker holds a
reply for every nonce a lock could use in its first 20 s after boot (what a recording of earlier
boots gives when the nonce is the time since boot), and falls back to the nonce of the recorded
boot otherwise.
"""
from __future__ import annotations

import json
import time
import uuid

from protocol import messages as m
from protocol import topics
from tests.firmware.fwsupport import FirmwareProcess, device_config
from tests.firmware.mqttproxy import MqttProxy, json_payload, publish_packet, publish_parts

DEV = "bike-0001"
HOURS_64_MS = 64 * 3600 * 1000
FINAL_ACK = r'ack (?=.*"id": "%s")(?=.*"result": "(succeeded|failed|rejected)")'


def sync_nonces(proxy: MqttProxy) -> list[int]:
    out = []
    for p in proxy.up:
        parts = publish_parts(p)
        if parts and parts[0] == topics.sync_topic(DEV):
            out.append(json.loads(parts[3])["t0"])
    return out


def old_unlock(key: bytes, then_ms: int) -> tuple[str, bytes]:
    """An unlock the API signed 64 h ago with a 30 s lifetime: recorded, replayed now."""
    cmd = m.make_command(uuid.uuid4().hex, DEV, "unlock", {}, then_ms, then_ms + 30000, key)
    return cmd["id"], m.encode_command(cmd)


async def boot_then_replay(stack, micropython, tmp_path, **cfg_overrides):
    """Boot 1 through the attacker's proxy; power cut; boot 2 answered with a 64 h old reply.
    Returns (firmware, proxy, key, line index where boot 2 starts, the old unlock's id)."""
    reg = await stack.register(DEV)
    key = bytes.fromhex(reg["command_key"])
    proxy = await MqttProxy(stack.mqtt_host, stack.mqtt_port).start()
    cfg = device_config(reg, "127.0.0.1", proxy.port, tmp_path / DEV, **cfg_overrides)
    fw = FirmwareProcess(micropython, tmp_path / DEV, cfg)
    stack.locks.append(fw)
    stack.locks.append(proxy_closer(proxy))
    await fw.start()
    await fw.wait_line(r"clock synchronised", timeout=20)
    first = sync_nonces(proxy)[0]
    # the API's genuine, signed answer to it crossed the proxy: a recording is possible
    assert any((json_payload(p) or {}).get("t0") == first for p in proxy.down), "no time reply recorded"

    then = int(time.time() * 1000) - HOURS_64_MS
    recorded = {t0: m.make_time_reply(DEV, t0, then, key) for t0 in range(20000)}
    recorded[first] = m.make_time_reply(DEV, first, then, key)
    hijacked: list[int] = []

    def attacker(packet: bytes) -> bytes | None:
        parts = publish_parts(packet)
        if hijacked or not parts or parts[0] != topics.sync_topic(DEV):
            return packet
        t0 = json.loads(parts[3])["t0"]
        hijacked.append(t0)
        reply = recorded.get(t0, recorded[first])
        proxy.inject_down(publish_packet(topics.cmd_topic(DEV), m.encode_command(reply)))
        return None  # the API never hears this request

    await fw.kill()  # power cut (or any reboot the attacker can cause)
    proxy.up_filter = attacker
    mark = len(fw.lines)
    await fw.start()
    await fw.wait_line(r"time reply|clock synchronised", after=mark, timeout=20)
    assert hijacked, fw.output()
    cid, payload = old_unlock(key, then)
    proxy.inject_down(publish_packet(topics.cmd_topic(DEV), payload))
    return fw, proxy, mark, cid


class proxy_closer:
    """Lets the stack fixture's teardown (which stops its `locks`) close the proxy too."""

    def __init__(self, proxy: MqttProxy) -> None:
        self.proxy = proxy

    async def stop(self) -> None:
        await self.proxy.close()


async def test_replayed_time_reply_after_reboot_does_not_roll_the_clock_back(stack, micropython, tmp_path):
    fw, proxy, mark, cid = await boot_then_replay(stack, micropython, tmp_path)
    await fw.wait_line(FINAL_ACK % cid, after=mark, timeout=30)
    ack = fw.lines[mark:]
    assert fw.motor_runs() == 0, "a 64 h old unlock actuated:\n" + fw.output()
    assert any(cid in line and '"rejected"' in line and m.REASON_EXPIRED_ON_DEVICE in line for line in ack), \
        fw.output()
    # the nonces of the two boots differ, and neither is a time since boot
    nonces = sync_nonces(proxy)
    assert len(set(nonces)) == len(nonces), nonces
    assert min(nonces) > 2 ** 32, nonces


async def test_clock_never_moves_behind_what_the_lock_knows(stack, micropython, tmp_path):
    """Even with a broken RNG (the same nonce every boot, faked at the HAL), the 64 h old reply is
    refused: the lock persisted how late it already knew it to be, and a reply behind that is refused."""
    fw, proxy, mark, cid = await boot_then_replay(stack, micropython, tmp_path,
                                                  sim={"urandom": "5a" * 8})
    nonces = sync_nonces(proxy)
    assert nonces[0] == nonces[1], nonces  # the broken RNG: the attacker's reply carries the right nonce
    await fw.wait_line(r"refused time reply", after=mark)
    await fw.wait_line(FINAL_ACK % cid, after=mark, timeout=30)
    assert fw.motor_runs() == 0, "a 64 h old unlock actuated:\n" + fw.output()
    assert fw.count(r'ack (?=.*"id": "%s")(?=.*"rejected")(?=.*"expired on device")' % cid) == 1, fw.output()
    # and the lock is usable: its clock came from the API in the end
    state = json.loads((tmp_path / DEV / "state.json").read_text().splitlines()[0])
    assert state["data"]["clock"] > int(time.time() * 1000) - 60000, state

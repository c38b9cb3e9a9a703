"""`latch sim` as a real process: killed with SIGKILL and started again on the same data dir, it answers a
replayed signed command from its persisted record and does not actuate it again (issue 12, defect 10)."""

from __future__ import annotations

import asyncio
import binascii
import signal
from pathlib import Path

from device_sim.actuations import read_actuations
from device_sim.provision import sim_dir
from mqtt_client import MqttClient
from protocol import messages, topics
from tests.procs import LATCH, drain, read_until
from tests.support import LiveStack, eventually, stop_process


async def _start_sim(stack: LiveStack, data_dir: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *LATCH, "sim", "--devices", "1", "--prefix", "proc-", "--broker", f"{stack.mqtt_host}:{stack.mqtt_port}",
        "--api", stack.api_url, "--token", stack.admin_token, "--data-dir", str(data_dir),
        "--actuation-delay", "0.01", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    await read_until(proc, r"simulated locks online", timeout=60)
    return proc


async def test_a_killed_and_restarted_sim_process_refuses_a_replayed_command(stack: LiveStack, tmp_path: Path) -> None:
    from broker.identity import SERVICE_USERNAME

    data_dir = tmp_path / "sim-data"
    answers: list[dict] = []

    async def on_ack(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        answers.append(messages.decode_ack(payload))

    svc = MqttClient("observer", username=SERVICE_USERNAME, password=stack.settings.service_secret,
                     clean_session=True, handler=on_ack)
    await svc.connect(stack.mqtt_host, stack.mqtt_port)
    proc = await _start_sim(stack, data_dir)
    drainer = drain(proc)
    try:
        await svc.subscribe([(topics.ack_topic("proc-0001"), 1)])
        await stack.wait_presence("proc-0001", True)
        done = (await stack.command("proc-0001", "unlock", ttl_s=120)).json()
        assert done["status"] == "succeeded", done
        cid = done["id"]

        proc.send_signal(signal.SIGKILL)            # no goodbye, nothing flushed on the way out
        await proc.wait()
        drainer.cancel()
        await stack.wait_presence("proc-0001", False)
        proc = await _start_sim(stack, data_dir)   # the same locks, the same data dir
        drainer = drain(proc)
        await stack.wait_presence("proc-0001", True)

        row = await stack.runtime.commands.get(cid)
        device = await stack.runtime.registry.get("proc-0001")
        replay = messages.encode_command(messages.make_command(
            row.id, row.device_id, row.action, row.params, row.created_at, row.expires_at,
            key=binascii.unhexlify(device.command_key)))
        before = len(answers)
        svc.publish(topics.cmd_topic("proc-0001"), replay, qos=1)
        await eventually(lambda: len(answers) > before, what="the restarted simulator's answer to the replay")
        assert [(a["id"], a["result"]) for a in answers[before:]] == [(cid, messages.SUCCEEDED)]
    finally:
        await svc.disconnect()
        await stop_process(proc)
        drainer.cancel()
    lines = [a for a in read_actuations(sim_dir(data_dir)) if a["command_id"] == cid]
    assert [(a["event"], a["action"]) for a in lines] == [("actuate", "unlock"), ("result", "unlock")]
    assert lines[0]["before_expiry"] is True and lines[1]["ok"] is True

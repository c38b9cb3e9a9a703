"""A command is not timed out while its answer may be waiting for the API (issue 12, chaos bench's
"false successes": the lock opened, the API, ~40 s behind its acks, had already said timed_out)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from api.clock import now_ms
from api.commands.ingest import AckLag
from mqtt_client import MqttClient
from protocol import messages, topics
from tests.support import eventually, live_stack


def test_ack_lag_is_a_median_and_goes_stale() -> None:
    lag = AckLag()
    now = 1_000_000
    assert not lag.behind()
    for _ in range(AckLag.WINDOW):
        lag.record(now - 10, now)
    lag.record(now - 600_000, now)          # one lock re-sending an old answer: not the API lagging
    assert not lag.behind()
    for _ in range(AckLag.WINDOW):
        lag.record(now - 5_000, now)
    assert lag.behind() and lag.median_ms() == 5_000
    lag.record(None, now)                     # acks without a clock change nothing
    lag.record(now + 10_000, now)             # nor do clocks ahead of ours
    assert lag.median_ms() == 5_000


async def test_timeouts_wait_while_acks_arrive_late(tmp_path: Path) -> None:
    async with live_stack(tmp_path, settle_grace_s=0.5) as live:
        creds = await live.register("bike-late")
        received: asyncio.Queue[dict] = asyncio.Queue()

        async def on_cmd(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            msg = messages.decode_downlink(payload)
            if msg["type"] == "cmd":
                await received.put(msg)

        device = MqttClient("bike-late", username="bike-late", password=creds["mqtt_password"],
                            clean_session=True, handler=on_cmd,
                            will=None)
        await device.connect(live.settings.host, live.settings.mqtt_port)
        try:
            await device.subscribe([(topics.cmd_topic("bike-late"), 1)])
            device.publish(topics.presence_topic("bike-late"), messages.ONLINE, qos=1, retain=True)
            await live.wait_presence("bike-late", True)

            def answer(cmd: dict, result: str, ts: int) -> None:
                device.publish(topics.ack_topic("bike-late"), messages.encode_ack(cmd["id"], result, ts), qos=1)

            # acks that were made 5 s before the API applies them: the API is behind its devices
            for _ in range(AckLag.WINDOW):
                r = await live.command("bike-late", "locate", wait=0, ttl_s=30)
                cmd = await asyncio.wait_for(received.get(), 10)
                answer(cmd, messages.SUCCEEDED, now_ms() - 5_000)
                await live.http.get(f"/v1/commands/{r.json()['id']}", params={"wait": 5})
            assert live.runtime.ingest.ack_lag.behind()

            # a 1 s unlock whose answer is still "queued" past its deadline (1 s + 0.5 s grace)
            r = await live.command("bike-late", "unlock", wait=0, ttl_s=1)
            cmd = await asyncio.wait_for(received.get(), 10)
            made = now_ms()
            await eventually(lambda: live.runtime.metrics.counts.get("timeouts_held_acks_behind", 0) > 0,
                             timeout=10, what="the timeout held")
            answer(cmd, messages.SUCCEEDED, made - 4_000)   # made long ago, applied now
            got = (await live.http.get(f"/v1/commands/{r.json()['id']}", params={"wait": 5})).json()
            assert got["status"] == "succeeded", got

            # caught up again (fresh acks): a silent lock's command times out as before
            for _ in range(AckLag.WINDOW):
                r2 = await live.command("bike-late", "locate", wait=0, ttl_s=30)
                answer(await asyncio.wait_for(received.get(), 10), messages.SUCCEEDED, now_ms())
                await live.http.get(f"/v1/commands/{r2.json()['id']}", params={"wait": 5})
            assert not live.runtime.ingest.ack_lag.behind()
            r = await live.command("bike-late", "unlock", wait=5, ttl_s=1)
            assert r.json()["status"] == "timed_out", r.json()
        finally:
            await device.disconnect()

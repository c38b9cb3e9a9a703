"""The simulator: a fleet comes online, answers commands, and its fault knobs do what they say."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from api.models import DeviceCreate
from device_sim.actuations import read_actuations
from device_sim.fleet import Fleet
from device_sim.lock import Behaviour, Credentials
from tests.support import LiveStack, eventually

FLEET = 1000


async def test_a_thousand_locks_come_online_and_answer(stack: LiveStack, tmp_path: Path) -> None:
    """With a data dir, as `latch sim` runs: every lock persists its record and ticks its controller."""
    registry = stack.runtime.registry
    creds = [Credentials.from_registration((await registry.register(DeviceCreate(id=f"f{i:04d}"))).model_dump())
             for i in range(FLEET)]
    fleet = Fleet(creds, Behaviour(actuation_delay_s=0.01), data_dir=tmp_path / "sim")
    # 10 connecting at a time (not Fleet's 50): each MQTT connect has a 10 s deadline, and on a machine whose
    # cores are shared with other tests 50 at once against a broker on this test's own loop can miss it
    await fleet.start(stack.mqtt_host, stack.mqtt_port, concurrency=10)
    try:
        async def all_online() -> bool:
            devices = (await stack.http.get("/v1/devices", params={"limit": 1000})).json()
            return sum(d["online"] for d in devices) == FLEET
        await eventually(all_online, timeout=60, interval=0.2, what=f"{FLEET} locks online")
        # every lock persists once when its clock is synchronised (the clock floor, firmware/controller.py);
        # the per-command figures below start after those
        states = [lock.state for lock in fleet.locks.values() if lock.state is not None]
        await eventually(lambda: all(s.saves >= 1 for s in states), timeout=60, interval=0.2,
                         what="every lock's first save (its clock sync)")
        before = [(s.saves, s.save_s, s.wait_s) for s in states]
        picks = random.Random(7).sample(range(FLEET), 20)
        async def timed(i: int):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            r = await stack.command(f"f{i:04d}", "unlock")
            return r, time.perf_counter() - t
        timed_rs = await asyncio.gather(*(timed(i) for i in picks))
        rs = [r for r, _ in timed_rs]
        took = sorted(t for _, t in timed_rs)
        assert [r.json()["status"] for r in rs] == ["succeeded"] * len(picks)
        assert sum(len(lock.actuations) for lock in fleet.locks.values()) == len(picks)
        assert len([a for a in read_actuations(tmp_path / "sim") if a["event"] == "actuate"]) == len(picks)
        saves = sum(s.saves for s in states) - sum(b[0] for b in before)
        assert saves >= 2 * len(picks)   # before "received" (in progress) and before "succeeded"
        save_s = sum(s.save_s for s in states) - sum(b[1] for b in before)
        wait_s = sum(s.wait_s for s in states) - sum(b[2] for b in before)
        print(f"\npersistence at {FLEET} locks: {saves} saves for {len(picks)} unlocks, "
              f"{1000 * save_s / saves:.2f} ms writing per save, "
              f"{1000 * wait_s / len(picks):.2f} ms waited per command; "
              f"{len(picks)} concurrent unlocks p50 {1000 * took[len(took) // 2]:.0f} ms, max {1000 * took[-1]:.0f} ms")
    finally:
        await fleet.stop()


async def test_jam_and_drop_knobs(stack: LiveStack) -> None:
    jammed = await stack.lock("s-jam", Behaviour(actuation_delay_s=0.01, jam_rate=1.0))
    assert (await stack.command("s-jam", "unlock")).json()["status"] == "failed"
    assert jammed.controller.locked is True                      # the sensor did not move
    await stack.lock("s-drop", Behaviour(drop_rate=1.0))
    r = await stack.command("s-drop", "report", wait=0.3)
    assert r.json()["status"] == "sent"


async def test_ack_delay_delays_receipt(stack: LiveStack) -> None:
    await stack.lock("s-slow", Behaviour(ack_delay_s=0.3, actuation_delay_s=0.01))
    r = await stack.command("s-slow", "unlock", wait=0.1)
    assert r.json()["status"] == "sent"
    done = await stack.http.get(f"/v1/commands/{r.json()['id']}", params={"wait": 5})
    assert done.json()["status"] == "succeeded"


async def test_lock_goes_offline_gracefully_and_comes_back(stack: LiveStack) -> None:
    lock = await stack.lock("s-away")
    await lock.stop()
    await stack.wait_presence("s-away", False)
    await stack.start_lock(lock)
    assert (await stack.command("s-away", "unlock")).json()["status"] == "succeeded"
    await eventually(lambda: lock.controller.locked is False, what="sensor to read unlocked")

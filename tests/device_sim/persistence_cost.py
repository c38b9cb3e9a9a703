"""What the simulator's persistence costs per command at 1,000 locks (a measurement, not a test).

    .venv/bin/python -m tests.device_sim.persistence_cost [--locks 1000] [--commands 200]

One process, as `latch serve --demo-fleet` runs it: broker, API and the fleet on one event loop (with
the CLI's GIL switch interval). The same 1,000 registered locks run twice: with a data dir (each
unlock persisted twice, durably, before "received" and before "succeeded") and without. Sequential
unlocks on random locks after the fleet settled; prints, per command, the time the lock's effects
waited for its record to be durable, the time each save took on its I/O thread, and the API's
round trip (POST ...?wait= to "succeeded"), p50/p95, for both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from api.models import DeviceCreate
from device_sim.fleet import Fleet
from device_sim.lock import Behaviour, Credentials
from latch.stack import Stack
from tests.support import eventually, make_settings

SETTLE_S = 5.0   # after all are online: the API applies 1,000 presences, states and first telemetry


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def run(fleet: Fleet, stack: Stack, http: httpx.AsyncClient, n: int, commands: int) -> dict[str, float]:
    await fleet.start(stack.settings.host, stack.settings.mqtt_port)

    async def all_online() -> bool:
        devices = (await http.get("/v1/devices", params={"limit": 1000})).json()
        return sum(d["online"] for d in devices) == n
    await eventually(all_online, timeout=120, interval=0.5, what="all online")
    states = [lock.state for lock in fleet.locks.values() if lock.state is not None]
    # every lock saves once when its clock is synchronised (the clock floor): the figures start after those
    await eventually(lambda: all(s.saves >= 1 for s in states), timeout=120, interval=0.2, what="the sync saves")
    await asyncio.sleep(SETTLE_S)
    before = (sum(s.saves for s in states), sum(s.save_s for s in states), sum(s.wait_s for s in states))
    rng = random.Random(3)
    took: list[float] = []
    for _ in range(commands):
        device = f"p{rng.randrange(n):04d}"
        t = time.perf_counter()
        r = await http.post(f"/v1/devices/{device}/commands", params={"wait": 10}, json={"action": "unlock"})
        took.append(time.perf_counter() - t)
        assert r.json()["status"] == "succeeded", r.text
    saves = sum(s.saves for s in states) - before[0]
    save_s = sum(s.save_s for s in states) - before[1]
    wait_s = sum(s.wait_s for s in states) - before[2]
    await fleet.stop()
    return {"saves_per_command": saves / commands,
            "write_ms_per_save": 1000 * save_s / saves if saves else 0.0,
            "waited_ms_per_command": 1000 * wait_s / commands,
            "round_trip_p50_ms": 1000 * pct(took, 0.5), "round_trip_p95_ms": 1000 * pct(took, 0.95)}


async def main(n: int, commands: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp))
        async with Stack(settings) as stack:
            async with httpx.AsyncClient(base_url=stack.api_url, timeout=60,
                                         headers={"Authorization": f"Bearer {settings.admin_token}"}) as http:
                registry = stack._server.config.app.state.runtime.registry  # type: ignore[union-attr]
                creds = [Credentials.from_registration(
                    (await registry.register(DeviceCreate(id=f"p{i:04d}"))).model_dump()) for i in range(n)]
                behaviour = Behaviour(actuation_delay_s=0.01)
                for label, data_dir in (("with data dir", Path(tmp) / "sim"), ("in memory", None)):
                    figures = await run(Fleet(creds, behaviour, data_dir=data_dir), stack, http, n, commands)
                    print(f"{n} locks, {commands} sequential unlocks, {label}: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    sys.setswitchinterval(0.0005)   # as latch/cli.py main()
    ap = argparse.ArgumentParser()
    ap.add_argument("--locks", type=int, default=1000)
    ap.add_argument("--commands", type=int, default=200)
    a = ap.parse_args()
    asyncio.run(main(a.locks, a.commands))

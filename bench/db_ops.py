"""The database cost of one command, without the network: what the API's writer does per unlock.

One "command" here is what the API writes for a real unlock: create (+dispatch), the device's
"received", its "succeeded" with reported state, and the retained state report, each a separate
transaction, with the event-log hooks the running API uses. Prints commands/s through the writer
and the CPU each costs, and writes JSON to bench/results/.

    python -m bench.db_ops [--n 2000] [--concurrency 50] [--database-url URL]

The URL picks the driver too (api/db.py): sqlite:// (threads), sqlite+aiosqlite://,
postgresql+psycopg:// (threads), postgresql+asyncpg:// (= postgresql://).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from api import schema
from api.app import build_runtime
from api.commands.states import Event
from api.db import Database
from api.models import CommandCreate, DeviceCreate
from bench.procs import cpu_seconds
from foundation.settings import Settings

RESULTS = Path(__file__).parent / "results"


class NullLink:
    """Stands in for the MQTT link: this bench measures the database path only."""
    is_connected = True

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        pass


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--database-url")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), database_url=args.database_url)
        settings.ensure_secrets()
        db = Database(settings.resolved_database_url())
        await schema.upgrade(db)
        rt = build_runtime(settings, db)
        rt.commands.publisher = NullLink()
        await rt.events.start()
        devices = [f"d{i:04d}" for i in range(100)]
        for d in devices:
            await rt.registry.register(DeviceCreate(id=d))
            await rt.registry.set_presence(d, True)
        body = CommandCreate(action="unlock")

        async def one(i: int) -> None:
            device = await rt.registry.get(devices[i % len(devices)])
            assert device is not None
            cmd, _ = await rt.commands.create(device, body, "admin", None)
            await rt.commands.transition(cmd.id, Event.DEVICE_RECEIVED, device_id=device.id)
            state = {"locked": i % 2 == 1, "battery": 90}
            await rt.commands.transition(cmd.id, Event.DEVICE_SUCCEEDED, device_id=device.id, reported=state)
            await rt.registry.merge_reported(device.id, state)
            await rt.commands.with_history(cmd.id)

        gate = asyncio.Semaphore(args.concurrency)

        async def gated(i: int) -> None:
            async with gate:
                await one(i)

        cpu0, t0 = cpu_seconds(os.getpid()), time.perf_counter()
        await asyncio.gather(*(gated(i) for i in range(args.n)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(os.getpid()) - cpu0
        await rt.events.stop() if hasattr(rt.events, "stop") else None
        await db.close()
    result = {"bench": "db_ops", "database": db.engine.dialect.name, "driver": db.driver, "commands": args.n,
              "concurrency": args.concurrency,
              "commands_per_s": round(args.n / wall, 1), "cpu_ms_per_command": round(cpu * 1000 / args.n, 2),
              "transactions_per_command": 4, "reads_per_command": 2}
    print(json.dumps(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"db_ops-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.run(main())

"""Many simulated locks: started with bounded concurrency, stopped together."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from device_sim.lock import Behaviour, Credentials, SimulatedLock


class Fleet:
    def __init__(self, creds: Iterable[Credentials], behaviour: Behaviour | None = None, seed: int = 1,
                 keepalive: int = 30, data_dir: Path | None = None, config: dict[str, Any] | None = None) -> None:
        """`data_dir`: each lock's state file and the process's actuation record (device_sim/__init__.py);
        `config`: firmware config.json tuning keys for every lock (firmware/config.py)."""
        rng = random.Random(seed)
        self.data_dir = data_dir
        self.locks = {c.device_id: SimulatedLock(c, behaviour or Behaviour(), random.Random(rng.random()),
                                                 keepalive=keepalive, data_dir=data_dir, config=dict(config or {}))
                      for c in creds}

    def __getitem__(self, device_id: str) -> SimulatedLock:
        return self.locks[device_id]

    def __len__(self) -> int:
        return len(self.locks)

    async def start(self, host: str, port: int, concurrency: int = 50, tls: ssl.SSLContext | None = None,
                    on_started: Callable[[], None] | None = None,
                    fallbacks: Sequence[tuple[str, int]] = ()) -> None:
        """Connect every lock, `concurrency` at a time; `on_started` after each (a progress bar). `fallbacks`:
        the broker's other nodes."""
        gate = asyncio.Semaphore(concurrency)

        async def one(lock: SimulatedLock) -> None:
            async with gate:
                await lock.start(host, port, tls, fallbacks)
            if on_started is not None:
                on_started()

        await asyncio.gather(*(one(lock) for lock in self.locks.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(lock.stop() for lock in self.locks.values()), return_exceptions=True)

"""The simulated locks' main loop: every lock's `tick` every `tick_ms`, from one task per period.

firmware/app.py runs its main loop (sensor, controller tick: actuation watchdog, heartbeat,
telemetry; clock resync) every `tick_ms` (100 ms by default). A task per lock would mean 1,000
tasks waking 10 times a second; one task per distinct period ticks every lock on it in turn and
sleeps what is left of the period (a tick costs a few microseconds per lock, see the fleet test).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

log = logging.getLogger("latch.sim")


class Ticks(Protocol):
    def tick(self, now: int) -> None: ...


class _Loop:
    def __init__(self, period_ms: int) -> None:
        self.period_ms = period_ms
        self.locks: dict[int, Ticks] = {}    # by id(): insertion-ordered, O(1) removal
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        period = self.period_ms / 1000
        while self.locks:
            started = time.monotonic()
            now = time.time_ns() // 1_000_000
            for lock in list(self.locks.values()):
                try:
                    lock.tick(now)
                except Exception:   # one broken lock must not stop every other lock's main loop
                    log.exception("tick failed")
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
        self.task = None


_loops: dict[tuple[int, int], _Loop] = {}   # (id of the event loop, period) -> its ticking task


def add(lock: Ticks, period_ms: int) -> None:
    key = (id(asyncio.get_running_loop()), int(period_ms))
    loop = _loops.get(key)
    if loop is None or (loop.task is not None and loop.task.get_loop().is_closed()):
        loop = _loops[key] = _Loop(int(period_ms))
    loop.locks[id(lock)] = lock
    if loop.task is None or loop.task.done():
        loop.task = asyncio.get_running_loop().create_task(loop.run())


def remove(lock: Ticks) -> None:
    for loop in _loops.values():
        loop.locks.pop(id(lock), None)

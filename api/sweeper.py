"""Expires and times out commands exactly when their deadlines pass."""

from __future__ import annotations

import asyncio
import logging

from api.clock import now_ms
from api.commands import CommandService

log = logging.getLogger("latch.sweeper")

IDLE_RECHECK_S = 5.0  # with nothing due, look again this often (commands written by another process)


class Sweeper:
    def __init__(self, commands: CommandService) -> None:
        self.commands = commands
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_due: float = 0.0
        commands.deadline_changed = self._deadline_changed

    def _deadline_changed(self, deadline_ms: int) -> None:
        if deadline_ms < self._next_due:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="latch-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self._next_due = float("inf")  # a deadline set while sweeping wakes the next round
            try:
                nxt = await self.commands.sweep()
            except Exception:
                log.exception("sweep failed; retrying")
                nxt = None
            delay = IDLE_RECHECK_S if nxt is None else max(0.0, min(IDLE_RECHECK_S, (nxt - now_ms()) / 1000))
            self._next_due = now_ms() + delay * 1000
            try:
                await asyncio.wait_for(self._wake.wait(), delay + 0.005)
            except asyncio.TimeoutError:
                pass

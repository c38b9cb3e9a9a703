"""Expires and times out commands exactly when their deadlines pass.

With several API processes on one PostgreSQL database, only the holder of the singleton lease
(api/lease.py) sweeps; every process hears of new deadlines (NOTIFY latch_deadline, api/pg_bus.py),
so the holder wakes for a deadline another replica set. If the holder dies, another replica takes the
lease within LEASE_RETRY_S and sweeps whatever came due meanwhile: no command is left unfinished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from api.background import reraise_if_stopping
from api.clock import now_ms
from api.commands.service import CommandService
from api.lease import LEASE_RETRY_S, Lease

log = logging.getLogger("latch.sweeper")

IDLE_RECHECK_S = 30.0  # with nothing due: a safety net only (deadlines arrive by commands.deadlines or NOTIFY)
BEHIND_RECHECK_S = 0.25   # while acks are applied late, how often timeouts are reconsidered


class Sweeper:
    def __init__(self, commands: CommandService, lease: Lease | None = None,
                 acks_behind: Callable[[], bool] = lambda: False) -> None:
        """`acks_behind`: True while this process applies device acks late (api/commands/ingest.py AckLag): then
        timeouts wait (an answer may be queued for us), up to commands.MAX_TIMEOUT_HOLD_S; expiries of
        never-sent commands do not."""
        self.commands = commands
        self.lease = lease or Lease(None)
        self.acks_behind = acks_behind
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_due: float = 0.0
        commands.deadlines.listen(self._deadline_changed)

    def _deadline_changed(self, deadline_ms: int) -> None:
        if deadline_ms < self._next_due:
            self._wake.set()

    def on_notify(self, payload: str) -> None:
        """NOTIFY latch_deadline from any replica."""
        try:
            self._deadline_changed(int(payload))
        except ValueError:
            log.warning("ignored a malformed deadline notification: %r", payload[:80])

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="latch-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.lease.release()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if not await self.lease.hold():
                self._next_due = float("inf")
                await self._sleep(LEASE_RETRY_S)
                continue
            self._next_due = float("inf")  # a deadline set while sweeping wakes the next round
            try:
                nxt = await self.commands.sweep(hold_timeouts=self.acks_behind())
            except Exception:
                reraise_if_stopping()   # api/background.py: stop() cancelled a query, not a failure
                log.exception("sweep failed; retrying")
                nxt = None
            delay = IDLE_RECHECK_S if nxt is None else max(0.0, min(IDLE_RECHECK_S, (nxt - now_ms()) / 1000))
            self._next_due = now_ms() + delay * 1000
            await self._sleep(delay + 0.005)

    async def _sleep(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

"""Which API process does the singleton work: the sweeper's expiries and timeouts, fleet rollouts,
and applying device reports (presence, state, telemetry, clock sync — api/commands/ingest.py), which must be
applied in the order a device sent them, so by one process.

PostgreSQL: whoever holds a session-level advisory lock, on a connection of its own. When that
process dies its connection closes, PostgreSQL releases the lock, and another replica takes it at its
next try (LEASE_RETRY_S). Holding the lease is about not doing the work N times over; correctness
never depends on it, because every state change is a conditional UPDATE.
SQLite: the one API process always holds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psycopg

from api.pg_bus import libpq_dsn

log = logging.getLogger("latch.lease")

LEASE_KEY = 0x1A7C4_0001     # pg_advisory_lock key of Latch's singleton work
LEASE_RETRY_S = 1.0           # a replica without the lease tries again this often
LEASE_CHECK_S = 2.0           # the holder makes sure its connection still lives this often


class Lease:
    def __init__(self, url: str | None, eligible: bool = True) -> None:
        """`url`: the PostgreSQL database; None for SQLite (always held). `eligible`: False for a
        replica that does not consume device messages (--no-ingest): it never takes the lease, since the
        holder applies device reports."""
        self._dsn = libpq_dsn(url) if url else None
        self.eligible = eligible
        # one connection, kept while it works, holder or not: a replica without the lease retries on it
        # (a new connection per try cost a PostgreSQL backend start per second per replica)
        self._conn: psycopg.AsyncConnection | None = None
        self._holding = False
        self._checked = 0.0
        self._trying = asyncio.Lock()   # the sweeper and the fleet worker both ask: one try at a time
        self.on_acquired: list[Callable[[], None]] = []   # called when this process takes the lease

    @property
    def shared(self) -> bool:
        return self._dsn is not None

    async def hold(self) -> bool:
        """True when this process holds the lease (taking it when free)."""
        if self._dsn is None:
            return True
        if not self.eligible:
            return False
        async with self._trying:
            return await self._hold()

    async def _hold(self) -> bool:
        if self._holding and self._conn is not None:
            if time.monotonic() - self._checked < LEASE_CHECK_S and not self._conn.closed:
                return True
            try:
                await self._conn.execute("SELECT 1")
                self._checked = time.monotonic()
                return True
            except psycopg.Error as e:
                log.warning("lost the singleton lease (its connection failed: %s)", e)
                await self._drop()
        if self._conn is None or self._conn.closed:
            try:
                self._conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
            except psycopg.Error as e:
                log.warning("cannot reach PostgreSQL for the lease: %s", e)
                self._conn = None
                return False
        try:
            cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEASE_KEY,))
            row = await cur.fetchone()
        except psycopg.Error as e:
            log.warning("PostgreSQL failed the lease try (%s); reconnecting next time", e)
            await self._drop()
            return False
        if row and row[0]:
            log.info("this process now holds the singleton lease (sweeper, fleet rollouts, device reports)")
            self._holding, self._checked = True, time.monotonic()
            for cb in self.on_acquired:
                cb()
            return True
        return False

    async def _drop(self) -> None:
        conn, self._conn, self._holding = self._conn, None, False
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error:
                pass

    @property
    def held(self) -> bool:
        return self._dsn is None or (self._holding and self._conn is not None and not self._conn.closed)

    async def release(self) -> None:
        await self._drop()

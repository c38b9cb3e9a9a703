"""Password hashing (argon2id) on a small fixed pool, so a login flood cannot take the machine.

Each argon2 hash costs ~tens of milliseconds of a core and 64 MiB of memory by design (pwdlib's
defaults). Run on the default thread pool, N concurrent logins were N cores and N x 64 MiB, and the
command path (the event loop, the database threads) waited behind them. Here at most `workers`
hashes run at once (default 1: one core of a small host; argon2 holds the GIL released, so it is
real parallel work) and at most `queue` more wait their turn; anything beyond is refused at once
with PoolBusy, which the routes answer 503 with Retry-After. Refusing, not queueing without bound:
a queued login that waits longer than the client's patience is work thrown away, and an unbounded
queue is unbounded memory. The per-address and per-account rate limits (api/riders/user_routes.py) come
first; this pool is the ceiling for what gets past them from many addresses at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

T = TypeVar("T")


class PoolBusy(Exception):
    """Every hashing slot and queue place is taken; str(e) says so, for the 503."""


class HashPool:
    def __init__(self, workers: int = 1, queue: int = 8) -> None:
        self.workers = max(1, workers)
        self.limit = self.workers + max(0, queue)
        self.hasher = PasswordHash((Argon2Hasher(),))
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="latch-argon2")
        self._lock = threading.Lock()
        self._pending = 0          # running + queued; counted down when the thread is done, not when the
        #                            awaiting request gives up (its hash still occupies the pool)
        self.refused = 0

    @property
    def pending(self) -> int:
        return self._pending

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        with self._lock:
            if self._pending >= self.limit:
                self.refused += 1
                raise PoolBusy(f"too many logins in progress on this server ({self.limit}); retry in a second")
            self._pending += 1
        try:
            fut: Future[T] = self._executor.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        fut.add_done_callback(self._done)
        return await asyncio.wrap_future(fut)

    def _done(self, _: object) -> None:
        with self._lock:
            self._pending -= 1

    async def hash(self, password: str) -> str:
        return await self._run(self.hasher.hash, password)

    async def verify(self, password: str, password_hash: str) -> bool:
        return await self._run(self.hasher.verify, password, password_hash)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

"""In-process wake-ups for requests waiting on a command to reach a final state."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Waiters:
    def __init__(self) -> None:
        self._waiting: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)

    def register(self, key: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[key].add(fut)
        return fut

    def unregister(self, key: str, fut: asyncio.Future[None]) -> None:
        futs = self._waiting.get(key)
        if futs is not None:
            futs.discard(fut)
            if not futs:
                del self._waiting[key]

    def notify(self, key: str) -> None:
        for fut in self._waiting.pop(key, ()):
            if not fut.done():
                fut.set_result(None)

    def __len__(self) -> int:
        return sum(len(v) for v in self._waiting.values())

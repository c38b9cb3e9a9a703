"""In-process wake-ups for requests waiting on a command to reach a final state.

A waiter's future resolves with what the waker knows: the command and its whole history when this
process made it final (api/commands/service.py keeps the history of a command someone waits on, so the
`?wait=` answer needs no read), or None when it only heard of it (another replica's event): then the
caller reads the command back.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any


class Waiters:
    def __init__(self) -> None:
        self._waiting: defaultdict[str, set[asyncio.Future[Any]]] = defaultdict(set)

    def register(self, key: str) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[key].add(fut)
        return fut

    def unregister(self, key: str, fut: asyncio.Future[Any]) -> None:
        futs = self._waiting.get(key)
        if futs is not None:
            futs.discard(fut)
            if not futs:
                del self._waiting[key]

    def waiting(self, key: str) -> bool:
        return key in self._waiting

    def notify(self, key: str, value: Any = None) -> None:
        for fut in self._waiting.pop(key, ()):
            if not fut.done():
                fut.set_result(value)

    def __len__(self) -> int:
        return sum(len(v) for v in self._waiting.values())

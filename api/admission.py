"""Admission control for commands: what this process cannot finish in time is refused at once.

Without it an overloaded API queued every request: driven at 400 unlocks/s it completed 996 of 8,000
(9/s, p99 46 s), far below the ~40/s it sustains, and most callers waited out their timeouts (issue 13).
A command is admitted only while

- fewer than `max_creating` commands are being created in this process (each holds a request, a
  database job and memory; a burst beyond that is refused, not queued), and
- the database writer has no standing queue: the shortest wait any write had in the last window
  (CoDel's signal — a burst that drains is fine, a queue that never drains is overload) is under
  `max_queue_ms`.

A refused command gets 503 with Retry-After before anything is written, so a retry is safe (with the
same Idempotency-Key it is still the same command). Device answers and timeouts are never refused:
they finish work already accepted, and they go first in the write queue (api/db.py Priority.ANSWER).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from api.errors import Overloaded


class StandingDelay:
    """The shortest wait seen in each `window_s`; the last complete window's is the standing delay."""

    def __init__(self, window_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._start = clock()
        self._min = float("inf")
        self._last = 0.0
        self._last_end = 0.0

    def observe(self, wait_s: float) -> None:
        """Called for every write as it starts (on the writer's thread or the loop: floats, no locks needed)."""
        now = self._clock()
        if now - self._start >= self.window_s:
            self._last = 0.0 if self._min == float("inf") else self._min
            self._last_end = now
            self._start, self._min = now, float("inf")
        if wait_s < self._min:
            self._min = wait_s

    def standing_s(self) -> float:
        """0 when the last window is stale (no writes for two windows: nothing is queued)."""
        if self._clock() - self._last_end > 2 * self.window_s:
            return 0.0
        return self._last


class Admission:
    def __init__(self, delay: StandingDelay, max_creating: int, max_queue_ms: float) -> None:
        self.delay = delay
        self.max_creating = max_creating
        self.max_queue_s = max_queue_ms / 1000
        self.creating = 0
        self.refused = 0

    def check(self) -> None:
        """Overloaded when a new command should not be taken now (see the module docstring)."""
        if self.creating >= self.max_creating:
            self.refused += 1
            raise Overloaded(f"busy: {self.creating} commands are being created here already; retry shortly")
        standing = self.delay.standing_s()
        if standing > self.max_queue_s:
            self.refused += 1
            raise Overloaded(f"busy: the database queue has stood {standing * 1000:.0f} ms; retry shortly")

    @contextmanager
    def creating_one(self) -> Iterator[None]:
        """Admit one command (Overloaded if not) and count it until its creation is done."""
        self.check()
        self.creating += 1
        try:
            yield
        finally:
            self.creating -= 1

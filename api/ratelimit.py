"""A token bucket per key (user), in this process's memory.

Per process: with several API processes behind a balancer each keeps its own buckets, so a user
gets up to that many times the rate. Good enough for one Latch process; a shared store comes later.
"""

from __future__ import annotations

import time


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> float:
        """0.0 when allowed (a token is spent); otherwise the seconds until a token is due."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled: they hold nothing a fresh bucket would not."""
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

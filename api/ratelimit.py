"""A token bucket per key (a user, a client address, an account), in this process's memory.

Per process: with several API processes behind a balancer each keeps its own buckets, so a key
gets up to that many times the rate. Good enough for one Latch process; a shared store comes later.

Memory is bounded: past `max_keys` buckets, the ones that have refilled are forgotten (they hold
nothing a fresh bucket would not); if that is not enough (a flood from more than `max_keys` keys at
once), the oldest are dropped: such a key starts over with a full burst, which only matters to
someone who already commands more than `max_keys` addresses.
"""

from __future__ import annotations

import ipaddress
import math
import time

from fastapi import HTTPException, Request


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, at); oldest first

    def take(self, key: str, now: float | None = None) -> float:
        """0.0 when allowed (a token is spent); otherwise the seconds until a token is due."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (float(self.burst), now))   # re-inserted: newest last
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")

    def _prune(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        excess = len(self._buckets) - self.max_keys
        if excess > 0:
            for k in list(self._buckets)[:excess + self.max_keys // 10]:   # room for a tenth more first
                del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


def too_many(what: str, wait_s: float) -> HTTPException:
    """A 429 saying what was limited and when to retry (Retry-After, whole seconds, at least 1)."""
    retry = max(1, math.ceil(wait_s)) if math.isfinite(wait_s) else 3600
    return HTTPException(429, f"{what}; retry in {retry}s", headers={"Retry-After": str(retry)})


def client_address(request: Request, trust_forwarded_for: bool = False) -> str:
    """The key for a client's address: the peer address (or, behind a trusted reverse proxy, the last
    hop of X-Forwarded-For, the one the proxy appended); an IPv6 address counts as its /64, which one
    subscriber usually holds whole (rotating addresses inside it must not buy more attempts)."""
    host = request.client.host if request.client else ""
    if trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "")
        if forwarded.strip():
            host = forwarded.split(",")[-1].strip()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)

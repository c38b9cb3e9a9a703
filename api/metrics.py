"""Counters of what the API saw and refused, served at GET /v1/metrics."""

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

"""Reading a Prometheus exposition in tests: prometheus_client's own parser, then samples by name and labels."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    families: dict[str, str]                                   # family name -> type
    samples: list[tuple[str, dict[str, str], float]]           # (sample name, labels, value)

    def value(self, name: str, **labels: str) -> float:
        """The sum of every sample `name` whose labels include `labels` (0 when none)."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)

    def label_values(self) -> set[str]:
        return {v for _, ls, _ in self.samples for v in ls.values()}


def parse(text: str) -> Scrape:
    families: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        samples.extend((s.name, dict(s.labels), s.value) for s in family.samples)
    return Scrape(families, samples)

"""The fuzz suite's findings, deduplicated: one line per (who, operation, what failed, server exception).

Hypothesis runs a failing case many times while it shrinks it; every run lands here and the smallest
input seen for each distinct failure is kept, so the summary shows a minimal reproduction next to the
exception the server logged. conftest.py prints it at the end of the run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Finding:
    who: str
    operation: str
    what: str            # the failed check's title, or the property that did not hold
    status: int | None
    server: str          # the server's exception summary ("" when it logged none)
    example: str         # the smallest input seen for this finding
    seen: int = 1


class Findings:
    def __init__(self) -> None:
        self._by_key: dict[tuple, Finding] = {}
        self._lock = threading.Lock()

    def add(self, who: str, operation: str, what: str, status: int | None, server: str, example: str) -> None:
        key = (who, operation, what, status, server)
        with self._lock:
            f = self._by_key.get(key)
            if f is None:
                self._by_key[key] = Finding(who, operation, what, status, server, example)
                return
            f.seen += 1
            if len(example) < len(f.example):
                f.example = example

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def lines(self) -> list[str]:
        out = []
        for f in sorted(self._by_key.values(), key=lambda f: (f.operation, f.who, f.what, f.server)):
            out.append(f"[{f.who}] {f.operation} -> {f.status}: {f.what}"
                       + (f"\n    server: {f.server}" if f.server else "")
                       + f"\n    smallest input: {f.example}  (seen {f.seen}x)")
        return out


FAILURES = Findings()


_failure_types: dict[str, type[AssertionError]] = {}


def failure(kind: str, message: str) -> AssertionError:
    """An AssertionError of a type of its own per kind of failure: Hypothesis tells distinct bugs apart by
    exception type and place, so one kind (say an undocumented 404) does not hide another (a 500) in the
    same test; each is reported on its own."""
    cls = _failure_types.get(kind)
    if cls is None:
        name = "Fuzz_" + "".join(c if c.isalnum() else "_" for c in kind)[:80]
        cls = _failure_types[kind] = type(name, (AssertionError,), {})
    return cls(message)

"""Per-(test, broker) expectations: known defects (strict xfail) and non-applicable combos (deselected).

Usage on a test function::

    @defect(AMQTT, "keepalive is never enforced (...)")
    @defect("amqtt_auth", "...", when=lambda p: p["variant"] == "clean")
    async def test_x(broker, observe, variant): ...

``when`` receives the item's parametrization dict (``broker`` plus any other
parametrized arguments).  A defect is a *strict* xfail: if the broker starts
behaving correctly the test XPASSes and the suite fails, so the entry must be
removed.  For Latch's own broker, add entries only for deliberate deviations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

AMQTT = ("amqtt_plain", "amqtt_auth")
AMQTT_VERSION = "amqtt 0.12.1"
NATS = ("nats",)   # nats-server 2.15.1's MQTT listener (issue 18's broker tier): its deviations, measured here
# brokers whose retained messages reach new subscriptions a moment after the publish was acknowledged (NATS keeps
# them in a JetStream stream and reads them back into its map): seen in CI once, a new subscription right after
# the PUBACK still got nothing. scenarios.retained_lifecycle lets these look again; every other broker must show
# the new state to the first subscription after the PUBACK.
RETAINED_SETTLES = NATS


@dataclass(frozen=True)
class Known:
    brokers: tuple[str, ...]
    reason: str
    kind: str  # "defect" | "n/a"
    when: Callable[[dict[str, Any]], bool] | None = None

    def mark(self) -> pytest.MarkDecorator:
        """Only for defects; "n/a" combos are deselected by conftest, never skipped."""
        assert self.kind == "defect"
        return pytest.mark.xfail(strict=True, reason=self.reason)


def _attach(fn: Callable, entry: Known) -> Callable:
    fn._known = (*getattr(fn, "_known", ()), entry)  # type: ignore[attr-defined]
    return fn


def _brokers(which: str | tuple[str, ...]) -> tuple[str, ...]:
    return (which,) if isinstance(which, str) else tuple(which)


def defect(which: str | tuple[str, ...], reason: str, *, when: Callable[[dict[str, Any]], bool] | None = None):
    """Declare a known defect of ``which`` broker(s): strict xfail."""
    prefix = f"{AMQTT_VERSION} defect: " if set(_brokers(which)) <= set(AMQTT) else "known defect: "
    return lambda fn: _attach(fn, Known(_brokers(which), prefix + reason, "defect", when))


def not_applicable(which: str | tuple[str, ...], reason: str, *, when: Callable[[dict[str, Any]], bool] | None = None):
    """Declare that a test does not apply to ``which`` broker's configuration: deselected."""
    return lambda fn: _attach(fn, Known(_brokers(which), reason, "n/a", when))

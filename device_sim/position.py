"""Where a simulated lock stands: a fixed spot in the simulated city (settings.sim_area), seeded by its id.

The firmware has no GPS and reports no position; a simulated lock adds `"pos": [lat, lon]` to the state
it reports (state messages and acks) so the rider's map has something to show. The protocol's state is
an open object (protocol/messages.py _check_state checks only `locked` and `battery`), so the firmware
and the API stay compatible with locks that report no position.
"""

from __future__ import annotations

from functools import lru_cache

from firmware.controller import LockController
from foundation.geo import parse_area, seeded_position
from foundation.settings import Settings


@lru_cache(maxsize=1)
def configured_area() -> tuple[float, float, float]:
    return parse_area(Settings().sim_area)


class PositionedController(LockController):
    """The firmware's controller, whose reported state also carries the lock's position."""

    def __init__(self, *args, pos: list[float], **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.pos = pos

    def state(self):  # type: ignore[no-untyped-def]
        s = super().state()
        s["pos"] = self.pos
        return s


def position_of(device_id: str) -> list[float]:
    return seeded_position(device_id, configured_area())

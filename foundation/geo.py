"""Positions for the rider's map: the simulated city area, a lock's stable place in it, and distances.

A position is `[lat, lon]` in degrees (WGS84), as a lock reports it in its state (`"pos"`). The area is
`"lat,lon,radius_m"` (settings.sim_area, env LATCH_SIM_AREA): simulated locks place themselves inside it,
each at a spot seeded by its device id, so a restarted simulator reports the same place.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

EARTH_RADIUS_M = 6_371_000.0


def parse_area(text: str) -> tuple[float, float, float]:
    """`"52.52,13.405,2500"` -> (lat, lon, radius_m); ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"area must be 'lat,lon,radius_m', got {text!r}")
    lat, lon, radius = (float(p) for p in parts)
    if not (-85 <= lat <= 85 and -180 <= lon <= 180 and 0 < radius <= 100_000):
        raise ValueError(f"area out of range (lat -85..85, lon -180..180, radius 0..100000 m): {text!r}")
    return lat, lon, radius


def seeded_position(device_id: str, area: tuple[float, float, float]) -> list[float]:
    """A spot inside `area` that depends only on the device id (uniform over the disc)."""
    lat0, lon0, radius = area
    rng = random.Random(hashlib.sha256(device_id.encode()).digest())
    r = radius * math.sqrt(rng.random())
    theta = rng.random() * 2 * math.pi
    dlat = (r * math.cos(theta)) / EARTH_RADIUS_M
    dlon = (r * math.sin(theta)) / (EARTH_RADIUS_M * math.cos(math.radians(lat0)))
    return [round(lat0 + math.degrees(dlat), 6), round(lon0 + math.degrees(dlon), 6)]


def valid_position(value: Any) -> tuple[float, float] | None:
    """A reported `pos` as (lat, lon), or None when it is missing or not a position."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    lat, lon = value
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lat, lon)):
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return float(lat), float(lon)


def distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance (haversine), metres."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))

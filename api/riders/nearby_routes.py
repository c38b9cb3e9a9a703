"""GET /v1/bikes/nearby: the bikes a rider can take, nearest first, a page at a time, with positions.

Owns the rider's "bikes near you": free bikes (online, not revoked, in nobody's ride) and the caller's
own, each with the position its lock reports (`reported.pos`, foundation/geo.py) and its distance from the
point asked for. Bikes whose lock has not reported a position come last, by id. Without `lat`/`lon`
distances are measured from the centre of the configured area (settings.sim_area).
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlmodel import Session, col, select

from api.deps import CallerDep, RuntimeDep
from api.models import Device
from api.riders.models import OPEN_RIDE, Ride
from foundation.geo import distance_m, parse_area, valid_position

router = APIRouter(tags=["rides"])


class NearbyBike(BaseModel):
    id: str
    name: str
    battery: int | None
    locked: bool | None
    yours: bool
    pos: list[float] | None = Field(description="[lat, lon] as the lock reports it; null when it has not")
    distance_m: int | None


class NearbyPage(BaseModel):
    origin: list[float] | None = Field(description="[lat, lon] the distances are measured from")
    area: list[float] | None = Field(description="[lat, lon, radius_m] of the service area (settings.sim_area)")
    total: int = Field(description="bikes you can take (and yours), all pages")
    offset: int
    bikes: list[NearbyBike]


@router.get("/v1/bikes/nearby", response_model=NearbyPage)
async def nearby(rt: RuntimeDep, who: CallerDep,
                 lat: float | None = Query(None, ge=-90, le=90), lon: float | None = Query(None, ge=-180, le=180),
                 limit: int = Query(10, ge=1, le=500), offset: int = Query(0, ge=0, le=100_000)) -> NearbyPage:
    """Free bikes (and the one you ride), nearest to `lat`,`lon` first; page with `limit`/`offset`."""
    try:
        area: tuple[float, float, float] | None = parse_area(rt.settings.sim_area)
    except ValueError:
        area = None
    origin = (lat, lon) if lat is not None and lon is not None else (area[:2] if area else None)

    def load(s: Session) -> tuple[list[Device], dict[str, str]]:
        devices = list(s.exec(select(Device).where(col(Device.revoked).is_(False))).all())
        rides = s.exec(select(Ride.device_id, Ride.user_id).where(col(Ride.status).in_(OPEN_RIDE))).all()
        return devices, {d: u for d, u in rides}

    devices, held = await rt.db.read(load)
    out = []
    for d in devices:
        holder = held.get(d.id)
        yours = holder is not None and holder == who.user_id
        if not yours and (holder is not None or not d.online):
            continue
        pos = valid_position(d.reported.get("pos"))
        dist = round(distance_m(origin, pos)) if origin is not None and pos is not None else None
        battery, locked = d.reported.get("battery"), d.reported.get("locked")
        out.append(NearbyBike(id=d.id, name=d.name, battery=battery if isinstance(battery, int) else None,
                              locked=locked if isinstance(locked, bool) else None, yours=yours,
                              pos=list(pos) if pos else None, distance_m=dist))
    out.sort(key=lambda b: (not b.yours, b.distance_m is None, b.distance_m or 0, b.id))
    return NearbyPage(origin=list(origin) if origin else None, area=list(area) if area else None,
                      total=len(out), offset=offset, bikes=out[offset:offset + limit])

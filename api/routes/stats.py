"""What the operator console (/ops) reads beyond the plain API, operators only (api/ops_queries.py):
fleet counts, the charts' time series, the newest events (the feed's backfill), a device's presence
history, and a command with who issued it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from api import ops_queries
from api.clock import now_ms
from api.commands.service import public
from api.deps import PrincipalDep, RuntimeDep
from api.errors import NotFound
from api.models import CommandPublic
from api.push.event_models import EventPublic

router = APIRouter(prefix="/v1/ops", tags=["operator console"])


class FleetSummary(BaseModel):
    total: int
    online: int = Field(description="online and not revoked")
    offline: int = Field(description="offline and not revoked")
    low_battery: int
    in_ride: int
    jammed: int = Field(description="the latest unlock/lock failed: jammed, or the motor never finished")
    revoked: int


class LatencySeries(BaseModel):
    p50: list[int | None]
    p99: list[int | None]


class Series(BaseModel):
    start: int = Field(description="ms since the epoch: the start of the first minute")
    step_ms: int
    minutes: int
    now: int
    commands: dict[str, list[int]] = Field(description="commands created in each minute, by their status now")
    latency_ms: dict[str, LatencySeries] = Field(
        description="per stage (dispatch: created→sent, delivery: sent→received, actuation: received→final, "
                    "total: created→final), p50 and p99 of the commands created in each minute; null: none")
    online: list[int] = Field(description="devices online at the end of each minute")
    online_now: int
    truncated: bool = Field(description="more commands than the series reads (the newest were counted)")


class PresenceChange(BaseModel):
    id: int
    at: int
    online: bool


class CommandDetail(CommandPublic):
    owner: str
    issued_by: dict[str, Any] = Field(description="who the owner is: kind (admin, operator, rider, fleet) and label")


@router.get("/summary", response_model=FleetSummary)
async def summary(rt: RuntimeDep, _: PrincipalDep) -> FleetSummary:
    """Fleet counts, each one COUNT in the database."""
    pct = rt.settings.low_battery_pct
    return FleetSummary(**await rt.db.read(lambda s: ops_queries.fleet_summary(s, pct)))


@router.get("/series", response_model=Series)
async def series(rt: RuntimeDep, _: PrincipalDep,
                 minutes: int = Query(60, ge=5, le=180, description="how many minutes back")) -> Series:
    """The charts: commands per minute by outcome, latency per stage (p50/p99), devices online."""
    return Series(**await rt.db.read(lambda s: ops_queries.series(s, minutes)))


@router.get("/events/recent", response_model=list[EventPublic])
async def recent_events(rt: RuntimeDep, _: PrincipalDep,
                        limit: int = Query(50, ge=1, le=500)) -> list[EventPublic]:
    """The newest events, oldest first: the live feed's backfill (resume the stream from the last id)."""
    rows = await rt.db.read(lambda s: ops_queries.recent_events(s, limit))
    return [EventPublic(id=r.id or 0, kind=r.kind, at=r.at, data=r.data) for r in rows]


@router.get("/devices/{device_id}/presence", response_model=list[PresenceChange],
            responses={404: {"description": "no such device"}})
async def presence(rt: RuntimeDep, _: PrincipalDep, device_id: str = Path(pattern=r"^[A-Za-z0-9_-]{1,64}$"),
                   hours: int = Query(24, ge=1, le=168), limit: int = Query(50, ge=1, le=500)) -> list[PresenceChange]:
    """The device's online/offline changes over the last `hours`, newest first."""
    if await rt.registry.get(device_id) is None:
        raise NotFound(f"no device {device_id!r}")
    since = now_ms() - hours * 3_600_000
    rows = await rt.db.read(lambda s: ops_queries.presence_history(s, device_id, since, limit))
    return [PresenceChange(**r) for r in rows]


@router.get("/commands/{command_id}", response_model=CommandDetail,
            responses={404: {"description": "no such command"}})
async def command(rt: RuntimeDep, _: PrincipalDep,
                  command_id: str = Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")) -> CommandDetail:
    """One command with its history and who issued it."""
    found = await rt.commands.with_history(command_id)
    if found is None:
        raise NotFound(f"no command {command_id!r}")
    cmd = found[0]
    who = await rt.db.read(lambda s: ops_queries.owner_words(s, cmd.owner))
    return CommandDetail(**public(*found).model_dump(), owner=cmd.owner, issued_by=who)

"""Fleet commands over HTTP (operators only): create, list, progress, per-device rows, cancel (api/fleet/service.py)."""

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status

from api.deps import PrincipalDep, RuntimeDep
from api.errors import Conflict, NotFound
from api.fleet.models import DEVICE_STATUSES, FleetCreate, FleetDevicePublic, FleetPublic, FleetStatus
from api.fleet.service import FleetError, FleetIdempotencyConflict, public
from api.paging import OffsetQuery
from api.runtime import Runtime

router = APIRouter(prefix="/v1/fleet/commands", tags=["fleet"])

_STATUSES = ", ".join(DEVICE_STATUSES)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FleetPublic,
             responses={200: {"description": "replay of an earlier request with the same Idempotency-Key"},
                        400: {"description": "the target matches no device, too many, or lists unknown ids"},
                        403: {"description": "riders may not send fleet commands"},
                        409: {"description": "Idempotency-Key reused with a different request"},
                        413: {"description": "the signed command would not fit what a lock reads"},
                        422: {"description": "a malformed body, or a rate or list above the configured maximum"}})
async def create_fleet_command(body: FleetCreate, rt: RuntimeDep, who: PrincipalDep, response: Response,
                               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> FleetPublic:
    """Send `action` to every device of the target (a tag, a zone or a list, resolved now: revoked devices
    are left out), `rate_per_min` devices per minute, each through its own command with the usual states.
    With `abort`, issuing stops once more than `failure_pct` % of at least `after` final device commands
    failed. Progress: GET /v1/fleet/commands/{id}."""
    s = rt.settings
    if body.rate_per_min > s.fleet_max_rate_per_min:
        raise HTTPException(422,
                            f"rate_per_min {body.rate_per_min} is above the most allowed, "
                            f"{s.fleet_max_rate_per_min} devices per minute (LATCH_FLEET_MAX_RATE_PER_MIN)")
    if body.target.devices is not None and len(body.target.devices) > s.fleet_max_devices:
        raise HTTPException(422,
                            f"target.devices lists {len(body.target.devices)} ids; at most {s.fleet_max_devices} "
                            f"per fleet command (LATCH_FLEET_MAX_DEVICES)")
    try:
        fleet, created = await rt.fleet.create(body, who.name, idempotency_key)
    except FleetError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e))
    except FleetIdempotencyConflict as e:
        raise Conflict(f"Idempotency-Key was already used for fleet command "
                                                      f"{e.args[0]} with a different request")
    if not created:
        response.status_code = status.HTTP_200_OK
    return await _public(rt, fleet.id)


async def _public(rt: Runtime, fleet_id: str) -> FleetPublic:
    found = await rt.fleet.get(fleet_id)
    if found is None:
        raise NotFound(f"no fleet command {fleet_id!r}")
    return public(*found)


@router.get("", response_model=list[FleetPublic])
async def list_fleet_commands(rt: RuntimeDep, _: PrincipalDep, limit: int = Query(50, ge=1, le=500),
                              offset: OffsetQuery = 0,
                              status_: Annotated[FleetStatus | None, Query(alias="status")] = None,
                              ) -> list[FleetPublic]:
    """Newest first, each with its progress counts."""
    return [public(f, c) for f, c in await rt.fleet.list(limit, offset, status_)]


@router.get("/{fleet_id}", response_model=FleetPublic)
async def get_fleet_command(fleet_id: str, rt: RuntimeDep, _: PrincipalDep) -> FleetPublic:
    """Status and progress: `counts` of device commands by status (`pending` = not issued yet)."""
    return await _public(rt, fleet_id)


@router.get("/{fleet_id}/devices", response_model=list[FleetDevicePublic])
async def list_fleet_devices(fleet_id: str, rt: RuntimeDep, _: PrincipalDep,
                             status_: Annotated[str | None, Query(alias="status", description=_STATUSES)] = None,
                             limit: int = Query(100, ge=1, le=1000),
                             offset: OffsetQuery = 0) -> list[FleetDevicePublic]:
    """Each device of the fleet in issue order, with its command's id and status."""
    if status_ is not None and status_ not in DEVICE_STATUSES:
        raise HTTPException(422,
                            f"unknown status {status_[:40]!r}; one of: {_STATUSES}")
    rows = await rt.fleet.devices(fleet_id, status_, limit, offset)
    if rows is None:
        raise NotFound(f"no fleet command {fleet_id!r}")
    return rows


@router.post("/{fleet_id}/cancel", response_model=FleetPublic,
             responses={404: {"description": "no such fleet command"},
                        409: {"description": "the fleet command is no longer running"}})
async def cancel_fleet_command(fleet_id: str, rt: RuntimeDep, _: PrincipalDep) -> FleetPublic:
    """Stop issuing. Device commands already issued are left to finish (cancel a queued one with
    POST /v1/commands/{id}/cancel)."""
    out = await rt.fleet.cancel(fleet_id)
    if out is None:
        raise NotFound(f"no fleet command {fleet_id!r}")
    fleet, applied = out
    if not applied:
        raise Conflict(f"fleet command is {fleet.status}; only a running one can be cancelled")
    return await _public(rt, fleet_id)

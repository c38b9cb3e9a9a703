from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status

from api import ops_queries
from api.deps import PrincipalDep, RuntimeDep
from api.errors import Conflict, NotFound
from api.models import DeviceCreate, DeviceCredentials, DevicePatch, DevicePublic
from api.ops_queries import DeviceFilter, DeviceSort
from api.paging import OffsetQuery
from api.registry.devices import DeviceExists, public

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeviceCredentials)
async def register_device(body: DeviceCreate, rt: RuntimeDep, _: PrincipalDep) -> DeviceCredentials:
    """Register a lock. The MQTT password and command key are returned here, once."""
    try:
        return await rt.registry.register(body)
    except DeviceExists:
        raise Conflict(f"device {body.id!r} already exists; "
                            f"POST /v1/devices/{body.id}/credentials to rotate its secrets")


class DeviceListed(DevicePublic):
    in_ride: bool = False
    jammed: bool = False


@router.get("", response_model=list[DeviceListed],
            responses={200: {"headers": {"X-Total-Count": {"description": "devices matching, all pages",
                                                           "schema": {"type": "integer"}}}}})
async def list_devices(rt: RuntimeDep, _: PrincipalDep, response: Response,
                       limit: int = Query(100, ge=1, le=1000), offset: OffsetQuery = 0,
                       q: Annotated[str | None, Query(max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$",
                                                     description="part of the id or name (any case)")] = None,
                       filter_: Annotated[list[DeviceFilter], Query(
                           alias="filter", max_length=6,
                           description="repeatable, all must hold: online, offline (neither counts revoked "
                                       "ones out), low_battery (below LATCH_LOW_BATTERY_PCT), in_ride (an open "
                                       "ride), jammed (its latest unlock/lock failed jammed), revoked")] = [],
                       sort: DeviceSort = DeviceSort.ID) -> list[DeviceListed]:
    """The fleet, a page at a time (the count of all that match in `X-Total-Count`), with search, filters
    and sort done in the database."""
    pct = rt.settings.low_battery_pct
    found, total, flags = await rt.db.read(
        lambda s: ops_queries.search_devices(s, q, list(dict.fromkeys(filter_)), sort, limit, offset, pct))
    tags = await rt.registry.tags_of([d.id for d in found])
    response.headers["X-Total-Count"] = str(total)
    return [DeviceListed(**public(d, tags[d.id]).model_dump(), **flags[d.id]) for d in found]


@router.get("/{device_id}", response_model=DevicePublic)
async def get_device(device_id: str, rt: RuntimeDep, _: PrincipalDep) -> DevicePublic:
    device = await rt.registry.get(device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    return public(device, (await rt.registry.tags_of([device_id]))[device_id])


@router.patch("/{device_id}", response_model=DevicePublic, responses={404: {"description": "no such device"}})
async def patch_device(device_id: str, body: DevicePatch, rt: RuntimeDep, _: PrincipalDep) -> DevicePublic:
    """Set a lock's zone and/or replace its tags (what fleet commands target); fields not sent stay."""
    if not body.model_fields_set:
        raise HTTPException(422, "nothing to change: send zone and/or tags")
    found = await rt.registry.patch(device_id, body)
    if found is None:
        raise NotFound(f"no device {device_id!r}")
    return public(*found)


@router.post("/{device_id}/credentials", response_model=DeviceCredentials)
async def rotate_credentials(device_id: str, rt: RuntimeDep, _: PrincipalDep) -> DeviceCredentials:
    """New MQTT password and command key; the old ones stop working at once."""
    creds = await rt.registry.rotate(device_id)
    if creds is None:
        raise NotFound(f"no device {device_id!r}")
    return creds


@router.delete("/{device_id}", response_model=DevicePublic, responses={404: {"description": "no such device"}})
async def revoke_device(device_id: str, rt: RuntimeDep, _: PrincipalDep) -> DevicePublic:
    """Revoke a lock: its MQTT credentials are refused from now on (Latch's broker refuses its next login;
    an external Mosquitto drops it at the reload this triggers, see docs/external-brokers.md). The record
    and its history stay; POST /v1/devices/{id}/credentials issues new credentials and lets it back in."""
    device = await rt.registry.revoke(device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    return public(device, (await rt.registry.tags_of([device_id]))[device_id])

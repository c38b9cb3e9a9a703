from fastapi import APIRouter, HTTPException, Query, status

from api.paging import OffsetQuery
from api.devices import DeviceExists, public
from api.deps import PrincipalDep, RuntimeDep
from api.models import DeviceCreate, DeviceCredentials, DevicePatch, DevicePublic

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeviceCredentials)
async def register_device(body: DeviceCreate, rt: RuntimeDep, _: PrincipalDep) -> DeviceCredentials:
    """Register a lock. The MQTT password and command key are returned here, once."""
    try:
        return await rt.registry.register(body)
    except DeviceExists:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"device {body.id!r} already exists; POST /v1/devices/{body.id}/credentials to rotate its secrets")


@router.get("", response_model=list[DevicePublic])
async def list_devices(rt: RuntimeDep, _: PrincipalDep, limit: int = Query(100, ge=1, le=1000),
                       offset: OffsetQuery = 0) -> list[DevicePublic]:
    found = await rt.registry.list(limit, offset)
    tags = await rt.registry.tags_of([d.id for d in found])
    return [public(d, tags[d.id]) for d in found]


@router.get("/{device_id}", response_model=DevicePublic)
async def get_device(device_id: str, rt: RuntimeDep, _: PrincipalDep) -> DevicePublic:
    device = await rt.registry.get(device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return public(device, (await rt.registry.tags_of([device_id]))[device_id])


@router.patch("/{device_id}", response_model=DevicePublic, responses={404: {"description": "no such device"}})
async def patch_device(device_id: str, body: DevicePatch, rt: RuntimeDep, _: PrincipalDep) -> DevicePublic:
    """Set a lock's zone and/or replace its tags (what fleet commands target); fields not sent stay."""
    if not body.model_fields_set:
        raise HTTPException(422, "nothing to change: send zone and/or tags")
    found = await rt.registry.patch(device_id, body)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return public(*found)


@router.post("/{device_id}/credentials", response_model=DeviceCredentials)
async def rotate_credentials(device_id: str, rt: RuntimeDep, _: PrincipalDep) -> DeviceCredentials:
    """New MQTT password and command key; the old ones stop working at once."""
    creds = await rt.registry.rotate(device_id)
    if creds is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return creds


@router.delete("/{device_id}", response_model=DevicePublic, responses={404: {"description": "no such device"}})
async def revoke_device(device_id: str, rt: RuntimeDep, _: PrincipalDep) -> DevicePublic:
    """Revoke a lock: its MQTT credentials are refused from now on (Latch's broker refuses its next login;
    an external Mosquitto drops it at the reload this triggers, see docs/external-brokers.md). The record
    and its history stay; POST /v1/devices/{id}/credentials issues new credentials and lets it back in."""
    device = await rt.registry.revoke(device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return public(device, (await rt.registry.tags_of([device_id]))[device_id])

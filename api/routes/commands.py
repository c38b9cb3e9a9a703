from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status

from api.commands import IdempotencyConflict, public
from api.deps import PrincipalDep, RuntimeDep
from api.models import CommandCreate, CommandPublic

router = APIRouter(tags=["commands"])

WaitQuery = Annotated[float, Query(ge=0, le=60, description="hold the response up to this many seconds "
                                                              "until the command reaches a final state")]


@router.post("/v1/devices/{device_id}/commands", status_code=status.HTTP_201_CREATED,
             response_model=CommandPublic,
             responses={200: {"description": "replay of an earlier request with the same Idempotency-Key"},
                        404: {"description": "no such device"},
                        409: {"description": "Idempotency-Key reused with a different request"}})
async def send_command(device_id: str, body: CommandCreate, rt: RuntimeDep, who: PrincipalDep,
                       response: Response, wait: WaitQuery = 0,
                       idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> CommandPublic:
    device = await rt.registry.get(device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    if device.revoked:
        raise HTTPException(status.HTTP_409_CONFLICT, f"device {device_id!r} is revoked")
    try:
        cmd, created = await rt.commands.create(device, body, who.name, idempotency_key)
    except IdempotencyConflict as e:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"Idempotency-Key was already used for command {e.args[0]} with a different request")
    if not created:
        response.status_code = status.HTTP_200_OK
    if wait:
        cmd = await rt.commands.wait_final(cmd.id, min(wait, rt.settings.max_wait_s)) or cmd
    return public(cmd, await rt.commands.history(cmd.id))


@router.get("/v1/commands/{command_id}", response_model=CommandPublic)
async def get_command(command_id: str, rt: RuntimeDep, _: PrincipalDep, wait: WaitQuery = 0) -> CommandPublic:
    cmd = await (rt.commands.wait_final(command_id, wait) if wait else rt.commands.get(command_id))
    if cmd is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no command {command_id!r}")
    return public(cmd, await rt.commands.history(command_id))


@router.post("/v1/commands/{command_id}/cancel", response_model=CommandPublic)
async def cancel_command(command_id: str, rt: RuntimeDep, _: PrincipalDep) -> CommandPublic:
    out = await rt.commands.cancel(command_id)
    if out is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no command {command_id!r}")
    if not out.applied:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"command is {out.command.status}; only a queued command can be cancelled")
    return public(out.command, await rt.commands.history(command_id))


@router.get("/v1/devices/{device_id}/commands", response_model=list[CommandPublic])
async def list_device_commands(device_id: str, rt: RuntimeDep, _: PrincipalDep,
                               limit: int = Query(50, ge=1, le=500),
                               offset: int = Query(0, ge=0)) -> list[CommandPublic]:
    if await rt.registry.get(device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return [public(c) for c in await rt.commands.list_for_device(device_id, limit, offset)]

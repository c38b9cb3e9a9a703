from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from api.commands.service import IdempotencyConflict, new_command_id, public
from api.commands.states import Status, is_final
from api.deps import CallerDep, PrincipalDep, RuntimeDep
from api.errors import Conflict, NotFound
from api.models import CommandCreate, CommandPublic
from api.paging import OffsetQuery
from api.runtime import Runtime

router = APIRouter(tags=["commands"])

WaitQuery = Annotated[float, Query(ge=0, le=60, description="hold the response up to this many seconds "
                                                              "until the command reaches a final state")]


@router.post("/v1/devices/{device_id}/commands", status_code=status.HTTP_201_CREATED,
             response_model=CommandPublic,
             responses={200: {"description": "replay of an earlier request with the same Idempotency-Key"},
                        403: {"description": "a rider who does not hold this bike, or an operator-only action"},
                        404: {"description": "no such device"},
                        409: {"description": "Idempotency-Key reused with a different request"},
                        413: {"description": "the signed command would not fit what a lock reads"},
                        429: {"description": "too many commands from this user (see Retry-After)"}})
async def send_command(device_id: str, body: CommandCreate, rt: RuntimeDep, who: CallerDep,
                       response: Response, wait: WaitQuery = 0,
                       idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> CommandPublic:
    """Operators command any device; a rider only the bike of their open ride (unlock, lock, locate).
    503 with Retry-After when this API is overloaded (nothing written: retry, best with the same
    Idempotency-Key)."""
    rt.admission.check()   # before any work: refusing must stay cheap under overload
    await rt.rights.check_command(who, device_id, body.action)
    device = await rt.registry.get_for_command(device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    if device.revoked:
        raise Conflict(f"device {device_id!r} is revoked")
    command_id = new_command_id()
    outcome = rt.waiters.register(command_id)   # before the command exists, so no outcome can slip past
    try:
        try:
            with rt.admission.creating_one():
                cmd, created = await rt.commands.create(device, body, who.name, idempotency_key, command_id)
        except IdempotencyConflict as e:
            raise Conflict(f"Idempotency-Key was already used for command {e.args[0]} with a different request")
        if not created:
            response.status_code = status.HTTP_200_OK
            if wait:   # a replay: wait on the original command
                await rt.commands.wait_final(cmd.id, min(wait, rt.settings.max_wait_s))
        elif wait and not is_final(Status(cmd.status)):
            await rt.commands.wait_on(command_id, outcome, min(wait, rt.settings.max_wait_s))
    finally:
        rt.waiters.unregister(command_id, outcome)
        rt.commands.forget(command_id)
    answer = outcome.result() if created and outcome.done() and not outcome.cancelled() else None
    if answer is not None:
        rt.metrics.inc("wait_answers_in_hand")
        return public(*answer)   # made final by this process: the command and its whole history are in hand
    return await _with_history(rt, cmd.id)


async def _with_history(rt: Runtime, command_id: str) -> CommandPublic:
    found = await rt.commands.with_history(command_id)
    if found is None:
        raise NotFound(f"no command {command_id!r}")
    return public(*found)


@router.get("/v1/commands", response_model=list[CommandPublic])
async def list_commands(rt: RuntimeDep, who: CallerDep, limit: int = Query(50, ge=1, le=500),
                        offset: OffsetQuery = 0) -> list[CommandPublic]:
    """Newest first: every command for an operator, a rider's own for a rider."""
    owner = None if who.is_operator else who.name
    return [public(c) for c in await rt.commands.list_recent(owner, limit, offset)]


@router.get("/v1/commands/{command_id}", response_model=CommandPublic,
            responses={403: {"description": "a rider asking for someone else's command"}})
async def get_command(command_id: str, rt: RuntimeDep, who: CallerDep, wait: WaitQuery = 0) -> CommandPublic:
    if not who.is_operator:
        cmd = await rt.commands.get(command_id)
        if cmd is None:
            raise NotFound(f"no command {command_id!r}")
        rt.rights.check_sees_command(who, cmd)
    if wait:
        await rt.commands.wait_final(command_id, wait)
    return await _with_history(rt, command_id)


@router.post("/v1/commands/{command_id}/cancel", response_model=CommandPublic,
             responses={409: {"description": "the command is past queued: only a queued command can be cancelled"}})
async def cancel_command(command_id: str, rt: RuntimeDep, _: PrincipalDep) -> CommandPublic:
    out = await rt.commands.cancel(command_id)
    if out is None:
        raise NotFound(f"no command {command_id!r}")
    if not out.applied:
        raise Conflict(f"command is {out.command.status}; only a queued command can be cancelled")
    return await _with_history(rt, command_id)


@router.get("/v1/devices/{device_id}/commands", response_model=list[CommandPublic])
async def list_device_commands(device_id: str, rt: RuntimeDep, _: PrincipalDep,
                               limit: int = Query(50, ge=1, le=500),
                               offset: OffsetQuery = 0) -> list[CommandPublic]:
    if await rt.registry.get(device_id) is None:
        raise NotFound(f"no device {device_id!r}")
    return [public(c) for c in await rt.commands.list_for_device(device_id, limit, offset)]

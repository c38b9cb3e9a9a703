"""POST /v1/rides/{ride_id}/cancel: a rider calls off their own ride's unlock while it is still safe.

Safe means the unlock is still `queued`: not yet handed to the broker, so no lock can act on it. Once
sent, a lock may already be opening; then this answers 409 and the rider waits for the outcome. The
cancelled unlock ends the ride as failed, as any unsuccessful unlock does (api/rides.py).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from api.commands import public as command_public
from api.deps import CallerDep, RuntimeDep
from api.models import CommandPublic
from api.rider_models import RideStatus
from api.rights import Refused

router = APIRouter(tags=["rides"])


@router.post("/v1/rides/{ride_id}/cancel", response_model=CommandPublic,
             responses={403: {"description": "not your ride"}, 404: {"description": "no such ride"},
                        409: {"description": "the unlock is already on its way (or the ride is not starting)"}})
async def cancel_unlock(ride_id: str, rt: RuntimeDep, who: CallerDep) -> CommandPublic:
    """Cancel your starting ride's unlock while it is queued; 409 once it has gone out to the lock."""
    try:
        ride = await rt.rides.get(who, ride_id)
    except Refused as e:
        raise e.http()
    if ride.status != RideStatus.STARTING or ride.unlock_command_id is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the ride is {ride.status}: there is no unlock to cancel")
    out = await rt.commands.cancel(ride.unlock_command_id)
    if out is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the ride's unlock is gone")
    if not out.applied:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"the unlock is already {out.command.status}: it can no longer be called back")
    found = await rt.commands.with_history(ride.unlock_command_id)
    assert found is not None
    return command_public(*found)

from fastapi import APIRouter, Query, status

from api.commands.service import public as command_public
from api.deps import CallerDep, RuntimeDep
from api.paging import OffsetQuery
from api.riders.models import BikePublic, RideCreate, RidePublic, RideStarted
from api.riders.rides import public

router = APIRouter(tags=["rides"])


@router.get("/v1/bikes", response_model=list[BikePublic])
async def bikes(rt: RuntimeDep, who: CallerDep, limit: int = Query(1000, ge=1, le=5000)) -> list[BikePublic]:
    """Every bike with battery, online and lock state; `free` ones can be ridden, `yours` is in your ride."""
    return await rt.rides.bikes(who, limit)


@router.post("/v1/rides", status_code=status.HTTP_201_CREATED, response_model=RideStarted,
             responses={403: {"description": "the admin token cannot ride"}, 404: {"description": "no such bike"},
                        409: {"description": "the bike is offline or taken, or you already ride"},
                        429: {"description": "too many commands (see Retry-After)"}})
async def start_ride(body: RideCreate, rt: RuntimeDep, who: CallerDep) -> RideStarted:
    """Start a ride: the bike must be free and online; its unlock is sent at once. Follow the unlock
    on the event stream (or GET /v1/commands/{unlock.id}?wait=): the ride turns active when it succeeds."""
    rt.rights.check_rate(who)
    with rt.admission.creating_one():   # the ride's unlock is a command: 503 when overloaded
        ride, cmd = await rt.rides.start(who, body)
    return RideStarted(**public(ride).model_dump(), unlock=command_public(cmd))


@router.get("/v1/rides", response_model=list[RidePublic])
async def list_rides(rt: RuntimeDep, who: CallerDep, user_id: str | None = None, open: bool = False,
                     limit: int = Query(50, ge=1, le=500), offset: OffsetQuery = 0) -> list[RidePublic]:
    """Your rides (operators: everyone's, or one user's with `user_id`), newest first."""
    return [public(r) for r in await rt.rides.list(who, limit, offset, user_id, open)]


@router.get("/v1/rides/{ride_id}", response_model=RidePublic)
async def get_ride(ride_id: str, rt: RuntimeDep, who: CallerDep) -> RidePublic:
    return public(await rt.rides.get(who, ride_id))


@router.post("/v1/rides/{ride_id}/end", response_model=RidePublic,
             responses={403: {"description": "not your ride"}, 409: {"description": "not active"}})
async def end_ride(ride_id: str, rt: RuntimeDep, who: CallerDep) -> RidePublic:
    """End your active ride. If the lock reports the bike unlocked, a lock command goes out (end_command_id)."""
    rt.rights.check_rate(who)
    return public(await rt.rides.end(who, ride_id))

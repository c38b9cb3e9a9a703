"""Dependency aliases every route reuses.

    PrincipalDep  an operator (the admin token or an operator's token); a rider gets 403.
                  The fleet-management endpoints use it, as they did before riders existed.
    CallerDep     anyone with a valid token whose session stands (api/riders/users.py Sessions); the route
                  applies rider rights itself (api/rights.py).
    StreamCallerDep  like CallerDep, but also accepts a short-lived stream token in ?token=.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

# async on purpose: FastAPI runs a plain `def` dependency in a worker thread, per request.
from api.auth import Principal, authenticate
from api.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_caller(request: Request) -> Principal:
    rt: Runtime = request.app.state.runtime
    return await authenticate(request, rt.settings.admin_token or "", rt.settings.jwt_secret, rt.users.sessions)


async def get_stream_caller(request: Request) -> Principal:
    rt: Runtime = request.app.state.runtime
    return await authenticate(request, rt.settings.admin_token or "", rt.settings.jwt_secret, rt.users.sessions,
                              query_token=True)


async def get_principal(request: Request) -> Principal:
    who = await get_caller(request)
    if not who.is_operator:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "operators only: riders use /v1/bikes, /v1/rides, /v1/commands/{id} and /v1/events")
    return who


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
OperatorDep = PrincipalDep
CallerDep = Annotated[Principal, Depends(get_caller)]
StreamCallerDep = Annotated[Principal, Depends(get_stream_caller)]

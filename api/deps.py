"""Dependency aliases every route reuses."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

# async on purpose: FastAPI runs a plain `def` dependency in a worker thread, per request.

from api.auth import Principal, authenticate
from api.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_principal(request: Request) -> Principal:
    return authenticate(request, request.app.state.runtime.settings.admin_token)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]

"""Fixtures for the rider and push tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from tests.api.push_support import User, sign_up
from tests.support import LiveStack


@pytest.fixture
async def users(stack: LiveStack) -> AsyncIterator[Callable[..., Awaitable[User]]]:
    """users(role="rider") -> a new account, logged in, with its own HTTP client."""
    clients: list[httpx.AsyncClient] = []

    async def make(role: str = "rider", **kw: object) -> User:
        return await sign_up(stack, role, clients=clients, **kw)  # type: ignore[arg-type]

    try:
        yield make
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)

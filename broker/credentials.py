"""Where the broker looks up device credentials: the device registry's table.

The API owns the registry (table `device`); the broker only reads the two
columns it needs, so `latch broker` can run beside `latch api` on the same
database without importing the API.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.identity import SERVICE_USERNAME, Identity, Role, hash_secret, secret_matches


class CredentialStore(Protocol):
    async def check(self, username: str | None, password: str | None) -> Identity | None: ...


class SqlCredentialStore:
    """Checks devices against the registry and the service against its secret."""

    def __init__(self, engine: AsyncEngine, service_secret: str) -> None:
        self._engine = engine
        self._service_hash = hash_secret(service_secret)

    async def check(self, username: str | None, password: str | None) -> Identity | None:
        if not username or password is None:
            return None
        if username == SERVICE_USERNAME:
            ok = secret_matches(password, self._service_hash)
            return Identity(Role.SERVICE, username) if ok else None
        async with self._engine.connect() as conn:
            row = (await conn.execute(
                text("SELECT secret_hash, revoked FROM device WHERE id = :id"), {"id": username},
            )).first()
        if row is None or row.revoked or not secret_matches(password, row.secret_hash):
            return None
        return Identity(Role.DEVICE, username)


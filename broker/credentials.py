"""Where the broker looks up device credentials: the device registry's table.

The API owns the registry (table `device`); the broker only reads the two
columns it needs with plain SQL, so `latch broker` can run beside `latch api`
on the same database without the API's models.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import text

from api.db import Database

from broker.identity import SERVICE_USERNAME, Identity, Role, hash_secret, secret_matches


class CredentialStore(Protocol):
    async def check(self, username: str | None, password: str | None) -> Identity | None: ...


class SqlCredentialStore:
    """Checks devices against the registry and the service against its secret."""

    def __init__(self, db: Database, service_secret: str) -> None:
        self._db = db
        self._service_hash = hash_secret(service_secret)

    async def check(self, username: str | None, password: str | None) -> Identity | None:
        if not username or password is None:
            return None
        if username == SERVICE_USERNAME:
            ok = secret_matches(password, self._service_hash)
            return Identity(Role.SERVICE, username) if ok else None
        row = await self._db.read(lambda s: s.connection().execute(
            text("SELECT secret_hash, revoked FROM device WHERE id = :id"), {"id": username}).first())
        if row is None or row.revoked or not secret_matches(password, row.secret_hash):
            return None
        return Identity(Role.DEVICE, username)


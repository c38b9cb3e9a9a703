"""The registry's answer to the broker's login question (broker/credentials.py's CredentialStore).

The API owns the registry (table `device`) and the users' sessions (tables
`user_session`, `user`); this store reads only the columns a login needs with plain
SQL, so `latch broker` can run beside `latch api` on the same database without
the API's models. A rider's MQTT login (password = access token) is accepted
only while the token's session is not revoked and its user not deleted — read
at every login, no cache (logins are rare next to requests). The one thing it
writes: when a rider's app logged in (`user.mqtt_login_at`, at most once an
hour per rider), so the API publishes notification copies only to the topics
of riders who have a session on the broker (api/notifications/service.py).

Every broker tier uses it: Latch's own broker (`latch broker`, `latch serve`), and through api/registry/broker_auth.py
the EMQX/VerneMQ HTTP hooks and the NATS auth callout.
"""

from __future__ import annotations

import logging

from sqlalchemy import text

from api import tokens
from api.clock import now_ms
from api.db import Database, Priority
from broker.identity import SERVICE_USERNAME, Identity, Role, hash_secret, secret_matches

log = logging.getLogger("latch.broker.credentials")
MQTT_LOGIN_EVERY_MS = 3_600_000   # a rider's MQTT login is written at most this often


class SqlCredentialStore:
    """Checks devices against the registry, the service against its secret, and users by their token."""

    def __init__(self, db: Database, service_secret: str, jwt_secret: str | None = None) -> None:
        self._db = db
        self._service_hash = hash_secret(service_secret)
        self._jwt_secret = jwt_secret

    async def check(self, username: str | None, password: str | None) -> Identity | None:
        if not username or password is None:
            return None
        if username == SERVICE_USERNAME:
            ok = secret_matches(password, self._service_hash)
            return Identity(Role.SERVICE, username) if ok else None
        if self._jwt_secret is not None and tokens.looks_like_jwt(password):
            # a user's app: username = user id, password = the user's access token (device secrets have no '.')
            try:
                claims = tokens.verify(self._jwt_secret, password)
            except tokens.TokenError:
                return None
            if claims.user_id != username or claims.session_id is None:
                return None
            stands, last_login = await self._session_stands(claims.session_id, username)
            if not stands:
                return None
            if last_login is None or last_login < now_ms() - MQTT_LOGIN_EVERY_MS:
                await self._mqtt_login(username)
            return Identity(Role.USER, username)
        row = await self._device(username)
        if row is None or row.revoked or not secret_matches(password, row.secret_hash):
            return None
        return Identity(Role.DEVICE, username)

    async def check_certificate(self, common_name: str) -> Identity | None:
        """A client certificate signed by the broker's client CA names a device: it must exist and
        not be revoked (revocation in the registry works for certificates too)."""
        if common_name == SERVICE_USERNAME:
            return None          # the service identity logs in with its secret only
        row = await self._device(common_name)
        if row is None or row.revoked:
            return None
        return Identity(Role.DEVICE, common_name)

    async def _session_stands(self, session_id: str, user_id: str) -> tuple[bool, int | None]:
        """(the session is valid, when the user's app last logged into the broker)."""
        row = await self._db.read(lambda s: s.connection().execute(text(
            'SELECT u.mqtt_login_at FROM user_session s JOIN "user" u ON u.id = s.user_id '
            "WHERE s.id = :sid AND s.user_id = :uid AND s.revoked_at IS NULL AND u.deleted_at IS NULL"),
            {"sid": session_id, "uid": user_id}).first())
        return (False, None) if row is None else (True, row[0])

    async def _mqtt_login(self, user_id: str) -> None:
        """Record the rider's MQTT login; a failure is logged and the login still succeeds (the cost: no
        notification copies on MQTT until a later login is recorded; the app reads them by cursor)."""
        def unit(s):  # type: ignore[no-untyped-def]
            s.connection().execute(text('UPDATE "user" SET mqtt_login_at = :now WHERE id = :uid'),
                                   {"now": now_ms(), "uid": user_id})
            s.commit()

        try:
            await self._db.write(unit, Priority.REPORT)
        except Exception as e:   # noqa: BLE001 - a login must not fail on this bookkeeping
            log.warning("could not record the MQTT login of user %s: %s", user_id, e)

    async def _device(self, device_id: str):  # type: ignore[no-untyped-def]
        return await self._db.read(lambda s: s.connection().execute(
            text("SELECT secret_hash, revoked FROM device WHERE id = :id"), {"id": device_id}).first())

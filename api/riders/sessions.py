"""Which users' tokens are accepted now: one `user_session` row per login, checked on every request.

A token names its session (`sid`). `confirm` accepts it only while the session exists, belongs to the
token's user, is not revoked (logout, password change) and that user is not deleted, and gives the caller
the role in the user's row, not the one in the token (so demoting or deleting an operator takes effect
without waiting for their tokens to expire).

Cache: what `confirm` read is kept in this process for `session_cache_s` (default 5 s) per session. A rider's
app polls, streams and commands several times a second; without the cache each of those requests would be
one more database read (a reader-thread hop on SQLite, a round trip on PostgreSQL) for an answer that
changes a few times in a session's life. Anything revoked through this process drops its entries at once,
so here it takes effect on the next request; another replica sharing the database sees it within
`session_cache_s`. That bound is the price, and 5 s is shorter than any human round trip between "log out"
and "try the old token" that would matter (a stolen token is replayed in minutes, not milliseconds).
The broker reads the same rows without a cache (api/registry/credentials.py): an MQTT login is rarer than a request.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlmodel import Session, col, delete, select, update

from api.auth import ADMIN_NAME, AuthError, Principal
from api.clock import now_ms
from api.db import Database
from api.riders.models import User, UserSession

REVOKED = "this token's session was revoked (logged out or password changed): log in again"
GONE = "this token's user no longer exists"


@dataclass(frozen=True, slots=True)
class _Seen:
    user_id: str | None      # None: no such session
    role: str | None         # None: the user is deleted
    revoked: bool
    at: float                # time.monotonic() when read


class Sessions:
    def __init__(self, db: Database, cache_s: float = 5.0, max_cached: int = 100_000) -> None:
        self.db = db
        self.cache_s = cache_s
        self.max_cached = max_cached
        self._seen: dict[str, _Seen] = {}
        self._by_user: dict[str, set[str]] = {}

    async def open(self, user_id: str, expires_at_ms: int) -> str:
        """A new session for `user_id` (a login or sign-up); also forgets the user's expired sessions,
        so the table holds at most the logins of one token lifetime (and logins are rate limited)."""
        sid, now = uuid.uuid4().hex, now_ms()

        def insert(s: Session) -> None:
            s.exec(delete(UserSession).where(col(UserSession.user_id) == user_id,  # type: ignore[call-overload]
                                             col(UserSession.expires_at) < now))
            s.add(UserSession(id=sid, user_id=user_id, created_at=now, expires_at=expires_at_ms))
            s.commit()

        await self.db.write(insert)
        return sid

    async def confirm(self, who: Principal) -> Principal:
        """`who` as resolved from a token, checked against the database; AuthError when refused."""
        if who.name == ADMIN_NAME and who.user_id is None:
            return who                       # the admin token (or a stream token it minted): no session
        sid = who.session_id
        if sid is None:
            raise AuthError("this token predates revocable sessions: log in again")
        seen = self._seen.get(sid)
        if seen is None or time.monotonic() - seen.at > self.cache_s:
            seen = await self.db.read(lambda s: _read(s, sid))
            self._remember(sid, seen)
        if seen.user_id is None or seen.user_id != who.user_id:
            raise AuthError("invalid token: no such session")
        if seen.role is None:
            raise AuthError(GONE)
        if seen.revoked:
            raise AuthError(REVOKED)
        return Principal(who.user_id, seen.role, who.user_id, sid)

    async def revoke(self, session_id: str) -> None:
        now = now_ms()

        def revoke(s: Session) -> None:
            s.exec(update(UserSession).where(col(UserSession.id) == session_id,  # type: ignore[call-overload]
                                             col(UserSession.revoked_at).is_(None)).values(revoked_at=now))
            s.commit()

        await self.db.write(revoke)
        self._forget(session_id)

    def revoke_all_in(self, s: Session, user_id: str, keep: str | None = None) -> None:
        """Inside the caller's transaction: revoke every session of `user_id` except `keep`
        (call `forget_user` after the commit)."""
        where = [col(UserSession.user_id) == user_id, col(UserSession.revoked_at).is_(None)]
        if keep is not None:
            where.append(col(UserSession.id) != keep)
        s.exec(update(UserSession).where(*where).values(revoked_at=now_ms()))  # type: ignore[call-overload]

    def forget_user(self, user_id: str) -> None:
        """Drop what this process cached about the user's sessions (after a revocation or role change)."""
        for sid in self._by_user.pop(user_id, set()):
            self._seen.pop(sid, None)

    def _forget(self, sid: str) -> None:
        seen = self._seen.pop(sid, None)
        if seen is not None and seen.user_id is not None:
            self._by_user.get(seen.user_id, set()).discard(sid)

    def _remember(self, sid: str, seen: _Seen) -> None:
        if len(self._seen) >= self.max_cached:   # a cache: starting over is always correct
            self._seen.clear()
            self._by_user.clear()
        self._seen[sid] = seen
        if seen.user_id is not None:
            self._by_user.setdefault(seen.user_id, set()).add(sid)


def _read(s: Session, sid: str) -> _Seen:
    row = s.exec(select(UserSession.user_id, UserSession.revoked_at, User.role, User.deleted_at)
                 .join(User, col(User.id) == col(UserSession.user_id))
                 .where(col(UserSession.id) == sid)).first()
    at = time.monotonic()
    if row is None:
        return _Seen(None, None, True, at)
    user_id, revoked_at, role, deleted_at = row
    return _Seen(user_id, None if deleted_at is not None else role, revoked_at is not None, at)

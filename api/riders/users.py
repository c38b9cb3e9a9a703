"""User accounts: sign-up, login (argon2 on a bounded pool, api/hashing.py), the tokens they get, their
sessions (api/riders/sessions.py), password change and deletion."""

from __future__ import annotations

import time
import uuid

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api import tokens
from api.auth import ADMIN_NAME, OPERATOR, Principal
from api.clock import now_ms, to_datetime
from api.db import Database
from api.hashing import HashPool
from api.riders.models import SignUp, StreamTokenPublic, TokenPublic, User, UserPublic
from api.riders.sessions import Sessions
from foundation.settings import Settings


class EmailTaken(Exception):
    pass


def public(u: User) -> UserPublic:
    return UserPublic(id=u.id, email=u.email, name=u.name, role=u.role, created_at=to_datetime(u.created_at))


def admin_public() -> UserPublic:
    return UserPublic(id=ADMIN_NAME, email=None, name="bootstrap operator (admin token)", role=OPERATOR,
                      created_at=None)


def deleted_email(user_id: str) -> str:
    """What a deleted account's email becomes: the address is released for a new account, and not kept."""
    return f"{user_id}@deleted.invalid"


class UserService:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.hashes = HashPool(settings.password_hash_workers, settings.password_hash_queue)
        self.sessions = Sessions(db, settings.session_cache_s)
        self._dummy_hash: str | None = None

    async def create(self, body: SignUp, role: str) -> User:
        # hashing takes tens of milliseconds by design: on its own bounded pool, off the DB writer
        password_hash = await self.hashes.hash(body.password)
        user = User(id=uuid.uuid4().hex, email=body.email, name=body.name, password_hash=password_hash, role=role,
                    created_at=now_ms())

        def insert(s: Session) -> None:
            s.add(user)
            try:
                s.commit()
            except IntegrityError as e:
                raise EmailTaken(body.email) from e

        await self.db.write(insert)
        return user

    async def check_password(self, email: str, password: str) -> User | None:
        email = email.strip().lower()
        user = await self.db.read(lambda s: s.exec(
            select(User).where(User.email == email, col(User.deleted_at).is_(None))).first())
        if user is None:   # spend the same time as for a wrong password: no probing for accounts
            if self._dummy_hash is None:
                self._dummy_hash = await self.hashes.hash(uuid.uuid4().hex)
            await self.hashes.verify(password, self._dummy_hash)
            return None
        ok = await self.hashes.verify(password, user.password_hash)
        return user if ok else None

    async def get(self, user_id: str) -> User | None:
        """The user, unless unknown or deleted."""
        user = await self.db.read(lambda s: s.get(User, user_id))
        return user if user is not None and user.deleted_at is None else None

    async def list(self, limit: int, offset: int) -> list[User]:
        return await self.db.read(lambda s: list(s.exec(
            select(User).where(col(User.deleted_at).is_(None))
            .order_by(col(User.created_at)).offset(offset).limit(limit)).all()))

    async def change_password(self, user_id: str, current: str, new: str, keep_session: str | None) -> bool:
        """False when `current` is wrong. Otherwise the new hash is stored and every session of the user
        but `keep_session` (the one asking) is revoked, in one transaction."""
        user = await self.get(user_id)
        if user is None or not await self.hashes.verify(current, user.password_hash):
            return False
        new_hash = await self.hashes.hash(new)

        def change(s: Session) -> None:
            row = s.get(User, user_id, with_for_update=True)
            if row is None or row.deleted_at is not None:
                s.rollback()
                return
            row.password_hash = new_hash
            s.add(row)
            self.sessions.revoke_all_in(s, user_id, keep=keep_session)
            s.commit()

        await self.db.write(change)
        self.sessions.forget_user(user_id)
        return True

    async def delete(self, user_id: str) -> bool:
        """Delete the account: every session revoked, the email released, the row kept (rides and
        commands still name it) and refused everywhere. False when there is no such (live) user."""
        now = now_ms()

        def delete(s: Session) -> bool:
            row = s.get(User, user_id, with_for_update=True)
            if row is None or row.deleted_at is not None:
                s.rollback()
                return False
            row.deleted_at = now
            row.email = deleted_email(user_id)
            row.password_hash = "!"            # no password verifies against this
            s.add(row)
            self.sessions.revoke_all_in(s, user_id)
            s.commit()
            return True

        done = await self.db.write(delete)
        self.sessions.forget_user(user_id)
        return done

    async def token_for(self, user: User) -> TokenPublic:
        """A new session for `user` and its access token."""
        assert self.settings.jwt_secret
        iat = int(time.time())
        sid = await self.sessions.open(user.id, (iat + self.settings.token_ttl_s) * 1000)
        token, exp = tokens.issue(self.settings.jwt_secret, user.id, user.role, tokens.ACCESS,
                                  self.settings.token_ttl_s, now=iat, session_id=sid)
        return TokenPublic(access_token=token, expires_at=to_datetime(exp * 1000), user=public(user))

    def stream_token(self, who: Principal) -> StreamTokenPublic:
        """A stream token for `who` (already confirmed): a user's names the same session, so revoking the
        session revokes its stream tokens; the admin token's carries the admin token's mark."""
        assert self.settings.jwt_secret
        if who.user_id is None:
            token, exp = tokens.issue(self.settings.jwt_secret, ADMIN_NAME, who.role, tokens.STREAM,
                                      self.settings.stream_token_ttl_s,
                                      mark=tokens.admin_mark(self.settings.jwt_secret, self.settings.admin_token or ""))
        else:
            token, exp = tokens.issue(self.settings.jwt_secret, who.user_id, who.role, tokens.STREAM,
                                      self.settings.stream_token_ttl_s, session_id=who.session_id)
        return StreamTokenPublic(token=token, expires_at=to_datetime(exp * 1000))

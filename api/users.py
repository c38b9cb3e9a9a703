"""User accounts: sign-up, login (argon2 password hashes) and the tokens they get."""

from __future__ import annotations

import asyncio
import uuid

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api import tokens
from api.auth import ADMIN_NAME, OPERATOR, Principal
from api.clock import now_ms, to_datetime
from api.db import Database
from api.rider_models import SignUp, StreamTokenPublic, TokenPublic, User, UserPublic
from latch.settings import Settings


class EmailTaken(Exception):
    pass


def public(u: User) -> UserPublic:
    return UserPublic(id=u.id, email=u.email, name=u.name, role=u.role, created_at=to_datetime(u.created_at))


def admin_public() -> UserPublic:
    return UserPublic(id=ADMIN_NAME, email=None, name="bootstrap operator (admin token)", role=OPERATOR,
                      created_at=None)


class UserService:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.hasher = PasswordHash((Argon2Hasher(),))
        self._dummy_hash: str | None = None

    async def create(self, body: SignUp, role: str) -> User:
        # hashing takes tens of milliseconds by design: off the event loop and off the DB writer
        password_hash = await asyncio.to_thread(self.hasher.hash, body.password)
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
        user = await self.db.read(lambda s: s.exec(select(User).where(User.email == email)).first())
        if user is None:   # spend the same time as for a wrong password: no probing for accounts
            if self._dummy_hash is None:
                self._dummy_hash = await asyncio.to_thread(self.hasher.hash, uuid.uuid4().hex)
            await asyncio.to_thread(self.hasher.verify, password, self._dummy_hash)
            return None
        ok = await asyncio.to_thread(self.hasher.verify, password, user.password_hash)
        return user if ok else None

    async def get(self, user_id: str) -> User | None:
        return await self.db.read(lambda s: s.get(User, user_id))

    async def list(self, limit: int, offset: int) -> list[User]:
        return await self.db.read(lambda s: list(s.exec(
            select(User).order_by(col(User.created_at)).offset(offset).limit(limit)).all()))

    def token_for(self, user: User) -> TokenPublic:
        assert self.settings.jwt_secret
        token, exp = tokens.issue(self.settings.jwt_secret, user.id, user.role, tokens.ACCESS,
                                  self.settings.token_ttl_s)
        return TokenPublic(access_token=token, expires_at=to_datetime(exp * 1000), user=public(user))

    def stream_token(self, who: Principal) -> StreamTokenPublic:
        assert self.settings.jwt_secret
        token, exp = tokens.issue(self.settings.jwt_secret, who.user_id or ADMIN_NAME, who.role, tokens.STREAM,
                                  self.settings.stream_token_ttl_s)
        return StreamTokenPublic(token=token, expires_at=to_datetime(exp * 1000))

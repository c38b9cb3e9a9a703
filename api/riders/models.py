"""Users (riders and operators) and rides: tables and public shapes."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, field_validator
from pydantic import Field as PField
from sqlalchemy import BigInteger, Column, Index, text
from sqlmodel import Field, SQLModel

from api.models import CommandPublic


class RideStatus(StrEnum):
    STARTING = "starting"   # the unlock is on its way
    ACTIVE = "active"       # the lock opened: the rider holds the bike
    ENDED = "ended"         # ended by the rider, an operator, or the lock reporting "locked"
    FAILED = "failed"       # the unlock did not succeed; the bike was never held


OPEN_RIDE = (RideStatus.STARTING, RideStatus.ACTIVE)
_OPEN_SQL = text("status IN ('starting', 'active')")

# ---- tables -------------------------------------------------------------------


class User(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=32)
    email: str = Field(unique=True, max_length=254)
    name: str = ""
    password_hash: str
    role: str                     # the role every request gets (api/riders/users.py Sessions), whatever a token says
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    # set by DELETE /v1/users/{id}: the row stays (rides and commands still name it), every session is
    # refused, the email is released for a new account
    deleted_at: int | None = Field(default=None, sa_column=Column(BigInteger))
    # when the rider's app last logged into the broker (at most hourly: api/registry/credentials.py); a notification's
    # MQTT copies go to riders who did within LATCH_NOTIFY_MQTT_SESSION_S (api/notifications/service.py)
    mqtt_login_at: int | None = Field(default=None, sa_column=Column(BigInteger, index=True))


class UserSession(SQLModel, table=True):
    """One login: its id is the `sid` claim of the access token (and of the stream tokens minted from it).
    A token is accepted only while its session exists, is not revoked and its user is not deleted."""
    __tablename__ = "user_session"
    __table_args__ = (Index("ix_user_session_user_expires", "user_id", "expires_at"),)
    id: str = Field(primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="user.id", max_length=32)
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_at: int = Field(sa_column=Column(BigInteger, nullable=False))   # the access token's exp, in ms
    revoked_at: int | None = Field(default=None, sa_column=Column(BigInteger))


class Ride(SQLModel, table=True):
    __table_args__ = (
        # at most one open ride per bike and per rider, whatever races
        Index("uq_ride_open_device", "device_id", unique=True, sqlite_where=_OPEN_SQL, postgresql_where=_OPEN_SQL),
        Index("uq_ride_open_user", "user_id", unique=True, sqlite_where=_OPEN_SQL, postgresql_where=_OPEN_SQL),
        Index("ix_ride_user_started", "user_id", "started_at"),
    )
    id: str = Field(primary_key=True, max_length=32)
    user_id: str = Field(foreign_key="user.id")
    device_id: str = Field(foreign_key="device.id")
    status: str = RideStatus.STARTING
    reason: str | None = None
    unlock_command_id: str | None = Field(default=None, index=True)
    end_command_id: str | None = None
    started_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    ended_at: int | None = Field(default=None, sa_column=Column(BigInteger))


# ---- API shapes ---------------------------------------------------------------


class SignUp(BaseModel):
    email: str = PField(max_length=254, examples=["ada@example.org"])
    password: str = PField(min_length=8, max_length=256)
    name: str = PField("", max_length=200)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        v = v.strip().lower()
        local, at, domain = v.partition("@")
        if not at or not local or "." not in domain or " " in v:
            raise ValueError("not an email address")
        return v


class UserCreate(SignUp):
    role: str = PField("rider", pattern="^(rider|operator)$")


class Login(BaseModel):
    email: str = PField(max_length=254)
    password: str = PField(max_length=256)


class PasswordChange(BaseModel):
    current_password: str = PField(max_length=256)
    new_password: str = PField(min_length=8, max_length=256)


class UserPublic(BaseModel):
    id: str
    email: str | None
    name: str
    role: str
    created_at: datetime | None


class TokenPublic(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_at: datetime
    user: UserPublic


class StreamTokenPublic(BaseModel):
    token: str = PField(description="pass as ?token= to /v1/events/stream or /v1/ws")
    expires_at: datetime


class RideCreate(BaseModel):
    bike_id: str = PField(examples=["bike-0001"])
    ttl_s: int | None = PField(None, ge=1, le=300, description="validity of the unlock command")


class RidePublic(BaseModel):
    id: str
    user_id: str
    bike_id: str
    status: RideStatus
    reason: str | None
    unlock_command_id: str | None
    end_command_id: str | None
    started_at: datetime
    updated_at: datetime
    ended_at: datetime | None


class RideStarted(RidePublic):
    unlock: CommandPublic


class BikePublic(BaseModel):
    id: str
    name: str
    online: bool
    battery: int | None
    locked: bool | None
    free: bool = PField(description="online, not revoked and not in anyone's ride")
    yours: bool = PField(description="in your open ride")
    extra: dict[str, Any] = {}

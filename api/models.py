"""Tables and the public shapes of the API. A table model never leaves the API as-is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic import Field as PField
from sqlalchemy import JSON, BigInteger, Column, Index, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

from api.commands.params import check_params
from api.commands.states import Status
from protocol import messages, topics

# ---- tables -------------------------------------------------------------------


class Device(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    name: str = ""
    secret_hash: str
    command_key: str                      # hex; the API signs this device's commands with it
    revoked: bool = False
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    online: bool = False
    last_seen: int | None = Field(default=None, sa_column=Column(BigInteger))
    reported: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reported_at: int | None = Field(default=None, sa_column=Column(BigInteger))
    zone: str | None = Field(default=None, max_length=64, index=True)   # fleet targeting (api/fleet/service.py)


class DeviceTag(SQLModel, table=True):
    """A device's tags, one row each, so a fleet command can find `tag = 'x'` by index on any database."""
    __tablename__ = "device_tag"
    device_id: str = Field(foreign_key="device.id", primary_key=True, max_length=64)
    tag: str = Field(primary_key=True, max_length=64, index=True)


# 64-bit ids on PostgreSQL (an event log outlives 2^31 rows); SQLite's INTEGER PRIMARY KEY is already 64-bit
# and must stay spelled INTEGER to be the rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Command(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_command_idempotency"),
        Index("ix_command_deadline", "deadline_ms"),
        Index("ix_command_device_created", "device_id", "created_at"),
        Index("ix_command_owner_created", "owner", "created_at"),
        Index("ix_command_created", "created_at"),
    )
    id: str = Field(primary_key=True, max_length=32)
    device_id: str = Field(foreign_key="device.id")
    action: str
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Status.QUEUED
    reason: str | None = None
    owner: str
    idempotency_key: str | None = None
    request_hash: str | None = None
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    # when the sweeper must act on a non-final command (expire or time out); NULL once final
    deadline_ms: int | None = Field(default=None, sa_column=Column(BigInteger))
    updated_at: int = Field(sa_column=Column(BigInteger, nullable=False))


class CommandEvent(SQLModel, table=True):
    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    command_id: str = Field(foreign_key="command.id", index=True)
    at: int = Field(sa_column=Column(BigInteger, nullable=False))
    event: str
    from_status: str | None = None
    to_status: str | None = None
    applied: bool = True
    detail: str | None = None


@dataclass(slots=True)
class CommandRecord:
    """A command's row as plain data: what the command path builds, changes in memory and writes with its own
    statements (api/commands/sql.py). Same attributes as `Command`; an ORM `Command` costs ~60 us to build
    (SQLModel's validation and SQLAlchemy's instrumentation), this ~1 us, and a command is built once at
    create and once per state change (docs/performance.md)."""
    id: str
    device_id: str
    action: str
    params: dict[str, Any]
    status: str
    reason: str | None
    owner: str
    idempotency_key: str | None
    request_hash: str | None
    created_at: int
    expires_at: int
    deadline_ms: int | None
    updated_at: int


@dataclass(slots=True)
class HistoryRecord:
    """A history row as plain data (`CommandEvent`'s attributes), for the same reason as CommandRecord."""
    command_id: str
    at: int
    event: str
    from_status: str | None = None
    to_status: str | None = None
    applied: bool = True
    detail: str | None = None
    id: int | None = None


# a command or history row as the ORM reads it (lists, lookups) or as the command path makes it
CommandRow: TypeAlias = "Command | CommandRecord"
HistoryRow: TypeAlias = "CommandEvent | HistoryRecord"


# ---- API shapes ---------------------------------------------------------------


def known_action(v: str) -> str:
    """A command's action, checked (single commands and fleet commands alike)."""
    if v not in messages.ACTIONS:
        raise ValueError(f"unknown action {v!r}; valid actions: {', '.join(messages.ACTIONS)}")
    return v


MAX_DEVICE_TAGS = 32


def _valid_zone(v: str | None) -> str | None:
    if v is not None and not topics.valid_device_id(v):
        raise ValueError("zone must be 1-64 characters of [A-Za-z0-9_-]")
    return v


def _valid_tags(v: list[str] | None) -> list[str] | None:
    """Tags are spelt like device ids; duplicates are kept once, in their first order."""
    if v is None:
        return None
    bad = [t for t in v if not topics.valid_device_id(t)]
    if bad:
        raise ValueError(f"tag {bad[0][:80]!r} must be 1-64 characters of [A-Za-z0-9_-]")
    unique = list(dict.fromkeys(v))
    if len(unique) > MAX_DEVICE_TAGS:
        raise ValueError(f"at most {MAX_DEVICE_TAGS} tags per device (got {len(unique)})")
    return unique


class DeviceCreate(BaseModel):
    id: str = PField(description="1-64 characters of [A-Za-z0-9_-]", examples=["bike-0001"])
    name: str = PField("", max_length=200)
    zone: str | None = PField(None, description="fleet targeting: 1-64 characters of [A-Za-z0-9_-]",
                              examples=["downtown"])
    tags: list[str] = PField(default_factory=list, description=f"fleet targeting: at most {MAX_DEVICE_TAGS}, "
                                                               "each 1-64 characters of [A-Za-z0-9_-]")

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not topics.valid_device_id(v):
            raise ValueError("device id must be 1-64 characters of [A-Za-z0-9_-]")
        return v

    _zone = field_validator("zone")(_valid_zone)
    _tags = field_validator("tags")(_valid_tags)


class DevicePatch(BaseModel):
    """Only the fields sent change: `zone: null` clears the zone, `tags` replaces every tag."""
    model_config = ConfigDict(extra="forbid")
    zone: str | None = PField(None, description="1-64 characters of [A-Za-z0-9_-]; null clears it")
    tags: list[str] | None = PField(None, description=f"replaces the device's tags (at most {MAX_DEVICE_TAGS})")

    _zone = field_validator("zone")(_valid_zone)
    _tags = field_validator("tags")(_valid_tags)


class DevicePublic(BaseModel):
    id: str
    name: str
    online: bool
    last_seen: datetime | None
    reported: dict[str, Any]
    reported_at: datetime | None
    created_at: datetime
    revoked: bool
    zone: str | None = None
    tags: list[str] = []


class DeviceCredentials(DevicePublic):
    mqtt_username: str
    mqtt_password: str = PField(description="shown once; only its hash is stored")
    mqtt_client_id: str
    command_key: str = PField(description="hex HMAC-SHA256 key the device verifies commands with")


class CommandCreate(BaseModel):
    action: str = PField(examples=["unlock"])
    params: dict[str, Any] = PField(default_factory=dict, description=(
        "JSON objects, arrays, strings, integers (within +-(2**53-1)), booleans and null, at most 8 levels "
        "deep; no floats (they cannot be signed identically on the lock). The whole signed command must fit "
        f"in {messages.MAX_PAYLOAD} bytes, the most a lock reads (413 otherwise)."))
    ttl_s: int | None = PField(None, ge=1, le=2**31, description="seconds the command stays valid; default 30, "
                                                                 "at most LATCH_MAX_TTL_S")

    @field_validator("action")
    @classmethod
    def _known_action(cls, v: str) -> str:
        return known_action(v)

    @field_validator("params")
    @classmethod
    def _signable(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_params(v)
        return v


class HistoryEntry(BaseModel):
    at: datetime
    event: str
    from_status: str | None
    to_status: str | None
    applied: bool
    detail: str | None


class CommandPublic(BaseModel):
    id: str
    device_id: str
    action: str
    params: dict[str, Any]
    status: Status
    final: bool
    reason: str | None
    created_at: datetime
    expires_at: datetime
    updated_at: datetime
    history: list[HistoryEntry] = []

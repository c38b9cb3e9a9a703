"""Notification tables and the shapes of the notification API (validated strictly at the boundary)."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic import Field as PField
from sqlalchemy import JSON, BigInteger, Column, Index
from sqlmodel import Field, SQLModel

from api.models import BigId


class Category(StrEnum):
    TRANSACTIONAL = "transactional"   # about the rider's own ride or account: never opted out of, never held
    SERVICE = "service"               # about the service (a zone closed, maintenance): may be opted out of
    MARKETING = "marketing"           # may be opted out of; held during quiet hours


MAX_TITLE = 120
MAX_BODY = 1000
MAX_ACTIONS = 3
MAX_LABEL = 40
MAX_DATA_BYTES = 4096
MAX_USERS = 10_000
ACTION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


# ---- tables -------------------------------------------------------------------


class Notification(SQLModel, table=True):
    """One row per notification, whatever its audience; the counts are flushed here by each API process."""
    __table_args__ = (Index("ix_notification_created", "created_at"),)
    id: str = Field(primary_key=True, max_length=32)
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_by: str = Field(max_length=64)
    category: str = Field(max_length=16)
    title: str | None = Field(default=None, max_length=MAX_TITLE)
    body: str | None = Field(default=None, max_length=MAX_BODY)
    actions: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # {"all": true} | {"users": [...]} | {"riding": [...]} (resolved at send time)
    audience: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    audience_size: int = 0
    event_id: int | None = Field(default=None, sa_column=Column(BigId))   # its first position in the event log
    # counts of distinct riders, flushed from each process's memory (api/notifications/fanout.py)
    delivered: int = 0
    mqtt_published: int = 0
    held_opted_out: int = 0
    held_quiet_hours: int = 0
    held_capped: int = 0
    expired: int = 0


class NotificationPref(SQLModel, table=True):
    """A user's delivery preferences; no row = the defaults (nothing opted out, no quiet hours, UTC)."""
    __tablename__ = "notification_pref"
    user_id: str = Field(primary_key=True, foreign_key="user.id", max_length=32)
    opt_out: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    quiet_start_s: int | None = None   # seconds after local midnight
    quiet_end_s: int | None = None
    timezone: str = Field(default="UTC", max_length=64)
    updated_at: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))


class NotificationReceipt(SQLModel, table=True):
    """Only riders that answered have a row: what they saw and which action they pressed."""
    __tablename__ = "notification_receipt"
    notification_id: str = Field(primary_key=True, foreign_key="notification.id", max_length=32)
    user_id: str = Field(primary_key=True, foreign_key="user.id", max_length=32)
    seen_at: int | None = Field(default=None, sa_column=Column(BigInteger))
    action: str | None = Field(default=None, max_length=32)
    action_at: int | None = Field(default=None, sa_column=Column(BigInteger))


# ---- API shapes ---------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Action(Strict):
    id: str = PField(description="what the app reports back when it is pressed: 1-32 of [A-Za-z0-9_.-]")
    label: str = PField(min_length=1, max_length=MAX_LABEL)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ACTION_ID.match(v):
            raise ValueError("an action id is 1-32 of A-Z a-z 0-9 _ . -")
        return v


class Audience(Strict):
    """Exactly one of: every rider, a list of riders, the riders on a ride when it is sent."""
    all: bool | None = None
    users: list[str] | None = PField(None, min_length=1, max_length=MAX_USERS)
    riding: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> "Audience":
        chosen = [k for k in ("all", "users", "riding") if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError('audience is exactly one of {"all": true}, {"users": [ids]}, {"riding": true}')
        if self.users is not None:
            if any(not isinstance(u, str) or not 1 <= len(u) <= 32 for u in self.users):
                raise ValueError("audience.users holds user ids (1-32 characters)")
            if len(set(self.users)) != len(self.users):
                raise ValueError("audience.users lists an id twice")
        return self


class NotificationCreate(Strict):
    title: str | None = PField(None, min_length=1, max_length=MAX_TITLE)
    body: str | None = PField(None, min_length=1, max_length=MAX_BODY)
    actions: list[Action] = PField(default_factory=list, max_length=MAX_ACTIONS)
    data: dict[str, Any] = PField(default_factory=dict)
    category: Category
    audience: Audience
    ttl_s: int = PField(3600, ge=1, description="how long it may still be shown; the most: LATCH_NOTIFY_MAX_TTL_S")

    @model_validator(mode="after")
    def _shape(self) -> "NotificationCreate":
        if self.body is not None and self.title is None:
            raise ValueError("a notification with a body needs a title (a data message has neither)")
        if self.title is None:
            if self.actions:
                raise ValueError("actions need a title: a data message (no title, no body) is handled silently")
            if not self.data:
                raise ValueError("a data message (no title, no body) needs data")
        if len({a.id for a in self.actions}) != len(self.actions):
            raise ValueError("two actions have the same id")
        if len(json.dumps(self.data, separators=(",", ":"), ensure_ascii=False).encode()) > MAX_DATA_BYTES:
            raise ValueError(f"data is over {MAX_DATA_BYTES} bytes as JSON")
        return self

    @property
    def silent(self) -> bool:
        return self.title is None


class NotificationCreated(BaseModel):
    id: str
    # its position in the event stream (the cursor a client resumes from); None only with NATS while NATS
    # does not answer (the notification is sent, and relayed when NATS is back)
    event_id: int | None
    audience_size: int
    expires_at: int
    silent: bool


class HeldCounts(BaseModel):
    opted_out: int
    quiet_hours: int
    capped: int


class ReceiptPublic(BaseModel):
    user_id: str
    seen_at: int | None
    action: str | None
    action_at: int | None


class NotificationCounts(BaseModel):
    audience: int
    delivered: int
    mqtt_published: int
    seen: int
    actions: dict[str, int]
    held: HeldCounts
    expired: int


class NotificationPublic(BaseModel):
    id: str
    created_at: int
    expires_at: int
    created_by: str
    category: Category
    title: str | None
    body: str | None
    actions: list[Action]
    data: dict[str, Any]
    audience: dict[str, Any]
    silent: bool
    counts: NotificationCounts
    receipts: list[ReceiptPublic]


class ReceiptCreate(Strict):
    seen: bool | None = None
    action: str | None = PField(None, min_length=1, max_length=32)

    @model_validator(mode="after")
    def _something(self) -> "ReceiptCreate":
        if self.seen is not True and self.action is None:
            raise ValueError('report {"seen": true} and/or {"action": "<action id>"}')
        return self


class QuietHours(Strict):
    start: str = PField(description="local time HH:MM or HH:MM:SS", examples=["22:00"])
    end: str = PField(description="local time HH:MM or HH:MM:SS; before start = over midnight", examples=["07:00"])

    @field_validator("start", "end")
    @classmethod
    def _time(cls, v: str) -> str:
        parse_clock(v)
        return v


class Prefs(Strict):
    opt_out: list[Category] = PField(default_factory=list, max_length=3)
    quiet_hours: QuietHours | None = None
    timezone: str = PField("UTC", min_length=1, max_length=64, description="IANA time zone, e.g. Europe/Paris")

    @field_validator("opt_out")
    @classmethod
    def _not_transactional(cls, v: list[Category]) -> list[Category]:
        if Category.TRANSACTIONAL in v:
            raise ValueError("transactional notifications cannot be opted out of")
        return sorted(set(v))

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        zone(v)
        return v


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; ValueError (a 422 at the boundary) when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name[:64]!r}: use an IANA name such as Europe/Paris") from None


def parse_clock(v: str) -> int:
    """"HH:MM" or "HH:MM:SS" -> seconds after midnight; ValueError otherwise."""
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?", v)
    if m is None:
        raise ValueError("a time of day is HH:MM or HH:MM:SS (24-hour)")
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0)


def format_clock(s: int) -> str:
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:02d}:{m:02d}" if sec == 0 else f"{h:02d}:{m:02d}:{sec:02d}"

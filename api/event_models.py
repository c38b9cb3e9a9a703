"""The event log's table and its public shape (api/events.py appends and serves it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, BigInteger, Column, Index
from sqlmodel import Field, SQLModel

from api.models import BigId

# kinds of event, also the SSE `event:` name
COMMAND = "command"          # a command changed status: {command_id, device_id, action, status, reason, final}
PRESENCE = "presence"        # {device_id, online}
LOCK_STATE = "lock_state"    # {device_id, locked}, when the sensor's reading changes
LOW_BATTERY = "low_battery"  # {device_id, battery}, when it drops below settings.low_battery_pct
RIDE = "ride"                # {ride_id, device_id, user_id, status, reason}
FLEET = "fleet"              # a fleet command started or stopped: {fleet_id, action, status, reason, total, issued}
NOTIFICATION = "notification"   # a notification's position in the stream (api/notifications): riders see it per rules
KINDS = (COMMAND, PRESENCE, LOCK_STATE, LOW_BATTERY, RIDE, FLEET, NOTIFICATION)
RIDERS = "*"   # audience of an event offered to every rider, each through EventLog.personalize (no user id is "*")


class LogEvent(SQLModel, table=True):
    __tablename__ = "event"
    __table_args__ = (Index("ix_event_audience_id", "audience", "id"), {"sqlite_autoincrement": True})
    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))  # the cursor
    at: int = Field(sa_column=Column(BigInteger, nullable=False))    # ms since the epoch, when appended
    kind: str
    audience: str | None = None   # the one user (rider) who may see it besides operators; None: operators only
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class EventPublic(BaseModel):
    id: int
    kind: str
    at: int
    data: dict[str, Any]


class EventPage(BaseModel):
    events: list[EventPublic]
    cursor: int

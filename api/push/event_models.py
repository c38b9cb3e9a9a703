"""The event log's table and its public shape (api/push/events.py appends and serves it)."""

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
    __table_args__ = (Index("ix_event_audience_id", "audience", "id"), Index("ix_event_seq", "seq", unique=True),
                      {"sqlite_autoincrement": True})
    # the cursor, except with NATS (LATCH_NATS_URL), where the cursor is `seq`
    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    at: int = Field(sa_column=Column(BigInteger, nullable=False))    # ms since the epoch, when appended
    kind: str
    audience: str | None = None   # the one user (rider) who may see it besides operators; None: operators only
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # with NATS: its JetStream sequence, once relayed (api/push/nats_bus.py); None before, and without NATS
    seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class EventOutbox(SQLModel, table=True):
    """With NATS: an event committed but not yet stored in JetStream. Written in the transaction of the change
    (so an event is never lost while NATS is away), deleted once JetStream acknowledged it (api/push/nats_bus.py)."""
    __tablename__ = "event_outbox"
    event_id: int = Field(sa_column=Column(BigId, primary_key=True, autoincrement=False))
    origin: str = Field(max_length=128)   # the API replica that wrote it (LATCH_API_CLIENT_ID): it relays it


class EventPublic(BaseModel):
    id: int
    kind: str
    at: int
    data: dict[str, Any]


class EventPage(BaseModel):
    events: list[EventPublic]
    cursor: int

"""Fleet commands: their tables and public shapes (api/fleet/service.py runs them, api/fleet/routes.py serves them).

    fleet_command   one row per fleet command: what to send, to whom (the target as asked), how fast,
                    when to give up, where it stands (running → completed | aborted | cancelled)
    fleet_target    one row per device of the snapshot taken at creation, in issue order (seq);
                    command_id is NULL until that device's own command exists ("pending")

Each device gets an ordinary command (table `command`, owner "fleet:<id>", Idempotency-Key
"fleet:<id>:<seq>"), so it has the usual states, history and events; progress is one GROUP BY over
fleet_target joined to command, never a query per device.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic import Field as PField
from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from api.commands.params import check_params
from api.commands.states import Status
from api.models import known_action
from protocol import topics

MAX_FLEET_DEVICES = 100_000      # hard ceiling of one explicit list; LATCH_FLEET_MAX_DEVICES may be lower
MAX_TAGS = 32                    # tags per device
PENDING = "pending"              # a target whose command is not issued yet
TARGET_KINDS = ("tag", "zone", "devices")


class FleetStatus(StrEnum):
    RUNNING = "running"       # issuing, or waiting for issued commands to become final
    COMPLETED = "completed"   # every target has a command and every command is final
    ABORTED = "aborted"       # the abort rule fired: nothing more is issued
    CANCELLED = "cancelled"   # an operator stopped it: nothing more is issued


# ---- tables -------------------------------------------------------------------


class FleetCommand(SQLModel, table=True):
    __tablename__ = "fleet_command"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_fleet_command_idempotency"),
        Index("ix_fleet_command_status", "status"),
        Index("ix_fleet_command_created", "created_at"),
    )
    id: str = Field(primary_key=True, max_length=32)
    action: str
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # {"kind": "tag"|"zone", "value": "<tag or zone>"} or {"kind": "devices", "value": <how many ids were listed>}
    # (the ids themselves are the fleet_target rows)
    target: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    ttl_s: int                                  # each device command's validity
    rate_per_min: int                           # devices issued per minute
    abort_failure_pct: float | None = None      # abort when failures exceed this share of final outcomes ...
    abort_after: int | None = None              # ... once at least this many device commands are final
    status: str = FleetStatus.RUNNING
    reason: str | None = None
    owner: str
    idempotency_key: str | None = None
    request_hash: str | None = None
    total: int                                  # targets in the snapshot
    issued: int = 0                             # targets that have their command (kept by the rollout worker)
    excluded: int = 0                           # revoked devices the target matched and left out
    created_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: int = Field(sa_column=Column(BigInteger, nullable=False))
    finished_at: int | None = Field(default=None, sa_column=Column(BigInteger))


class FleetTarget(SQLModel, table=True):
    __tablename__ = "fleet_target"
    __table_args__ = (
        # the pending targets of a fleet in issue order (command_id IS NULL ORDER BY seq), and the join
        # to command for the counts, both from one index
        Index("ix_fleet_target_command", "fleet_id", "command_id", "seq"),
    )
    fleet_id: str = Field(foreign_key="fleet_command.id", primary_key=True, max_length=32)
    seq: int = Field(primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=64)
    command_id: str | None = Field(default=None, foreign_key="command.id", max_length=32)


# ---- API shapes ---------------------------------------------------------------


def _valid_name(what: str, v: str) -> str:
    if not topics.valid_device_id(v):
        raise ValueError(f"{what} {v[:80]!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return v


class FleetTargetSpec(BaseModel):
    """Exactly one of `tag`, `zone`, `devices`."""
    model_config = ConfigDict(extra="forbid")
    tag: str | None = PField(None, examples=["firmware-2"])
    zone: str | None = PField(None, examples=["downtown"])
    devices: list[str] | None = PField(None, min_length=1, max_length=MAX_FLEET_DEVICES,
                                       description="explicit device ids (duplicates are sent once)")

    @field_validator("tag", "zone")
    @classmethod
    def _name(cls, v: str | None, info: Any) -> str | None:
        return None if v is None else _valid_name(info.field_name, v)

    @field_validator("devices")
    @classmethod
    def _ids(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        bad = [d for d in v if not topics.valid_device_id(d)]
        if bad:
            shown = ", ".join(repr(b[:80]) for b in bad[:5])
            raise ValueError(f"{len(bad)} device id(s) are not 1-64 characters of [A-Za-z0-9_-]: {shown}")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "FleetTargetSpec":
        given = [k for k in TARGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("target must name exactly one of tag, zone or devices"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in TARGET_KINDS if getattr(self, k) is not None)


class AbortRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    failure_pct: float = PField(ge=0, le=100, description="abort when more than this % of final outcomes failed")
    after: int = PField(ge=1, description="... once at least this many device commands are final")


class FleetCreate(BaseModel):
    """Unknown fields are refused (422), not ignored: a misspelt `rate_per_min` on a command to
    10,000 locks should fail loudly rather than fall back to a default."""
    model_config = ConfigDict(extra="forbid")
    action: str = PField(examples=["locate"])
    params: dict[str, Any] = PField(default_factory=dict, description="as a single command's params")
    ttl_s: int | None = PField(None, ge=1, le=2**31, description="each device command's validity; default 30")
    target: FleetTargetSpec
    rate_per_min: int = PField(ge=1, description="devices issued per minute", examples=[600])
    abort: AbortRule | None = PField(None, description="stop issuing when failures exceed failure_pct % "
                                                       "after `after` device commands are final")

    @field_validator("action")
    @classmethod
    def _known_action(cls, v: str) -> str:
        return known_action(v)

    @field_validator("params")
    @classmethod
    def _signable(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_params(v)
        return v


class FleetPublic(BaseModel):
    id: str
    action: str
    params: dict[str, Any]
    ttl_s: int
    target: dict[str, Any]
    rate_per_min: int
    abort: AbortRule | None
    status: FleetStatus
    final: bool
    reason: str | None
    owner: str
    total: int
    issued: int
    excluded: int = PField(description="revoked devices the target matched, left out")
    counts: dict[str, int] = PField(description="device commands by status; 'pending' = not issued yet")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class FleetDevicePublic(BaseModel):
    seq: int
    device_id: str
    command_id: str | None
    status: str = PField(description="the device command's status, or 'pending' before it is issued")
    reason: str | None
    issued_at: datetime | None = PField(description="when the device's command was created")
    updated_at: datetime | None = PField(description="the device command's last change")


DEVICE_STATUSES = (PENDING, *(s.value for s in Status))

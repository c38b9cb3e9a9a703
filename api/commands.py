"""Commands: creation, dispatch to the device, every state change, and waiting for an outcome.

Every state change is a conditional UPDATE (`WHERE id = ? AND status = ?`),
so it is applied exactly once even when several writers race (an ack and
the sweeper, or two API replicas sharing a database).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.clock import now_ms, to_datetime
from api.command_states import Event, Status, advance, is_final
from api.db import Database
from api.metrics import Metrics
from api.models import Command, CommandCreate, CommandEvent, CommandPublic, Device, HistoryEntry
from api.waiters import Waiters
from latch.settings import Settings
from protocol import messages, topics

log = logging.getLogger("latch.commands")

OFFLINE_REASON = "device offline: {action} is never queued for an offline device, so it cannot fire late"
NO_BROKER_REASON = "broker unreachable: the command could not be sent"


class Publisher(Protocol):
    @property
    def is_connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request."""


@dataclass(slots=True)
class Outcome:
    command: Command
    applied: bool


def public(cmd: Command, history: list[CommandEvent] | None = None) -> CommandPublic:
    status = Status(cmd.status)
    return CommandPublic(
        id=cmd.id, device_id=cmd.device_id, action=cmd.action, params=cmd.params, status=status,
        final=is_final(status), reason=cmd.reason, created_at=to_datetime(cmd.created_at),
        expires_at=to_datetime(cmd.expires_at), updated_at=to_datetime(cmd.updated_at),
        history=[HistoryEntry(at=to_datetime(h.at), event=h.event, from_status=h.from_status,
                              to_status=h.to_status, applied=h.applied, detail=h.detail)
                 for h in (history or [])],
    )


def _request_hash(device_id: str, body: CommandCreate) -> str:
    text = json.dumps({"device": device_id, **body.model_dump()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class CommandService:
    def __init__(self, db: Database, settings: Settings, publisher: Publisher, waiters: Waiters,
                 metrics: Metrics) -> None:
        self.db = db
        self.settings = settings
        self.publisher = publisher
        self.waiters = waiters
        self.metrics = metrics
        self.deadline_changed: Callable[[int], None] = lambda deadline_ms: None  # the sweeper hooks in here

    # ---- create -----------------------------------------------------------------
    async def create(self, device: Device, body: CommandCreate, owner: str,
                     idempotency_key: str | None) -> tuple[Command, bool]:
        """(command, created). A repeated Idempotency-Key with the same request returns the first command."""
        req_hash = _request_hash(device.id, body) if idempotency_key else None
        if idempotency_key:
            existing = await self._by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return self._replay(existing, req_hash), False
        now = now_ms()
        ttl_s = min(body.ttl_s or self.settings.default_ttl_s, self.settings.max_ttl_s)
        cmd = Command(id=uuid.uuid4().hex, device_id=device.id, action=body.action, params=body.params,
                      status=Status.QUEUED, owner=owner, idempotency_key=idempotency_key,
                      request_hash=req_hash, created_at=now, expires_at=now + ttl_s * 1000,
                      deadline_ms=now + ttl_s * 1000, updated_at=now)
        async with self.db.session() as s:
            s.add(cmd)
            s.add(CommandEvent(command_id=cmd.id, at=now, event="created", to_status=Status.QUEUED,
                               detail=f"ttl {ttl_s}s, by {owner}"))
            try:
                await s.commit()
            except IntegrityError:
                await s.rollback()
                existing = await self._by_idempotency_key(owner, idempotency_key or "")
                if existing is None:
                    raise
                return self._replay(existing, req_hash), False
        self.metrics.inc("commands_created")
        self.deadline_changed(cmd.expires_at)
        if not device.online:
            if body.action in messages.FAIL_FAST_OFFLINE:
                out = await self.transition(cmd.id, Event.DEVICE_OFFLINE,
                                            reason=OFFLINE_REASON.format(action=body.action))
                return out.command if out else cmd, True
            return cmd, True  # waits, queued, until the device comes online or the command expires
        return await self.dispatch(cmd, device.command_key), True

    def _replay(self, existing: Command, req_hash: str | None) -> Command:
        if existing.request_hash != req_hash:
            raise IdempotencyConflict(existing.id)
        return existing

    async def _by_idempotency_key(self, owner: str, key: str) -> Command | None:
        async with self.db.session() as s:
            rows = await s.exec(select(Command).where(Command.owner == owner, Command.idempotency_key == key))
            return rows.first()

    # ---- dispatch ---------------------------------------------------------------
    async def dispatch(self, cmd: Command, command_key: str) -> Command:
        """Mark the command sent and publish it, once: only the caller whose transition applied publishes."""
        if not self.publisher.is_connected:
            if cmd.action in messages.FAIL_FAST_OFFLINE:
                out = await self.transition(cmd.id, Event.DEVICE_OFFLINE, reason=NO_BROKER_REASON)
                return out.command if out else cmd
            return cmd
        msg = messages.make_command(cmd.id, cmd.device_id, cmd.action, cmd.params, cmd.created_at,
                                    cmd.expires_at, key=binascii.unhexlify(command_key))
        out = await self.transition(cmd.id, Event.DISPATCH)
        if out is None or not out.applied:
            return out.command if out else cmd
        self.publisher.publish(topics.cmd_topic(cmd.device_id), messages.encode_command(msg), qos=1)
        self.metrics.inc("commands_sent")
        return out.command

    async def dispatch_queued(self, device: Device) -> int:
        """The device came online: send what waited for it."""
        now = now_ms()
        async with self.db.session() as s:
            rows = await s.exec(select(Command).where(
                Command.device_id == device.id, Command.status == Status.QUEUED, Command.expires_at > now,
            ).order_by(col(Command.created_at)))
            queued = list(rows.all())
        for cmd in queued:
            await self.dispatch(cmd, device.command_key)
        return len(queued)

    # ---- state changes ------------------------------------------------------------
    def _deadline(self, status: Status, cmd: Command) -> int | None:
        if status == Status.QUEUED:
            return cmd.expires_at
        if status in (Status.SENT, Status.RECEIVED):
            return cmd.expires_at + int(self.settings.settle_grace_s * 1000)
        return None

    async def transition(self, command_id: str, event: Event, *, reason: str | None = None,
                         detail: str | None = None) -> Outcome | None:
        """Apply `event` to the command; None when there is no such command."""
        for _ in range(8):  # a lost race re-reads the row; bounded, each loss means another writer won
            now = now_ms()
            async with self.db.session() as s:
                cmd = await s.get(Command, command_id)
                if cmd is None:
                    return None
                old = Status(cmd.status)
                new = advance(old, event)
                if new is None:
                    s.add(CommandEvent(command_id=command_id, at=now, event=event, from_status=old,
                                       applied=False, detail=detail or reason))
                    await s.commit()
                    self.metrics.inc(f"events_ignored_{event}")
                    return Outcome(cmd, False)
                new_reason = reason if reason is not None else cmd.reason
                deadline = self._deadline(new, cmd)
                res = await s.exec(
                    update(Command).where(Command.id == command_id, Command.status == old)
                    .values(status=new, reason=new_reason, deadline_ms=deadline, updated_at=now))
                if res.rowcount != 1:
                    await s.rollback()
                    continue
                s.add(CommandEvent(command_id=command_id, at=now, event=event, from_status=old,
                                   to_status=new, applied=True, detail=detail or reason))
                await s.commit()
            cmd.status, cmd.reason, cmd.deadline_ms, cmd.updated_at = new, new_reason, deadline, now
            if is_final(new):
                self.metrics.inc(f"commands_{new}")
                self.waiters.notify(command_id)
            elif deadline is not None:
                self.deadline_changed(deadline)
            return Outcome(cmd, True)
        raise RuntimeError(f"command {command_id}: state change kept losing races")

    async def cancel(self, command_id: str) -> Outcome | None:
        return await self.transition(command_id, Event.CANCEL, reason="cancelled by the operator")

    # ---- reading ------------------------------------------------------------------
    async def get(self, command_id: str) -> Command | None:
        async with self.db.session() as s:
            return await s.get(Command, command_id)

    async def history(self, command_id: str) -> list[CommandEvent]:
        async with self.db.session() as s:
            rows = await s.exec(select(CommandEvent).where(CommandEvent.command_id == command_id)
                                .order_by(col(CommandEvent.id)))
            return list(rows.all())

    async def list_for_device(self, device_id: str, limit: int, offset: int) -> list[Command]:
        async with self.db.session() as s:
            rows = await s.exec(select(Command).where(Command.device_id == device_id)
                                .order_by(col(Command.created_at).desc()).offset(offset).limit(limit))
            return list(rows.all())

    async def wait_final(self, command_id: str, timeout: float) -> Command | None:
        """Hold until the command is final or `timeout` passes; returns the command as it then is."""
        fut = self.waiters.register(command_id)
        try:
            cmd = await self.get(command_id)
            if cmd is None or is_final(Status(cmd.status)) or timeout <= 0:
                return cmd
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                pass
            return await self.get(command_id)  # the row is the truth
        finally:
            self.waiters.unregister(command_id, fut)

    # ---- expiry and timeouts ----------------------------------------------------------
    async def sweep(self, limit: int = 500) -> int | None:
        """Expire or time out every command whose deadline passed; returns the next deadline."""
        now = now_ms()
        async with self.db.session() as s:
            due = (await s.exec(select(Command.id, Command.status).where(
                col(Command.deadline_ms).is_not(None), col(Command.deadline_ms) <= now).limit(limit))).all()
        for command_id, status in due:
            event = Event.EXPIRE if status == Status.QUEUED else Event.TIMEOUT
            reason = ("expired before it could be delivered" if event == Event.EXPIRE
                      else "no final answer from the device before the deadline")
            await self.transition(command_id, event, reason=reason)
        async with self.db.session() as s:
            nxt = (await s.exec(select(Command.deadline_ms).where(col(Command.deadline_ms).is_not(None))
                                .order_by(col(Command.deadline_ms)).limit(1))).first()
        return nxt

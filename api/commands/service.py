"""Commands: creation, dispatch to the device, every state change, and waiting for an outcome.

Every state change is a conditional UPDATE (`WHERE id = ? AND status = ?`),
so it is applied exactly once even when several writers race (an ack and
the sweeper, or two API replicas sharing a database).

Why one module of ~480 lines: CommandService is the one place a command's row changes (create, dispatch,
transition, expiry) and where `?wait=` answers are kept in hand; its statements live in sql.py, its state table
in states.py, its answers' parsing in ingest.py.
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
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api import pg_bus
from api.clock import now_ms, to_datetime
from api.commands import sql as command_sql
from api.commands.priority import action_priority
from api.commands.states import Event, Status, advance, is_final
from api.commands.waiters import Waiters
from api.db import Database, Priority
from api.errors import TooLarge
from api.hooks import NO_HOOKS, ChangeHooks
from api.metrics import Metrics
from api.models import (
    Command,
    CommandCreate,
    CommandEvent,
    CommandPublic,
    CommandRecord,
    CommandRow,
    Device,
    HistoryEntry,
    HistoryRecord,
    HistoryRow,
)
from api.registry.devices import merge_reported
from foundation.settings import Settings
from protocol import messages, topics

log = logging.getLogger("latch.commands")

OFFLINE_REASON = "device offline: {action} is never queued for an offline device, so it cannot fire late"
NO_BROKER_REASON = "broker unreachable: the command could not be sent"
PUBLISH_FAILED_REASON = "the command could not be handed to the broker"
MAX_TIMEOUT_HOLD_S = 60.0   # the longest a timeout waits past its deadline while acks are applied late


class CommandTooLarge(TooLarge, ValueError):
    """The signed command would not fit what a lock reads; str(e) says by how much (413)."""


def signed_payload(cmd: CommandRow, command_key: str) -> bytes:
    """The signed wire message for `cmd`; CommandTooLarge when it exceeds what a lock accepts."""
    msg = messages.make_command(cmd.id, cmd.device_id, cmd.action, cmd.params, cmd.created_at,
                                cmd.expires_at, key=binascii.unhexlify(command_key))
    payload = messages.encode_command(msg)
    if len(payload) > messages.MAX_PAYLOAD:
        raise CommandTooLarge(f"the signed command is {len(payload)} bytes; a lock reads at most "
                              f"{messages.MAX_PAYLOAD}: send smaller params")
    return payload


def check_fits_any_device(action: str, params: dict) -> None:
    """CommandTooLarge unless `action` with `params` fits a lock whatever its id (a fleet command:
    checked once, before any of its device commands exists). Signed with a throwaway key: the
    signature's length does not depend on it."""
    now = now_ms()
    probe = CommandRecord(id="0" * 32, device_id="x" * 64, action=action, params=params, status=Status.QUEUED,
                          reason=None, owner="", idempotency_key=None, request_hash=None, created_at=now,
                          expires_at=now + 2**31 * 1000, deadline_ms=None, updated_at=now)
    signed_payload(probe, "00" * 32)


class Publisher(Protocol):
    @property
    def is_connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...


class ForeignCommand(Exception):
    """A device answered for a command that belongs to another device."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request."""


@dataclass(slots=True)
class Outcome:
    command: CommandRow
    applied: bool
    history: list[HistoryRow]   # the history rows this change wrote (applied or not)


Answer = tuple[CommandRow, list[HistoryRow]]   # a final command with its whole history, as `with_history` reads it


def public(cmd: CommandRow, history: list[HistoryRow] | None = None) -> CommandPublic:
    status = Status(cmd.status)
    return CommandPublic(
        id=cmd.id, device_id=cmd.device_id, action=cmd.action, params=cmd.params, status=status,
        final=is_final(status), reason=cmd.reason, created_at=to_datetime(cmd.created_at),
        expires_at=to_datetime(cmd.expires_at), updated_at=to_datetime(cmd.updated_at),
        history=[HistoryEntry(at=to_datetime(h.at), event=h.event, from_status=h.from_status,
                              to_status=h.to_status, applied=h.applied, detail=h.detail)
                 for h in (history or [])],
    )


def new_command_id() -> str:
    return uuid.uuid4().hex


def _request_hash(device_id: str, body: CommandCreate) -> str:
    text = json.dumps({"device": device_id, **body.model_dump()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


DEGRADED_RECHECK_S = 0.5   # see CommandService.wakes_degraded


class Deadlines:
    """A command's new deadline, told to whoever sweeps in this process: the sweeper subscribes when it is made
    (`listen`), so neither writes into the other."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[int], None]] = []

    def listen(self, fn: Callable[[int], None]) -> None:
        self._listeners.append(fn)

    def changed(self, deadline_ms: int) -> None:
        for fn in self._listeners:
            fn(deadline_ms)


def NEVER() -> bool:   # noqa: N802 (a constant function: wake-ups never degrade without NATS)
    return False


async def wait_until(fut: asyncio.Future[None], timeout: float, metrics: Metrics | None = None) -> bool:
    """True when `fut` was resolved (a wake-up) before `timeout`; counted in `metrics` either way."""
    try:
        await asyncio.wait_for(fut, timeout)
        woken = True
    except asyncio.TimeoutError:
        woken = False
    if metrics is not None:
        metrics.inc("waits_woken" if woken else "waits_timed_out")
    return woken


class CommandService:
    def __init__(self, db: Database, settings: Settings, publisher: Publisher, waiters: Waiters,
                 metrics: Metrics, *, hooks: ChangeHooks = NO_HOOKS, sweeps_here: Callable[[], bool] = lambda: False,
                 wakes_degraded: Callable[[], bool] | None = None) -> None:
        """`hooks`: run inside each change's transaction (the event log, the command log: api/hooks.py).
        `sweeps_here`: True while this process holds the sweeper's lease (api/lease.py). `wakes_degraded`: True
        while another replica's answer cannot wake a wait here (NATS unreachable; see below)."""
        self.db = db
        self.settings = settings
        self.publisher = publisher
        self.waiters = waiters
        self.metrics = metrics
        self.deadlines = Deadlines()   # a new deadline, to whoever sweeps in this process (api/commands/sweeper.py)
        self.hooks = hooks
        # tells other API processes of a new deadline, inside the transaction (api/pg_bus.py) — unless this
        # process holds the sweeper's lease (api/lease.py): its own sweeper hears of it in-process
        # (deadlines), and a replica that takes the lease later sweeps from the table first
        self.notify: Callable[[Session, str, str], None] = pg_bus.notify if db.is_postgres else pg_bus.no_notify
        self.sweeps_here = sweeps_here
        # with NATS (api/push/nats_bus.py) another replica's answer wakes a wait here through the event stream: while
        # this process cannot reach NATS that wake-up cannot come, and a wait re-reads its command every
        # DEGRADED_RECHECK_S instead (without it, a wait on an answer applied elsewhere ran to its full timeout)
        self.wakes_degraded = wakes_degraded or NEVER
        # the history of each command a `?wait=` caller waits on in this process, as it is written: the
        # answer once final, without reading the command and its history back (docs/performance.md)
        self._trails: dict[str, list[HistoryRow]] = {}

    # ---- create -----------------------------------------------------------------
    async def create(self, device: Device, body: CommandCreate, owner: str,
                     idempotency_key: str | None, command_id: str | None = None,
                     priority: int | None = None) -> tuple[CommandRow, bool]:
        """(command, created). A repeated Idempotency-Key with the same request returns the first command.

        The command is written with its first state changes in one transaction (queued, then
        dispatched or failed fast), and published after the commit.
        """
        req_hash = _request_hash(device.id, body) if idempotency_key else None
        now = now_ms()
        ttl_s = min(body.ttl_s or self.settings.default_ttl_s, self.settings.max_ttl_s)
        cmd = CommandRecord(id=command_id or new_command_id(), device_id=device.id, action=body.action,
                            params=body.params, status=Status.QUEUED, reason=None, owner=owner,
                            idempotency_key=idempotency_key, request_hash=req_hash, created_at=now,
                            expires_at=now + ttl_s * 1000, deadline_ms=None, updated_at=now)
        # signed before anything is written: what cannot be signed or would not fit a lock is refused here
        payload = signed_payload(cmd, device.command_key)
        events: list[HistoryRow] = [HistoryRecord(command_id=cmd.id, at=now, event="created", to_status=Status.QUEUED,
                                                  detail=f"ttl {ttl_s}s, by {owner}")]
        publish = False
        if device.online and self.publisher.is_connected:
            publish = True
            self._apply(cmd, Event.DISPATCH, None, None, now, events)
        elif body.action in messages.FAIL_FAST_OFFLINE:
            reason = OFFLINE_REASON.format(action=body.action) if not device.online else NO_BROKER_REASON
            self._apply(cmd, Event.DEVICE_OFFLINE, reason, None, now, events)
        cmd.deadline_ms = self._deadline(Status(cmd.status), cmd)

        def insert(s: Session) -> CommandRow | None:
            """The new command, or the earlier one holding this Idempotency-Key."""
            if idempotency_key:
                existing = s.exec(select(Command).where(Command.owner == owner,
                                                        Command.idempotency_key == idempotency_key)).first()
                if existing is not None:
                    return existing
            command_sql.insert_command(s, cmd)   # the driver's cursor, not the ORM's unit of work
            command_sql.insert_history(s, events)
            self.hooks.command_changed(s, cmd, events)
            if cmd.deadline_ms is not None and not self.sweeps_here():
                self.notify(s, pg_bus.DEADLINE, str(cmd.deadline_ms))
            s.commit()
            return None

        try:
            existing = await self.db.write(insert, action_priority(body.action) if priority is None else priority)
        except IntegrityError:   # another writer took the key between our check and insert
            existing = await self.db.read(lambda s: s.exec(select(Command).where(
                Command.owner == owner, Command.idempotency_key == idempotency_key)).first())
            if existing is None:
                raise
        if existing is not None:
            if existing.request_hash != req_hash:
                raise IdempotencyConflict(existing.id)
            return existing, False
        self.metrics.inc("commands_created")
        if self.waiters.waiting(cmd.id):
            self._trails[cmd.id] = list(events)
        self.metrics.command_changed(cmd, events, cmd.created_at)   # created (+ sent or failed): api/metrics.py
        if publish and not await self._publish(cmd, payload):
            return cmd, True   # failed: _publish recorded why and woke its waiters
        self._after_change(cmd)
        return cmd, True

    # ---- dispatch ---------------------------------------------------------------
    async def _publish(self, cmd: CommandRow, payload: bytes) -> bool:
        """Hand the signed command to the broker link. A publish that fails for any reason ends the
        command `failed` with the reason (it never stays `sent` waiting for a timeout); False then."""
        try:
            self.publisher.publish(topics.cmd_topic(cmd.device_id), payload, qos=1)
        except Exception as e:   # not connected any more, refused as too large, a closed transport ...
            log.warning("command %s to %s not published: %s", cmd.id, cmd.device_id, e)
            out = await self.transition(cmd.id, Event.PUBLISH_FAILED, reason=f"{PUBLISH_FAILED_REASON}: {e}")
            if out is not None:
                cmd.status, cmd.reason, cmd.deadline_ms = out.command.status, out.command.reason, None
            return False
        self.metrics.inc("commands_sent")
        return True

    async def publish_refused(self, command_id: str, why: str) -> None:
        """The broker link gave up on a command it had sent (api/link.py): end it `failed`."""
        await self.transition(command_id, Event.PUBLISH_FAILED, reason=f"{PUBLISH_FAILED_REASON}: {why}")

    async def dispatch_queued(self, device: Device) -> int:
        """The device came online: send what waited for it, once (only a transition that applied publishes)."""
        if not self.publisher.is_connected:
            return 0
        now = now_ms()
        queued = await self.db.read(lambda s: list(s.exec(select(Command.id).where(
            Command.device_id == device.id, Command.status == Status.QUEUED, Command.expires_at > now,
        ).order_by(col(Command.created_at))).all()))
        sent = 0
        for command_id in queued:
            out = await self.transition(command_id, Event.DISPATCH)
            if out is not None and out.applied and await self._publish(
                    out.command, signed_payload(out.command, device.command_key)):
                sent += 1
        return sent

    async def dispatch_all_queued(self) -> int:
        """The broker link is back: send what was queued meanwhile to the devices that are online (a command
        created while the link was down waits queued, and only a device's coming online sent it before:
        one already online stayed queued until it expired). Each send is a conditional transition, so
        replicas doing this at once send each command once."""
        if not self.publisher.is_connected:
            return 0
        now = now_ms()
        devices = await self.db.read(lambda s: list(s.exec(select(Device).where(
            col(Device.online), ~col(Device.revoked), col(Device.id).in_(
                select(Command.device_id).where(Command.status == Status.QUEUED, Command.expires_at > now)))).all()))
        sent = 0
        for device in devices:
            sent += await self.dispatch_queued(device)
        if sent:
            log.info("the broker link is back: sent %d queued commands", sent)
        return sent

    # ---- state changes ------------------------------------------------------------
    def _deadline(self, status: Status, cmd: CommandRow) -> int | None:
        if status == Status.QUEUED:
            return cmd.expires_at
        if status in (Status.SENT, Status.RECEIVED):
            return cmd.expires_at + int(self.settings.settle_grace_s * 1000)
        return None

    def _apply(self, cmd: CommandRow, event: Event, reason: str | None, detail: str | None, now: int,
               events: list[HistoryRow]) -> bool:
        """Move an in-memory command through the table, recording the event either way."""
        old = Status(cmd.status)
        new = advance(old, event)
        if new is None:
            events.append(HistoryRecord(command_id=cmd.id, at=now, event=event, from_status=old,
                                        applied=False, detail=detail or reason))
            return False
        cmd.status = new
        if reason is not None:
            cmd.reason = reason
        cmd.deadline_ms = self._deadline(new, cmd)
        cmd.updated_at = now
        events.append(HistoryRecord(command_id=cmd.id, at=now, event=event, from_status=old, to_status=new,
                                    applied=True, detail=detail or reason))
        return True

    def _after_change(self, cmd: CommandRow) -> None:
        status = Status(cmd.status)
        if is_final(status):
            self.metrics.inc(f"commands_{status}")
            trail = self._trails.pop(cmd.id, None)
            self.waiters.notify(cmd.id, (cmd, trail) if trail is not None else None)
        elif cmd.deadline_ms is not None:
            self.deadlines.changed(cmd.deadline_ms)

    async def transition(self, command_id: str, event: Event, *, reason: str | None = None,
                         detail: str | None = None, device_id: str | None = None,
                         reported: dict | None = None) -> Outcome | None:
        """Apply `event` to the command in one transaction; None when there is no such command.

        With `device_id`, the command must belong to that device (else ForeignCommand);
        `reported` state is merged into that device's record in the same transaction.
        """

        def unit(s: Session) -> Outcome | None:
            for _ in range(8):  # a lost race re-reads the row; bounded, each loss means another writer won
                now = now_ms()
                # the row, as a CommandRecord changed in memory and written only by the conditional
                # UPDATE below (api/commands/sql.py: the ORM's identity map cost more than the statement)
                row = command_sql.select_command(s, command_id)
                if row is None:
                    return None
                cmd = CommandRecord(**row)
                if device_id is not None and cmd.device_id != device_id:
                    raise ForeignCommand(cmd.device_id)
                old = Status(cmd.status)
                events: list[HistoryRow] = []
                applied = self._apply(cmd, event, reason, detail, now, events)
                if applied and not command_sql.update_status(s, cmd, old):
                    s.rollback()   # another writer moved it first: read it again
                    continue
                command_sql.insert_history(s, events)
                if applied:
                    self.hooks.command_changed(s, cmd, events)
                    self.metrics.command_changed(cmd, events, row["updated_at"])   # the stage it left: api/metrics.py
                    if cmd.deadline_ms is not None and not self.sweeps_here():
                        self.notify(s, pg_bus.DEADLINE, str(cmd.deadline_ms))
                if reported:
                    merge_reported(s, cmd.device_id, reported, now, self.hooks)   # commits
                else:
                    s.commit()
                return Outcome(cmd, applied, events)
            raise RuntimeError(f"command {command_id}: state change kept losing races")

        out = await self.db.write(unit, Priority.ANSWER)   # finishing accepted work goes before new work
        if out is not None:
            trail = self._trails.get(command_id)
            if trail is not None:
                trail.extend(out.history)
            if out.applied:
                self._after_change(out.command)
            else:
                self.metrics.inc(f"events_ignored_{event}")
        return out

    def forget(self, command_id: str) -> None:
        """Nobody waits on this command here any more: drop the history kept for its answer."""
        self._trails.pop(command_id, None)

    async def cancel(self, command_id: str) -> Outcome | None:
        return await self.transition(command_id, Event.CANCEL, reason="cancelled by the operator")

    # ---- reading ------------------------------------------------------------------
    async def get(self, command_id: str) -> Command | None:
        return await self.db.read(lambda s: s.get(Command, command_id))

    async def list_for_device(self, device_id: str, limit: int, offset: int) -> list[Command]:
        return await self.db.read(lambda s: list(s.exec(
            select(Command).where(Command.device_id == device_id)
            .order_by(col(Command.created_at).desc()).offset(offset).limit(limit)).all()))

    async def list_recent(self, owner: str | None, limit: int, offset: int) -> list[Command]:
        """Newest first; only `owner`'s when given."""
        def load(s: Session) -> list[Command]:
            q = select(Command) if owner is None else select(Command).where(Command.owner == owner)
            return list(s.exec(q.order_by(col(Command.created_at).desc()).offset(offset).limit(limit)).all())

        return await self.db.read(load)

    async def wait_final(self, command_id: str, timeout: float) -> None:
        """Hold until the command is final or `timeout` passes; the caller then reads the row (the truth)."""
        fut = self.waiters.register(command_id)
        try:
            cmd = await self.get(command_id)   # registered first, so a change in between is not missed
            if cmd is None or is_final(Status(cmd.status)) or timeout <= 0:
                return
            await self.wait_on(command_id, fut, timeout)
        finally:
            self.waiters.unregister(command_id, fut)

    async def wait_on(self, command_id: str, fut: asyncio.Future[Any], timeout: float) -> None:
        """Hold until `fut` (the command's wake-up: api/commands/waiters.py) resolves or `timeout` passes. While
        wake-ups are degraded (`wakes_degraded`), the command is re-read every DEGRADED_RECHECK_S as well."""
        if self.wakes_degraded is NEVER:
            await wait_until(fut, timeout, self.metrics)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:   # bounded by the deadline: one slice of DEGRADED_RECHECK_S per round
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.metrics.inc("waits_timed_out")
                return
            done, _ = await asyncio.wait((fut,), timeout=min(remaining, DEGRADED_RECHECK_S))
            if done:
                self.metrics.inc("waits_woken")
                return
            if self.wakes_degraded():
                cmd = await self.get(command_id)
                if cmd is None or is_final(Status(cmd.status)):
                    self.metrics.inc("waits_rechecked")
                    return

    async def with_history(self, command_id: str) -> tuple[Command, list[CommandEvent]] | None:
        def load(s: Session) -> tuple[Command, list[CommandEvent]] | None:
            cmd = s.get(Command, command_id)
            if cmd is None:
                return None
            rows = s.exec(select(CommandEvent).where(CommandEvent.command_id == command_id)
                          .order_by(col(CommandEvent.id)))
            return cmd, list(rows.all())

        return await self.db.read(load)

    # ---- expiry and timeouts ----------------------------------------------------------
    async def sweep(self, limit: int = 500, hold_timeouts: bool = False) -> int | None:
        """Expire or time out every command whose deadline passed; returns the next deadline.

        `hold_timeouts` (acks are being applied late: api/commands/ingest.py AckLag): sent and received commands
        are not timed out yet — their answer may be waiting for us — unless their deadline passed more
        than MAX_TIMEOUT_HOLD_S ago, so every command still ends. Queued ones expire as usual."""
        now = now_ms()
        due = await self.db.read(lambda s: s.exec(select(Command.id, Command.status, Command.deadline_ms).where(
            col(Command.deadline_ms).is_not(None), col(Command.deadline_ms) <= now).limit(limit)).all())
        held = 0
        for command_id, status, deadline in due:
            event = Event.EXPIRE if status == Status.QUEUED else Event.TIMEOUT
            if event == Event.TIMEOUT and hold_timeouts and now - deadline < MAX_TIMEOUT_HOLD_S * 1000:
                held += 1
                continue
            reason = ("expired before it could be delivered" if event == Event.EXPIRE
                      else "no final answer from the device before the deadline")
            await self.transition(command_id, event, reason=reason)
        if held:
            self.metrics.inc("timeouts_held_acks_behind", held)
            return now + 250
        return await self.db.read(lambda s: s.exec(
            select(Command.deadline_ms).where(col(Command.deadline_ms).is_not(None))
            .order_by(col(Command.deadline_ms)).limit(1)).first())

"""Fleet commands: one action to a group of devices (a tag, a zone or a list), at a rollout rate, with an
abort rule, each device tracked through its own ordinary command.

    POST /v1/fleet/commands ──▶ create(): resolve the target, insert fleet_command + fleet_target rows
                                          (one transaction) ──▶ status "running"
    rollout worker (one task, singleton lease) every tick, for each running fleet:
        counts (one GROUP BY) ──▶ abort rule fired? ──▶ "aborted"; everything final? ──▶ "completed"
        budget += rate × elapsed ──▶ next `budget` pending targets ──▶ CommandService.create(...) each
                                 ──▶ fleet_target.command_id recorded (one short transaction per batch)

Decisions, and why:

* **A snapshot at creation.** The target is resolved once, when the fleet command is created, into
  fleet_target rows (revoked devices left out and counted as `excluded`; unknown ids in an explicit
  list refuse the whole request with a 400 naming them). A device tagged later is not swept into a
  rollout already under way, progress has a fixed denominator, and the worker never re-runs the
  target query. The rows go in with SQLAlchemy Core `insert(...)` executemany in chunks of
  INSERT_CHUNK, in the same transaction as the fleet row: a fleet command exists whole or not at all.
  (10,000 targets: tens of milliseconds of one transaction.)

* **Each device gets an ordinary command.** CommandService.create(device, body, owner="fleet:<id>",
  idempotency_key="fleet:<id>:<seq>", priority=Priority.BULK): the usual states, history, events,
  sweeper deadlines and ?wait= all apply unchanged. The idempotency key makes issuing safe to repeat:
  if the worker (or the lease holder) dies between creating a device's command and recording it in
  fleet_target, the next attempt gets the existing command back instead of sending a second one.

* **Priority.** Every write of a rollout (device commands, recording them, status changes) goes to
  the database's write queue at Priority.BULK (api/db.py), so a rider's unlock, a lock, and device
  answers (INTERACTIVE) are taken first however deep the rollout's queue; the worker keeps at most
  `fleet_concurrency` device commands in flight (all fleets together) and keeps each transaction short
  (one device command; one batch of fleet_target updates), so an unlock waits at most for the one
  transaction already running (see CONCURRENCY_* below for PostgreSQL's several writers). Creating a fleet
  command is one bigger transaction, also BULK. The CPU is shared too: with an async driver (asyncpg) a
  rollout's database work runs on the event loop beside riders' requests, so before each device command
  the worker gives way while the loop is behind (`give_way`, LOOP_BUSY_S): a rider's request waiting in
  the loop's queue runs first. Measured (docs/scaling.md, 10,000 locks on PostgreSQL): riders' p99 during
  the rollout 577 → 390 ms, the rollout itself 2,717 → 3,051 devices/min; riders still wait longer than
  without a rollout (p50 200 ms against ~30 ms), since the rollout's ORM work shares the process's core.

* **Pace.** rate_per_min / 60 devices per second accrue into a budget each tick (fractions carried,
  so 90/min issues 1, 2, 1, 2, ... per second); a tick issues floor(budget). The budget is capped at
  two ticks' worth, so a stall (a slow database, a new lease holder) is not followed by a burst: the
  achieved rate is then simply what the system can do. A fleet starts with one tick's worth (at
  least one device), so it starts at once.

* **Abort rule.** Once at least `abort_after` device commands are final, if more than
  `abort_failure_pct` % of them failed, the fleet is "aborted" with the figures as its reason and
  nothing more is issued. Failed means failed, rejected, expired or timed_out; commands an operator
  cancelled one by one count neither way. Commands already issued are left to finish on their own
  (their per-device states keep moving and the counts keep showing them): a command already sent
  cannot be recalled, and a queued one may be cancelled one by one (POST /v1/commands/{id}/cancel).

* **Cancel** stops issuing, the same way: issued commands are left to finish. In this process it
  takes effect before the next device command is created; with several API replicas the lease
  holder notices at its next tick, so a batch already being created there may still go out.

* **Completed** when every target has its command and every one of them is final.

* **Counting** is one GROUP BY over fleet_target LEFT JOIN command (pending = no command yet), for
  one fleet or for a page of them; never a query per device. The listing of one fleet's devices is
  one paged join.

* **One worker, under the singleton lease** (api/lease.py, shared with the sweeper): with several
  API replicas only the holder issues, so no device is issued twice over (and if two ever overlapped,
  the idempotency key still lets only one command per target exist).

Why one module of ~550 lines: a rollout's creation, its waves and its worker change one row set (fleet and
fleet_command) under one set of conditional transitions; the module's parts are its phases, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.background import reraise_if_stopping
from api.clock import now_ms, to_datetime
from api.commands.service import CommandService, check_fits_any_device
from api.commands.states import FINAL, Status
from api.db import Database, Priority
from api.fleet.models import (
    DEVICE_STATUSES,
    PENDING,
    AbortRule,
    FleetCommand,
    FleetCreate,
    FleetDevicePublic,
    FleetPublic,
    FleetStatus,
    FleetTarget,
    FleetTargetSpec,
)
from api.lease import LEASE_RETRY_S, Lease
from api.models import Command, CommandCreate, Device, DeviceTag
from api.push import event_models as ek
from api.push.events import EventLog
from foundation.settings import Settings

log = logging.getLogger("latch.fleet")

OWNER_PREFIX = "fleet:"
INSERT_CHUNK = 1_000       # fleet_target rows per executemany at creation
IN_CHUNK = 500             # ids per IN (...) list: well under SQLite's bound-parameter limit
RECORD_CHUNK = 100          # issued targets recorded per transaction
UNKNOWN_SHOWN = 10         # unknown device ids named in a 400
CHECK_IDLE_S = 0.5         # a fleet with nothing left to issue is checked for completion this often ...
COUNTED_TARGETS_PER_S = 20_000   # ... or less often for big ones: at most this many targets counted per second
# With no running fleet the worker sleeps until one is made: here (create() wakes it) or on another replica
# (its `fleet` event reaches every replica's event log, and api/app.py wakes the worker). An idle API makes no
# query (tests/api/test_longpoll.py); this is only the safety net.
IDLE_RECHECK_S = 30.0
# device commands in creation at once (all fleets), unless LATCH_FLEET_CONCURRENCY says otherwise. SQLite has
# one writer thread: enough in flight to keep its queue stocked while the event loop does the rest (4: ~300
# devices/s issued, 16: ~500/s, offline devices, one process). PostgreSQL has several writers
# (api/db.py), and every command's transaction takes the event log's order lock: measured with 8 writers,
# 16 in flight filled every thread, device answers (INTERACTIVE) waited for one, and a rollout to online
# locks achieved 25 devices/s with riders' unlocks at p50 135 ms; with 4 in flight: 41/s, unlocks p50 89 ms.
# (Those were psycopg on threads; on asyncpg, the default since, 4 in flight: 51 devices/s, see docs/scaling.md.)
CONCURRENCY_SQLITE, CONCURRENCY_POSTGRES = 16, 4
FAILED_OUTCOMES = frozenset({Status.FAILED, Status.REJECTED, Status.EXPIRED, Status.TIMED_OUT})


# A rollout gives way while one pass of the event loop's ready queue takes longer than this (other work is
# waiting: riders' requests, device answers), for at most GIVE_WAY_MAX_S per device command. Measured on
# PostgreSQL + asyncpg, 10,000 locks, 2 cores (bench/fleet.py): see docs/scaling.md.
LOOP_BUSY_S = 0.005
GIVE_WAY_MAX_S = 1.0


async def give_way() -> None:
    """Wait while the event loop is busy with other work (bounded): bulk work goes after interactive."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GIVE_WAY_MAX_S
    while True:
        t0 = loop.time()
        await asyncio.sleep(0)          # one pass of whatever else is ready to run
        behind = loop.time() - t0
        if behind < LOOP_BUSY_S or t0 >= deadline:
            return
        await asyncio.sleep(behind)     # as long again: the queue drains meanwhile


class FleetError(Exception):
    """The target cannot be resolved as asked; str(e) is the 400's detail."""


class FleetIdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different fleet command (args[0]: its id)."""


def fleet_owner(fleet_id: str) -> str:
    return OWNER_PREFIX + fleet_id


def device_key(fleet_id: str, seq: int) -> str:
    return f"{OWNER_PREFIX}{fleet_id}:{seq}"


def empty_counts() -> dict[str, int]:
    return {k: 0 for k in DEVICE_STATUSES}


def public(f: FleetCommand, counts: dict[str, int]) -> FleetPublic:
    abort = (AbortRule(failure_pct=f.abort_failure_pct, after=f.abort_after)
             if f.abort_failure_pct is not None and f.abort_after is not None else None)
    return FleetPublic(
        id=f.id, action=f.action, params=f.params, ttl_s=f.ttl_s, target=f.target, rate_per_min=f.rate_per_min,
        abort=abort, status=FleetStatus(f.status), final=f.status != FleetStatus.RUNNING, reason=f.reason,
        owner=f.owner, total=f.total, issued=f.issued, excluded=f.excluded, counts=counts,
        created_at=to_datetime(f.created_at), updated_at=to_datetime(f.updated_at),
        finished_at=to_datetime(f.finished_at),
    )


def judge(f: FleetCommand, counts: dict[str, int]) -> tuple[FleetStatus, str] | None:
    """(new status, reason) when a running fleet must stop: its abort rule fired, or it is done."""
    final = sum(counts[s] for s in FINAL)
    outcomes = final - counts[Status.CANCELLED]           # cancelled one by one: neither success nor failure
    failures = sum(counts[s] for s in FAILED_OUTCOMES)
    if (f.abort_after is not None and f.abort_failure_pct is not None and outcomes >= f.abort_after
            and failures * 100 > f.abort_failure_pct * outcomes):
        unfinished = f.total - final - counts[PENDING]
        return FleetStatus.ABORTED, (
            f"abort rule: {failures} of {outcomes} final device commands failed "
            f"({failures * 100 / outcomes:.1f}% > {f.abort_failure_pct:g}%, after at least {f.abort_after}); "
            f"{counts[PENDING]} devices were not issued; the {unfinished} issued and not yet final finish on their own")
    if counts[PENDING] == 0 and final == f.total:
        shown = ", ".join(f"{counts[s]} {s.value}" for s in Status if counts[s])
        return FleetStatus.COMPLETED, f"every device command is final: {shown}"
    return None


def _request_hash(body: FleetCreate) -> str:
    text = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(slots=True)
class _Pace:
    budget: float
    last: float
    checked: float = 0.0


_T = FleetTarget.__table__   # type: ignore[attr-defined]
_F = FleetCommand.__table__  # type: ignore[attr-defined]
_RECORD = (update(_T).where(_T.c.fleet_id == bindparam("b_fleet"), _T.c.seq == bindparam("b_seq"))
           .values(command_id=bindparam("b_cmd")))


class FleetService:
    def __init__(self, db: Database, settings: Settings, commands: CommandService, lease: Lease | None = None,
                 events: EventLog | None = None) -> None:
        self.db = db
        self.settings = settings
        self.commands = commands
        self.lease = lease or Lease(None)   # share the sweeper's: one singleton lease per process
        self.events = events
        self._pace: dict[str, _Pace] = {}
        self._stopped: set[str] = set()     # cancelled or finished here: issue nothing more, at once
        concurrency = settings.fleet_concurrency or (CONCURRENCY_POSTGRES if db.is_postgres else CONCURRENCY_SQLITE)
        self._gate = asyncio.Semaphore(max(1, concurrency))
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0

    # ---- creating -------------------------------------------------------------------
    async def create(self, body: FleetCreate, owner: str,
                     idempotency_key: str | None) -> tuple[FleetCommand, bool]:
        """(fleet command, created). A repeated Idempotency-Key with the same body returns the first one."""
        check_fits_any_device(body.action, body.params)   # CommandTooLarge before anything is written
        req_hash = _request_hash(body) if idempotency_key else None
        now = now_ms()
        spec = body.target
        value: Any = spec.tag or spec.zone or len(spec.devices or [])   # a list: how many ids it named
        fleet = FleetCommand(
            id=uuid.uuid4().hex, action=body.action, params=body.params, target={"kind": spec.kind, "value": value},
            ttl_s=min(body.ttl_s or self.settings.default_ttl_s, self.settings.max_ttl_s),
            rate_per_min=body.rate_per_min,
            abort_failure_pct=body.abort.failure_pct if body.abort else None,
            abort_after=body.abort.after if body.abort else None,
            status=FleetStatus.RUNNING, owner=owner, idempotency_key=idempotency_key, request_hash=req_hash,
            total=0, created_at=now, updated_at=now)
        limit = self.settings.fleet_max_devices

        def find(s: Session) -> FleetCommand | None:
            return s.exec(select(FleetCommand).where(FleetCommand.owner == owner,
                                                     FleetCommand.idempotency_key == idempotency_key)).first()

        def unit(s: Session) -> tuple[FleetCommand, bool]:
            if idempotency_key and (existing := find(s)) is not None:
                return existing, False
            ids, excluded = _resolve(s, spec, limit)
            fleet.total, fleet.excluded = len(ids), excluded
            s.add(fleet)
            s.flush()   # the fleet row before its targets (foreign key)
            conn = s.connection()
            for i in range(0, len(ids), INSERT_CHUNK):
                conn.execute(insert(_T), [{"fleet_id": fleet.id, "seq": i + j, "device_id": d, "command_id": None}
                                          for j, d in enumerate(ids[i:i + INSERT_CHUNK])])
            self._event(s, fleet)
            s.commit()
            return fleet, True

        try:
            found, created = await self.db.write(unit, Priority.BULK)
        except IntegrityError:   # another request took the key between our check and insert
            existing = await self.db.read(find) if idempotency_key else None
            if existing is None:
                raise
            found, created = existing, False
        if not created and found.request_hash != req_hash:
            raise FleetIdempotencyConflict(found.id)
        if created:
            log.info("fleet command %s: %s to %d devices (%s), %d/min", found.id, found.action, found.total,
                     found.target, found.rate_per_min)
            self._wake.set()
        return found, created

    # ---- reading ------------------------------------------------------------------------
    async def get(self, fleet_id: str) -> tuple[FleetCommand, dict[str, int]] | None:
        def load(s: Session) -> tuple[FleetCommand, dict[str, int]] | None:
            f = s.get(FleetCommand, fleet_id)
            return None if f is None else (f, _counts(s, [fleet_id])[fleet_id])

        return await self.db.read(load)

    async def counts(self, fleet_id: str) -> dict[str, int]:
        return await self.db.read(lambda s: _counts(s, [fleet_id])[fleet_id])

    async def list(self, limit: int, offset: int,
                   status: str | None = None) -> list[tuple[FleetCommand, dict[str, int]]]:
        """Newest first, each with its counts (one GROUP BY for the whole page)."""
        def load(s: Session) -> list[tuple[FleetCommand, dict[str, int]]]:
            q = select(FleetCommand)
            if status is not None:
                q = q.where(FleetCommand.status == status)
            page = list(s.exec(q.order_by(col(FleetCommand.created_at).desc(), col(FleetCommand.id))
                               .offset(offset).limit(limit)).all())
            counts = _counts(s, [f.id for f in page])
            return [(f, counts[f.id]) for f in page]

        return await self.db.read(load)

    async def devices(self, fleet_id: str, status: str | None, limit: int,
                      offset: int) -> list[FleetDevicePublic] | None:
        """One fleet's targets in issue order with their command's status; None when there is no such fleet."""
        def load(s: Session) -> list[FleetDevicePublic] | None:
            if s.get(FleetCommand, fleet_id) is None:
                return None
            q = (select(FleetTarget.seq, FleetTarget.device_id, FleetTarget.command_id, Command.status,
                        Command.reason, Command.created_at, Command.updated_at)
                 .select_from(FleetTarget)
                 .join(Command, col(Command.id) == col(FleetTarget.command_id), isouter=True)
                 .where(FleetTarget.fleet_id == fleet_id))
            if status == PENDING:
                q = q.where(col(FleetTarget.command_id).is_(None))
            elif status is not None:
                q = q.where(Command.status == status)
            rows = s.exec(q.order_by(col(FleetTarget.seq)).offset(offset).limit(limit)).all()
            return [FleetDevicePublic(seq=seq, device_id=dev, command_id=cid, status=st or PENDING, reason=reason,
                                      issued_at=to_datetime(created), updated_at=to_datetime(updated))
                    for seq, dev, cid, st, reason, created, updated in rows]

        return await self.db.read(load)

    # ---- stopping -------------------------------------------------------------------------
    async def cancel(self, fleet_id: str) -> tuple[FleetCommand, bool] | None:
        """Stop issuing (commands already issued finish on their own). (fleet, applied); None if unknown."""
        self._stopped.add(fleet_id)   # this process issues nothing more for it, from now on
        return await self._finish(fleet_id, FleetStatus.CANCELLED,
                                  "cancelled by the operator; device commands already issued finish on their own",
                                  Priority.INTERACTIVE)

    async def _finish(self, fleet_id: str, status: FleetStatus, reason: str,
                      priority: int = Priority.BULK) -> tuple[FleetCommand, bool] | None:
        """running → `status`, as a conditional UPDATE (applies once, whoever races)."""
        now = now_ms()

        def unit(s: Session) -> tuple[FleetCommand, bool] | None:
            res = s.exec(update(FleetCommand).where(  # type: ignore[call-overload]
                col(FleetCommand.id) == fleet_id, col(FleetCommand.status) == FleetStatus.RUNNING,
            ).values(status=status, reason=reason, updated_at=now, finished_at=now))
            f = s.get(FleetCommand, fleet_id, populate_existing=True)
            if f is None:
                s.rollback()
                return None
            applied = res.rowcount == 1
            if applied:
                self._event(s, f)
            s.commit()
            return f, applied

        out = await self.db.write(unit, priority)
        if out is not None and out[1]:
            self._stopped.add(fleet_id)
            self._pace.pop(fleet_id, None)
            log.info("fleet command %s %s: %s", fleet_id, status, reason)
        return out

    def wake(self) -> None:
        """A fleet changed somewhere (a `fleet` event): look at once."""
        self._wake.set()

    def _event(self, s: Session, f: FleetCommand) -> None:
        if self.events is not None:
            self.events.append(s, ek.FLEET, {"fleet_id": f.id, "action": f.action, "status": str(f.status),
                                             "reason": f.reason, "total": f.total, "issued": f.issued}, None)

    # ---- the rollout worker ------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="latch-fleet-rollout")

    async def stop(self) -> None:
        """Device commands being created finish in the database or not at all; the next holder of the
        lease re-issues any it did not record, and gets the same command back (idempotency key)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if not await self.lease.hold():
                self._pace.clear()   # another process issues; start afresh if the lease comes here
                await self._sleep(LEASE_RETRY_S)
                continue
            started = time.monotonic()
            try:
                running = await self.tick()
            except Exception:
                reraise_if_stopping()   # api/background.py: stop() cancelled a query, not a failure
                log.exception("fleet rollout tick failed; retrying")
                running = True
            delay = self.settings.fleet_tick_s if running else IDLE_RECHECK_S
            await self._sleep(max(0.0, delay - (time.monotonic() - started)))

    async def _sleep(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def tick(self) -> bool:
        """One round over every running fleet; False when there is none."""
        fleets = await self.db.read(lambda s: list(s.exec(
            select(FleetCommand).where(FleetCommand.status == FleetStatus.RUNNING)).all()))
        running = {f.id for f in fleets}
        for gone in [k for k in self._pace if k not in running]:
            del self._pace[gone]
        self._stopped &= running   # the rest are final in the database: nothing reads them any more
        if not fleets:
            return False
        results = await asyncio.gather(*(self._advance(f) for f in fleets), return_exceptions=True)
        for f, r in zip(fleets, results):
            if isinstance(r, BaseException):
                log.error("fleet command %s: rollout step failed (%r); retrying next tick", f.id, r)
        self.ticks += 1
        return True

    async def _advance(self, f: FleetCommand) -> None:
        now = time.monotonic()
        tick = self.settings.fleet_tick_s
        rate_s = f.rate_per_min / 60
        pace = self._pace.get(f.id)
        if pace is None:
            pace = self._pace[f.id] = _Pace(budget=max(1.0, rate_s * tick), last=now)
        issuing = f.issued < f.total and f.id not in self._stopped
        # while issuing, only the abort rule can end a fleet (pending > 0); afterwards, completion. The
        # count costs a join over the fleet's targets, so big fleets are counted less often.
        every = max(tick if issuing else CHECK_IDLE_S, f.total / COUNTED_TARGETS_PER_S)
        if (f.abort_after is not None or not issuing) and now - pace.checked >= every:
            pace.checked = now
            verdict = judge(f, await self.counts(f.id))
            if verdict is not None:
                await self._finish(f.id, *verdict)
                return
        if not issuing:
            return
        pace.budget = min(pace.budget + rate_s * (now - pace.last), max(1.0, rate_s * tick * 2))
        pace.last = now
        n = min(int(pace.budget), f.total - f.issued)
        if n > 0:
            pace.budget -= await self._issue(f, n)

    async def _issue(self, f: FleetCommand, n: int) -> int:
        """Create the next `n` pending devices' commands (bounded concurrency); returns how many exist now."""
        rows = await self.db.read(lambda s: s.exec(
            select(FleetTarget.seq, Device).join(Device, col(Device.id) == col(FleetTarget.device_id))
            .where(FleetTarget.fleet_id == f.id, col(FleetTarget.command_id).is_(None))
            .order_by(col(FleetTarget.seq)).limit(n)).all())
        body = CommandCreate(action=f.action, params=f.params, ttl_s=f.ttl_s)
        owner = fleet_owner(f.id)
        created = 0
        unrecorded: list[tuple[int, str]] = []

        async def one(seq: int, device: Device) -> None:
            nonlocal created
            async with self._gate:
                if f.id in self._stopped:
                    return
                await give_way()
                try:
                    cmd, _ = await self.commands.create(device, body, owner, device_key(f.id, seq),
                                                        priority=Priority.BULK)
                except Exception as e:  # noqa: BLE001 — left pending, retried next tick (same idempotency key)
                    log.warning("fleet command %s: device %s not issued yet: %r", f.id, device.id, e)
                    return
            created += 1
            unrecorded.append((seq, cmd.id))
            if len(unrecorded) >= RECORD_CHUNK:   # progress shows as it goes, not once per tick
                batch = unrecorded[:]
                unrecorded.clear()
                await self._record(f.id, batch)

        results = await asyncio.gather(*(one(seq, d) for seq, d in rows), return_exceptions=True)
        if unrecorded:
            await self._record(f.id, unrecorded)
        for r in results:
            if isinstance(r, BaseException):
                raise r   # a failed record: those targets stay pending, re-issued (same command) next tick
        return created

    async def _record(self, fleet_id: str, done: list[tuple[int, str]]) -> None:
        """Each issued target's command id, and the fleet's `issued` count, in one short transaction."""
        def unit(s: Session) -> None:
            conn = s.connection()
            conn.execute(_RECORD, [{"b_fleet": fleet_id, "b_seq": seq, "b_cmd": cid} for seq, cid in done])
            issued = (select(func.count()).select_from(_T)
                      .where(_T.c.fleet_id == fleet_id, _T.c.command_id.is_not(None)).scalar_subquery())
            conn.execute(update(_F).where(_F.c.id == fleet_id).values(issued=issued, updated_at=now_ms()))
            s.commit()

        await self.db.write(unit, Priority.BULK)


# ---- queries ---------------------------------------------------------------------------


def _counts(s: Session, fleet_ids: list[str]) -> dict[str, dict[str, int]]:
    """Device commands by status (pending = not issued) for each fleet: one GROUP BY per IN_CHUNK fleets."""
    out = {fid: empty_counts() for fid in fleet_ids}
    for i in range(0, len(fleet_ids), IN_CHUNK):
        chunk = fleet_ids[i:i + IN_CHUNK]
        q = (select(FleetTarget.fleet_id, Command.status, func.count())
             .select_from(FleetTarget)
             .join(Command, col(Command.id) == col(FleetTarget.command_id), isouter=True)
             .where(col(FleetTarget.fleet_id).in_(chunk) if len(chunk) > 1 else FleetTarget.fleet_id == chunk[0])
             .group_by(FleetTarget.fleet_id, Command.status))
        for fid, status, n in s.exec(q):
            key = status or PENDING
            out[fid][key] = out[fid].get(key, 0) + n
    return out


def _resolve(s: Session, spec: FleetTargetSpec, limit: int) -> tuple[list[str], int]:
    """(device ids in issue order, revoked devices left out); FleetError when nothing sensible matches."""
    if spec.devices is not None:
        wanted = list(dict.fromkeys(spec.devices))
        revoked: dict[str, bool] = {}
        for i in range(0, len(wanted), IN_CHUNK):
            for device_id, is_revoked in s.exec(select(Device.id, Device.revoked)
                                                 .where(col(Device.id).in_(wanted[i:i + IN_CHUNK]))):
                revoked[device_id] = is_revoked
        unknown = [d for d in wanted if d not in revoked]
        if unknown:
            more = f" and {len(unknown) - UNKNOWN_SHOWN} more" if len(unknown) > UNKNOWN_SHOWN else ""
            raise FleetError(f"{len(unknown)} unknown device(s) in target.devices: "
                             f"{', '.join(unknown[:UNKNOWN_SHOWN])}{more}")
        ids = [d for d in wanted if not revoked[d]]
        if not ids:
            raise FleetError("every device in target.devices is revoked: nothing to send")
        return ids, len(wanted) - len(ids)
    if spec.tag is not None:
        what = f"tag {spec.tag!r}"
        base = select(Device.id).join(DeviceTag, col(DeviceTag.device_id) == col(Device.id)).where(
            DeviceTag.tag == spec.tag)
    else:
        what = f"zone {spec.zone!r}"
        base = select(Device.id).where(Device.zone == spec.zone)
    not_revoked = base.where(Device.revoked == False)  # noqa: E712
    ids = list(s.exec(not_revoked.order_by(col(Device.id)).limit(limit + 1)).all())
    excluded = s.exec(select(func.count()).select_from(
        base.where(Device.revoked == True).subquery())).one()  # noqa: E712
    if not ids:
        raise FleetError(f"no device has {what}" + (f" (except {excluded} revoked)" if excluded else ""))
    if len(ids) > limit:
        raise FleetError(f"{what} matches more than {limit} devices, the most one fleet command may target "
                         f"(LATCH_FLEET_MAX_DEVICES)")
    return ids, int(excluded)

"""Rides: a rider holds a bike from a successful unlock until the ride ends.

    starting ──unlock succeeded──▶ active ──rider/operator ends, or the lock reports "locked"──▶ ended
        └──────unlock failed, rejected, expired, timed out──▶ failed (the bike was never held)

At most one open (starting or active) ride per bike and per rider: checked in the transaction and
backed by partial unique indexes, so two riders racing for one bike cannot both win. The ride's
own changes and the events they cause are written in one transaction; the changes driven by the
unlock command and the lock's reports happen in the journal (api/journal.py), inside the
transaction of the command or device change.
"""

from __future__ import annotations

import uuid

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.auth import Principal
from api.clock import now_ms, to_datetime
from api.commands import sql as command_sql
from api.commands.service import CommandService, new_command_id
from api.commands.states import Status
from api.db import Database
from api.errors import Conflict, Forbidden, NotFound
from api.models import Command, CommandCreate, CommandRow, Device
from api.push import event_models as ek
from api.push.events import EventLog
from api.riders.models import OPEN_RIDE, BikePublic, Ride, RideCreate, RidePublic, RideStatus

UNLOCK_TTL_S = 30


def public(r: Ride) -> RidePublic:
    return RidePublic(id=r.id, user_id=r.user_id, bike_id=r.device_id, status=RideStatus(r.status), reason=r.reason,
                      unlock_command_id=r.unlock_command_id, end_command_id=r.end_command_id,
                      started_at=to_datetime(r.started_at), updated_at=to_datetime(r.updated_at),
                      ended_at=to_datetime(r.ended_at))


def ride_data(r: Ride) -> dict:
    return {"ride_id": r.id, "device_id": r.device_id, "user_id": r.user_id, "status": r.status, "reason": r.reason,
            "unlock_command_id": r.unlock_command_id, "end_command_id": r.end_command_id}


# ---- units of work on a session (the journal runs these inside other transactions) ----------

def open_ride_for_device(s: Session, device_id: str) -> Ride | None:
    ride_id = command_sql.open_ride_id(s, device_id)   # one indexed read; the ORM only when there is a ride
    return s.get(Ride, ride_id) if ride_id is not None else None


def open_ride_for_user(s: Session, user_id: str) -> Ride | None:
    return s.exec(select(Ride).where(Ride.user_id == user_id, col(Ride.status).in_(OPEN_RIDE))).first()


def move(s: Session, ride: Ride, frm: tuple[str, ...], to: RideStatus, reason: str | None, now: int,
         **values: object) -> bool:
    """Conditional change of a ride's status (applies once however many writers race)."""
    done = to in (RideStatus.ENDED, RideStatus.FAILED)
    res = s.exec(update(Ride).where(col(Ride.id) == ride.id, col(Ride.status).in_(frm))  # type: ignore[call-overload]
                 .values(status=to, reason=reason, updated_at=now, ended_at=now if done else None, **values))
    if res.rowcount != 1:
        return False
    ride.status, ride.reason, ride.updated_at = to, reason, now
    if done:
        ride.ended_at = now
    for k, v in values.items():
        setattr(ride, k, v)
    return True


def settle_unlock(s: Session, cmd: CommandRow, now: int) -> Ride | None:
    """The ride whose unlock just reached a final state moves to active or failed; returns it if it moved."""
    ride = s.exec(select(Ride).where(Ride.unlock_command_id == cmd.id, Ride.status == RideStatus.STARTING)).first()
    if ride is None:
        return None
    s.expunge(ride)
    if cmd.status == Status.SUCCEEDED:
        moved = move(s, ride, (RideStatus.STARTING,), RideStatus.ACTIVE, None, now)
    else:
        why = f"unlock {cmd.status}" + (f": {cmd.reason}" if cmd.reason else "")
        moved = move(s, ride, (RideStatus.STARTING,), RideStatus.FAILED, why, now)
    return ride if moved else None


class RideService:
    def __init__(self, db: Database, commands: CommandService, events: EventLog) -> None:
        self.db = db
        self.commands = commands
        self.events = events

    async def start(self, who: Principal, body: RideCreate) -> tuple[Ride, Command]:
        if who.user_id is None:
            raise Forbidden("the admin token has no rider account: sign up or log in as a user to ride")
        user_id = who.user_id
        now = now_ms()
        ride = Ride(id=uuid.uuid4().hex, user_id=user_id, device_id=body.bike_id, status=RideStatus.STARTING,
                    unlock_command_id=new_command_id(), started_at=now, updated_at=now)

        def insert(s: Session) -> Device:
            device = s.get(Device, body.bike_id)
            if device is None:
                raise NotFound(f"no bike {body.bike_id!r}")
            if device.revoked:
                raise Conflict(f"bike {body.bike_id} is out of service")
            if not device.online:
                raise Conflict(f"bike {body.bike_id} is offline: choose another bike")
            mine = open_ride_for_user(s, user_id)
            if mine is not None:
                raise Conflict(f"you already have an open ride ({mine.id} on {mine.device_id}): end it first")
            if open_ride_for_device(s, body.bike_id) is not None:
                raise Conflict(f"bike {body.bike_id} is in use by another rider")
            s.add(ride)
            self.events.append(s, ek.RIDE, ride_data(ride), user_id, at=now)
            try:
                s.commit()
            except IntegrityError as e:   # a racing start won
                raise Conflict(f"bike {body.bike_id} was just taken, or you started another ride") from e
            return device

        device = await self.db.write(insert)
        cmd_body = CommandCreate(action="unlock", ttl_s=body.ttl_s or UNLOCK_TTL_S)
        try:
            cmd, _ = await self.commands.create(device, cmd_body, who.name, None, ride.unlock_command_id)
        except BaseException:
            await self._fail(ride, "the unlock could not be created")
            raise
        return ride, cmd

    async def _fail(self, ride: Ride, reason: str) -> None:
        def unit(s: Session) -> None:
            if move(s, ride, (RideStatus.STARTING,), RideStatus.FAILED, reason, now_ms()):
                self.events.append(s, ek.RIDE, ride_data(ride), ride.user_id)
            s.commit()

        await self.db.write(unit)

    async def end(self, who: Principal, ride_id: str) -> Ride:
        """End an active ride; a bike the lock reports unlocked gets a lock command (end_command_id)."""
        lock_id = new_command_id()

        def unit(s: Session) -> tuple[Ride, Device | None]:
            ride = s.get(Ride, ride_id)
            if ride is None:
                raise NotFound(f"no ride {ride_id!r}")
            if not who.sees(ride.user_id):
                raise Forbidden(f"ride {ride_id} is not yours")
            if ride.status == RideStatus.STARTING:
                raise Conflict("the ride is still starting: wait for the unlock to finish")
            if ride.status != RideStatus.ACTIVE:
                raise Conflict(f"the ride has already {ride.status}")
            s.expunge(ride)
            device = s.get(Device, ride.device_id)
            needs_lock = device is not None and device.reported.get("locked") is False
            reason = "ended by the rider" if who.user_id == ride.user_id else f"ended by operator {who.name}"
            if not move(s, ride, (RideStatus.ACTIVE,), RideStatus.ENDED, reason, now_ms(),
                        end_command_id=lock_id if needs_lock else None):
                raise Conflict("the ride changed meanwhile: look again")
            self.events.append(s, ek.RIDE, ride_data(ride), ride.user_id)
            s.commit()
            return ride, device if needs_lock else None

        ride, device = await self.db.write(unit)
        if device is not None:
            await self.commands.create(device, CommandCreate(action="lock", ttl_s=UNLOCK_TTL_S), who.name, None,
                                       lock_id)
        return ride

    async def get(self, who: Principal, ride_id: str) -> Ride:
        ride = await self.db.read(lambda s: s.get(Ride, ride_id))
        if ride is None:
            raise NotFound(f"no ride {ride_id!r}")
        if not who.sees(ride.user_id):
            raise Forbidden(f"ride {ride_id} is not yours")
        return ride

    async def list(self, who: Principal, limit: int, offset: int, user_id: str | None = None,
                   open_only: bool = False) -> list[Ride]:
        if not who.is_operator:
            if user_id is not None and user_id != who.user_id:
                raise Forbidden("riders see only their own rides")
            user_id = who.user_id

        def load(s: Session) -> list[Ride]:
            q = select(Ride)
            if user_id is not None:
                q = q.where(Ride.user_id == user_id)
            if open_only:
                q = q.where(col(Ride.status).in_(OPEN_RIDE))
            return list(s.exec(q.order_by(col(Ride.started_at).desc()).offset(offset).limit(limit)).all())

        return await self.db.read(load)

    async def bikes(self, who: Principal, limit: int) -> list[BikePublic]:
        def load(s: Session) -> tuple[list[Device], list[Ride]]:
            devices = list(s.exec(select(Device).order_by(Device.id).limit(limit)).all())
            rides = list(s.exec(select(Ride).where(col(Ride.status).in_(OPEN_RIDE))).all())
            return devices, rides

        devices, rides = await self.db.read(load)
        held = {r.device_id: r.user_id for r in rides}
        out = []
        for d in devices:
            holder = held.get(d.id)
            out.append(BikePublic(id=d.id, name=d.name, online=d.online, battery=d.reported.get("battery"),
                                  locked=d.reported.get("locked"), free=d.online and not d.revoked and holder is None,
                                  yours=holder is not None and holder == who.user_id))
        return out

"""What the operator console reads beyond the plain API: the fleet list with search, filters and sort
(GET /v1/devices), fleet counts, the charts' time series, recent events and a device's presence history.

Every query is bounded: filters and sort run in SQL (one count and one page of rows), the time series
read one hour of commands (at most MAX_SERIES_COMMANDS of them) and the event log from the first id of the
window on (found by bisecting the primary key), so the console stays fast at 10,000 devices.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import exists, func, or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from api.clock import now_ms
from api.commands.states import Status, is_final
from api.models import Command, CommandEvent, Device
from api.push.event_models import PRESENCE, LogEvent
from api.riders.models import OPEN_RIDE, Ride, User
from protocol import messages

JAM_REASONS = (messages.REASON_JAMMED, messages.REASON_ACTUATION_TIMEOUT)
MOVING = ("unlock", "lock")          # the actions that drive the bolt: a jam shows on one of these
MAX_SERIES_COMMANDS = 50_000         # the charts read at most this many commands of the window
MAX_PRESENCE_EVENTS = 100_000
STAGES = ("dispatch", "delivery", "actuation", "total")   # created→sent, sent→received, received→final, all


class DeviceFilter(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    LOW_BATTERY = "low_battery"
    IN_RIDE = "in_ride"
    JAMMED = "jammed"
    REVOKED = "revoked"


class DeviceSort(StrEnum):
    ID = "id"
    ID_DESC = "-id"
    BATTERY = "battery"
    BATTERY_DESC = "-battery"
    LAST_SEEN = "last_seen"
    LAST_SEEN_DESC = "-last_seen"
    ONLINE = "online"          # online first, then by id
    OFFLINE = "offline"        # offline first, then by id


def _battery() -> Any:
    return Device.reported["battery"].as_float()   # type: ignore[index]  # JSON path, both dialects


def _in_ride() -> Any:
    return exists().where(Ride.device_id == Device.id, col(Ride.status).in_(OPEN_RIDE))


def _jammed() -> Any:
    """The device's latest unlock/lock failed with a jam (or the motor never finished)."""
    later = aliased(Command)
    return exists().where(
        Command.device_id == Device.id, col(Command.action).in_(MOVING), Command.status == Status.FAILED,
        col(Command.reason).in_(JAM_REASONS),
        ~exists().where(later.device_id == Command.device_id, col(later.action).in_(MOVING),
                        later.created_at > Command.created_at))


def _where(q: str | None, filters: list[DeviceFilter], low_pct: int) -> list[Any]:
    out: list[Any] = []
    if q:
        needle = q.lower()
        out.append(or_(func.lower(Device.id).contains(needle, autoescape=True),
                       func.lower(Device.name).contains(needle, autoescape=True)))
    for f in filters:
        if f is DeviceFilter.ONLINE:
            out.append(col(Device.online).is_(True))
        elif f is DeviceFilter.OFFLINE:
            out.append(col(Device.online).is_(False))
        elif f is DeviceFilter.LOW_BATTERY:
            out.append(_battery() < low_pct)
        elif f is DeviceFilter.IN_RIDE:
            out.append(_in_ride())
        elif f is DeviceFilter.JAMMED:
            out.append(_jammed())
        elif f is DeviceFilter.REVOKED:
            out.append(col(Device.revoked).is_(True))
    return out


def _order(sort: DeviceSort) -> list[Any]:
    i = col(Device.id)
    match sort:
        case DeviceSort.ID_DESC:
            return [i.desc()]
        case DeviceSort.BATTERY:
            return [_battery().is_(None), _battery(), i]
        case DeviceSort.BATTERY_DESC:
            return [_battery().is_(None), _battery().desc(), i]
        case DeviceSort.LAST_SEEN:
            return [col(Device.last_seen).is_(None), col(Device.last_seen), i]
        case DeviceSort.LAST_SEEN_DESC:
            return [col(Device.last_seen).is_(None), col(Device.last_seen).desc(), i]
        case DeviceSort.ONLINE:
            return [col(Device.online).desc(), i]
        case DeviceSort.OFFLINE:
            return [col(Device.online), i]
    return [i]


def search_devices(s: Session, q: str | None, filters: list[DeviceFilter], sort: DeviceSort, limit: int,
                   offset: int, low_pct: int) -> tuple[list[Device], int, dict[str, dict[str, bool]]]:
    """One page of devices, the count of all that match, and each listed device's in_ride/jammed flags."""
    where = _where(q, filters, low_pct)
    total = s.exec(select(func.count()).select_from(Device).where(*where)).one()
    rows = list(s.exec(select(Device).where(*where).order_by(*_order(sort)).offset(offset).limit(limit)).all())
    ids = [d.id for d in rows]
    flags = {i: {"in_ride": False, "jammed": False} for i in ids}
    if ids:
        for device_id in s.exec(select(Device.id).where(col(Device.id).in_(ids), _in_ride())).all():
            flags[device_id]["in_ride"] = True
        for device_id in s.exec(select(Device.id).where(col(Device.id).in_(ids), _jammed())).all():
            flags[device_id]["jammed"] = True
    return rows, int(total), flags


def fleet_summary(s: Session, low_pct: int) -> dict[str, int]:
    def count(*where: Any) -> int:
        return int(s.exec(select(func.count()).select_from(Device).where(*where)).one())

    live = col(Device.revoked).is_(False)
    return {"total": count(), "online": count(live, col(Device.online).is_(True)),
            "offline": count(live, col(Device.online).is_(False)),
            "low_battery": count(live, _battery() < low_pct), "in_ride": count(_in_ride()),
            "jammed": count(_jammed()), "revoked": count(col(Device.revoked).is_(True))}


# ---- the event log --------------------------------------------------------------------------------


def first_event_at_or_after(s: Session, since_ms: int) -> int | None:
    """The smallest event id whose `at` >= since_ms (ids follow time: appended in commit order), by
    bisecting the primary key: ~log2(n) point reads instead of a scan of the table."""
    lo, hi = s.exec(select(func.min(LogEvent.id), func.max(LogEvent.id))).one()
    if lo is None or hi is None:
        return None

    def at_from(i: int) -> tuple[int, int] | None:   # the first event at or after id i: (id, at)
        row = s.exec(select(LogEvent.id, LogEvent.at).where(col(LogEvent.id) >= i)
                     .order_by(col(LogEvent.id)).limit(1)).first()
        return (int(row[0]), int(row[1])) if row else None

    last = at_from(hi)
    if last is None or last[1] < since_ms:
        return None
    while lo < hi:   # invariant: every id below lo is older than since_ms; at_from(hi) is not
        mid = (lo + hi) // 2
        found = at_from(mid)
        assert found is not None
        if found[1] >= since_ms:
            hi = mid
        else:
            lo = found[0] + 1
    first = at_from(lo)
    return first[0] if first else None


def recent_events(s: Session, limit: int) -> list[LogEvent]:
    """The newest `limit` events (every audience: operators see all), oldest first."""
    rows = list(s.exec(select(LogEvent).order_by(col(LogEvent.id).desc()).limit(limit)).all())
    rows.reverse()
    return rows


def presence_history(s: Session, device_id: str, since_ms: int, limit: int) -> list[dict[str, Any]]:
    """The device's presence changes since `since_ms`, newest first."""
    start = first_event_at_or_after(s, since_ms)
    if start is None:
        return []
    rows = s.exec(select(LogEvent.id, LogEvent.at, LogEvent.data)
                  .where(col(LogEvent.id) >= start, LogEvent.kind == PRESENCE,
                         LogEvent.data["device_id"].as_string() == device_id)   # type: ignore[index]
                  .order_by(col(LogEvent.id).desc()).limit(limit)).all()
    return [{"id": i, "at": at, "online": bool((data or {}).get("online"))} for i, at, data in rows]


# ---- the charts' time series ----------------------------------------------------------------------


def _pct(values: list[int], p: float) -> int | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return values[k]


def series(s: Session, minutes: int, now: int | None = None) -> dict[str, Any]:
    """Per minute over the last `minutes`: commands created by outcome (their status now), p50/p99
    latency of each stage of the commands created in that minute, and devices online at its end."""
    now = now_ms() if now is None else now
    step = 60_000
    end = (now // step + 1) * step          # the end of the current minute
    start = end - minutes * step
    n = minutes

    cmds = s.exec(select(Command.id, Command.created_at, Command.status)
                  .where(col(Command.created_at) >= start).order_by(col(Command.created_at).desc())
                  .limit(MAX_SERIES_COMMANDS)).all()
    by_status: dict[str, list[int]] = {}
    created: dict[str, tuple[int, int]] = {}     # id -> (bucket, created_at)
    for cid, at, status in cmds:
        b = (int(at) - start) // step
        if 0 <= b < n:
            by_status.setdefault(status, [0] * n)[b] += 1
            created[cid] = (b, int(at))

    # each command's transition times, from its history (applied changes only)
    times: dict[str, dict[str, int]] = {}
    if created:
        rows = s.exec(select(CommandEvent.command_id, CommandEvent.at, CommandEvent.to_status)
                      .join(Command, col(Command.id) == col(CommandEvent.command_id))
                      .where(col(Command.created_at) >= start, col(CommandEvent.applied).is_(True))).all()
        for cid, at, to in rows:
            if cid in created and to:
                times.setdefault(cid, {}).setdefault(to, int(at))
    lat: dict[str, list[list[int]]] = {st: [[] for _ in range(n)] for st in STAGES}
    for cid, (b, c_at) in created.items():
        t = times.get(cid, {})
        sent, received = t.get(Status.SENT), t.get(Status.RECEIVED)
        final = next((v for k, v in t.items() if is_final(Status(k))), None) if t else None
        if sent is not None:
            lat["dispatch"][b].append(sent - c_at)
        if sent is not None and received is not None:
            lat["delivery"][b].append(received - sent)
        if final is not None and (received or sent) is not None:
            lat["actuation"][b].append(final - (received if received is not None else sent))   # type: ignore[operator]
        if final is not None and sent is not None:
            lat["total"][b].append(final - c_at)
    latency = {st: {"p50": [_pct(v, 50) for v in lat[st]], "p99": [_pct(v, 99) for v in lat[st]]}
               for st in STAGES}

    # devices online at the end of each minute: now's count, walked back through presence changes
    online_now = int(s.exec(select(func.count()).select_from(Device)
                            .where(col(Device.online).is_(True), col(Device.revoked).is_(False))).one())
    first = first_event_at_or_after(s, start)
    changes: list[tuple[int, bool]] = []
    if first is not None:
        for at, data in s.exec(select(LogEvent.at, LogEvent.data)
                               .where(col(LogEvent.id) >= first, LogEvent.kind == PRESENCE)
                               .order_by(col(LogEvent.id)).limit(MAX_PRESENCE_EVENTS)).all():
            changes.append((int(at), bool((data or {}).get("online"))))
    online: list[int] = [0] * n
    count, j = online_now, len(changes) - 1
    for b in range(n - 1, -1, -1):
        boundary = start + (b + 1) * step
        while j >= 0 and changes[j][0] >= boundary:   # undo the changes after this minute's end
            count += -1 if changes[j][1] else 1
            j -= 1
        online[b] = max(0, count)
    return {"start": start, "step_ms": step, "minutes": n, "now": now,
            "commands": {k: v for k, v in sorted(by_status.items())},
            "latency_ms": latency, "online": online, "online_now": online_now,
            "truncated": len(cmds) >= MAX_SERIES_COMMANDS}


def owner_words(s: Session, owner: str) -> dict[str, Any]:
    """Who a command's owner is: the admin token, a fleet rollout, or a user (email and role)."""
    if owner.startswith("fleet:"):
        return {"kind": "fleet", "fleet_id": owner.split(":", 1)[1], "label": f"fleet rollout {owner[6:]}"}
    if owner == "admin":
        return {"kind": "admin", "label": "the operator token"}
    user = s.get(User, owner)
    if user is None:
        return {"kind": "unknown", "label": owner}
    return {"kind": user.role, "label": f"{user.email} ({user.role})", "email": user.email}

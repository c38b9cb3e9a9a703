"""The command path's statements: one place, run on SQLite's own cursor, through SQLAlchemy Core elsewhere.

Every unit of work on the command path (api/commands/service.py, api/registry/devices.py, api/push/events.py) reads and
writes through these functions, so each statement of it is written here once.

Why the driver's cursor on SQLite. Profiled on the e2e benchmark (docs/performance.md), SQLAlchemy
was ~55% of the API's CPU per command, of which ~14 points were SQLite itself executing the
statements and the rest SQLAlchemy building, caching, compiling and running them (statement
construction, cache keys, execution contexts, result objects, ORM identity maps). The statements
below are fixed strings with named parameters — what SQLAlchemy would have sent — run on the
sqlite3 connection that the Session's transaction (or the group commit's savepoint, api/group_commit.py)
already holds, so transactions, savepoints and commit are exactly the Session's. Values are stored as
SQLAlchemy stores them there (JSON as text, booleans as 0/1), so the ORM reads the same rows.

On PostgreSQL (several writers and replicas, FOR UPDATE, the ordered event append of migration 0003)
the same functions run SQLAlchemy Core statements, prepared once at import.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson
from sqlalchemy import bindparam, update
from sqlalchemy import insert as sql_insert
from sqlalchemy import select as sa_select
from sqlmodel import Session

from api.models import Command, CommandEvent, CommandRow, Device, HistoryRow
from api.riders.models import OPEN_RIDE, Ride

_CMD = Command.__table__
_DEV = Device.__table__
COMMAND_COLUMNS: tuple[str, ...] = tuple(c.name for c in _CMD.columns)
_EVENT_COLUMNS: tuple[str, ...] = tuple(c.name for c in CommandEvent.__table__.columns if c.name != "id")

# ---- SQLite: the statements as text -------------------------------------------------------------
_Q_SELECT_COMMAND = f"SELECT {', '.join(COMMAND_COLUMNS)} FROM command WHERE id = ?"
_Q_INSERT_COMMAND = (f"INSERT INTO command ({', '.join(COMMAND_COLUMNS)}) "
                     f"VALUES ({', '.join(':' + c for c in COMMAND_COLUMNS)})")
_Q_UPDATE_STATUS = ("UPDATE command SET status = :status, reason = :reason, deadline_ms = :deadline_ms, "
                    "updated_at = :updated_at WHERE id = :id AND status = :old")
_Q_INSERT_EVENT = (f"INSERT INTO commandevent ({', '.join(_EVENT_COLUMNS)}) "
                   f"VALUES ({', '.join(':' + c for c in _EVENT_COLUMNS)})")
_Q_SELECT_REPORTED = "SELECT online, reported, last_seen FROM device WHERE id = ?"
_Q_UPDATE_REPORTED = "UPDATE device SET reported = ?, reported_at = ?, last_seen = ? WHERE id = ?"
_Q_INSERT_LOG_EVENT = "INSERT INTO event (at, kind, audience, data) VALUES (?, ?, ?, ?)"
_OPEN = tuple(str(s.value) for s in OPEN_RIDE)
_Q_OPEN_RIDE_ID = f"SELECT id FROM ride WHERE device_id = ? AND status IN ({', '.join('?' * len(_OPEN))}) LIMIT 1"

# ---- elsewhere: the same statements in Core, built once -----------------------------------------
_C_SELECT_COMMAND = sa_select(_CMD).where(_CMD.c.id == bindparam("id"))
_C_UPDATE_STATUS = (update(_CMD).where(_CMD.c.id == bindparam("c_id"), _CMD.c.status == bindparam("c_old"))
                    .values(status=bindparam("c_status"), reason=bindparam("c_reason"),
                            deadline_ms=bindparam("c_deadline_ms"), updated_at=bindparam("c_updated_at")))
_C_SELECT_REPORTED = (sa_select(_DEV.c.online, _DEV.c.reported, _DEV.c.last_seen)
                      .where(_DEV.c.id == bindparam("d_id")).with_for_update())
_C_UPDATE_REPORTED = (update(_DEV).where(_DEV.c.id == bindparam("d_id"))
                      .values(reported=bindparam("d_reported", type_=_DEV.c.reported.type),
                              reported_at=bindparam("d_now"), last_seen=bindparam("d_now")))
_RIDE = Ride.__table__
_C_OPEN_RIDE_ID = (sa_select(_RIDE.c.id).where(_RIDE.c.device_id == bindparam("r_device"),
                                               _RIDE.c.status.in_(_OPEN)).limit(1))


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


_CURSOR = "latch_sqlite_cursor"


def sqlite_cursor(s: Session) -> sqlite3.Cursor | None:
    """A cursor on the sqlite3 connection of `s`'s transaction; None on any other database or driver.
    Kept for the transaction it was made in (`Session.connection()` costs more than the statements)."""
    tx = s.get_transaction()
    cached = s.info.get(_CURSOR)
    if cached is not None and tx is not None and cached[0] is tx:
        return cached[1]
    conn = s.connection()
    # only the synchronous sqlite3 driver: under aiosqlite the DBAPI connection is an adapter whose
    # results must be awaited, so that driver takes the Core statements like PostgreSQL
    sync_sqlite = conn.dialect.name == "sqlite" and conn.dialect.driver == "pysqlite"
    cur = conn.connection.dbapi_connection.cursor() if sync_sqlite else None  # type: ignore[union-attr]
    s.info[_CURSOR] = (s.get_transaction(), cur)
    return cur


def select_command(s: Session, command_id: str) -> dict[str, Any] | None:
    """The command's row as a dict of its columns (params decoded), or None."""
    cur = sqlite_cursor(s)
    if cur is None:
        row = s.connection().execute(_C_SELECT_COMMAND, {"id": command_id}).mappings().first()
        return dict(row) if row is not None else None
    values = cur.execute(_Q_SELECT_COMMAND, (command_id,)).fetchone()
    if values is None:
        return None
    row = dict(zip(COMMAND_COLUMNS, values, strict=True))
    row["params"] = orjson.loads(row["params"])
    return row


def insert_command(s: Session, cmd: CommandRow) -> None:
    row = {c: getattr(cmd, c) for c in COMMAND_COLUMNS}
    cur = sqlite_cursor(s)
    if cur is None:
        s.connection().execute(sql_insert(_CMD), row)
        return
    row["params"] = _json(row["params"])
    cur.execute(_Q_INSERT_COMMAND, row)


def update_status(s: Session, cmd: CommandRow, old: str) -> bool:
    """The conditional state change: True when the row was still in `old` (this writer won)."""
    values = {"id": cmd.id, "old": old, "status": cmd.status, "reason": cmd.reason,
              "deadline_ms": cmd.deadline_ms, "updated_at": cmd.updated_at}
    cur = sqlite_cursor(s)
    if cur is None:
        res = s.connection().execute(_C_UPDATE_STATUS, {f"c_{k}": v for k, v in values.items()})
        return res.rowcount == 1
    return cur.execute(_Q_UPDATE_STATUS, values).rowcount == 1


def insert_history(s: Session, events: list[HistoryRow]) -> None:
    """A command's history rows in one executemany."""
    if not events:
        return
    rows = [{c: getattr(e, c) for c in _EVENT_COLUMNS} for e in events]
    cur = sqlite_cursor(s)
    if cur is None:
        s.connection().execute(sql_insert(CommandEvent.__table__), rows)
        return
    for r in rows:
        r["applied"] = int(bool(r["applied"]))
    cur.executemany(_Q_INSERT_EVENT, rows)


def select_reported(s: Session, device_id: str) -> tuple[bool, dict[str, Any], int | None] | None:
    """(online, reported, last_seen) of a device, the row locked for this transaction; None if unknown."""
    cur = sqlite_cursor(s)
    if cur is None:
        row = s.connection().execute(_C_SELECT_REPORTED, {"d_id": device_id}).first()
        return (row[0], row[1], row[2]) if row is not None else None
    row = cur.execute(_Q_SELECT_REPORTED, (device_id,)).fetchone()   # SQLite's one writer: locked already
    return (bool(row[0]), orjson.loads(row[1]), row[2]) if row is not None else None


def update_reported(s: Session, device_id: str, reported: dict[str, Any], now: int) -> None:
    cur = sqlite_cursor(s)
    if cur is None:
        s.connection().execute(_C_UPDATE_REPORTED, {"d_id": device_id, "d_reported": reported, "d_now": now})
        return
    cur.execute(_Q_UPDATE_REPORTED, (_json(reported), now, now, device_id))


def append_log_events_sqlite(s: Session, rows: list[tuple[int, str, str | None, dict[str, Any]]]) -> list[int] | None:
    """SQLite: insert event log rows (at, kind, audience, data) in order; their ids (the cursors).
    None on any other database (api/push/events.py orders them across replicas there)."""
    cur = sqlite_cursor(s)
    if cur is None:
        return None
    ids = []
    for at, kind, audience, data in rows:
        cur.execute(_Q_INSERT_LOG_EVENT, (at, kind, audience, _json(data)))
        ids.append(int(cur.lastrowid))  # type: ignore[arg-type]
    return ids


def open_ride_id(s: Session, device_id: str) -> str | None:
    """The id of the bike's open (starting or active) ride, if any. Every lock-state change asks this (to tell
    the rider holding the bike); most bikes have none, so the answer is a single indexed read, and the ORM
    loads the ride only when there is one (profiled at 14 % of the API's samples as an ORM query)."""
    cur = sqlite_cursor(s)
    if cur is None:
        return s.connection().execute(_C_OPEN_RIDE_ID, {"r_device": device_id}).scalar()
    row = cur.execute(_Q_OPEN_RIDE_ID, (device_id, *_OPEN)).fetchone()
    return row[0] if row is not None else None

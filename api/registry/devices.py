"""The device registry: registration, credentials, presence and reported state.

Command keys are stored sealed (api/registry/keyseal.py). The registry seals them when it writes them and opens
them as a Device row is loaded (an ORM load/refresh hook on the registry's engines), so code that reads
`device.command_key` in a unit of work (api/commands/service.py signing, api/commands/ingest.py time replies) gets the
key in hex, as before, and the database never holds it in the clear. Only this module writes the column.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, delete, select

from api.clock import now_ms, to_datetime
from api.commands import sql as command_sql
from api.db import Database, Priority
from api.hooks import NO_HOOKS, ChangeHooks
from api.models import Device, DeviceCreate, DeviceCredentials, DevicePatch, DevicePublic, DeviceTag
from api.registry import keyseal
from broker.identity import hash_secret, new_secret

log = logging.getLogger("latch.devices")

REGISTERED, ROTATED, REVOKED = "registered", "rotated", "revoked"   # what DeviceRegistry.after_change is told


class DeviceExists(Exception):
    pass


def public(d: Device, tags: list[str] | None = None) -> DevicePublic:
    """`tags`: the device's tags (DeviceRegistry.tags_of); they live in their own table."""
    return DevicePublic(
        id=d.id, name=d.name, online=d.online, last_seen=to_datetime(d.last_seen), reported=d.reported,
        reported_at=to_datetime(d.reported_at), created_at=to_datetime(d.created_at), revoked=d.revoked,
        zone=d.zone, tags=sorted(tags or []),
    )


def _credentials(d: Device, secret: str, command_key: str, tags: list[str] | None = None) -> DeviceCredentials:
    return DeviceCredentials(**public(d, tags).model_dump(), mqtt_username=d.id, mqtt_password=secret,
                             mqtt_client_id=d.id, command_key=command_key)


_SEALS: WeakKeyDictionary[Engine, keyseal.KeySeal] = WeakKeyDictionary()   # engine -> its database's seal


@event.listens_for(Device, "load")
def _open_key(device: Device, context) -> None:  # type: ignore[no-untyped-def]
    _open_loaded(device, context.session)


@event.listens_for(Device, "refresh")
def _open_key_again(device: Device, context, attrs) -> None:  # type: ignore[no-untyped-def]
    if attrs is None or "command_key" in attrs:
        _open_loaded(device, context.session)


def _open_loaded(device: Device, session) -> None:  # type: ignore[no-untyped-def]
    stored = device.__dict__.get("command_key")
    # the engine, also for a Session bound to a connection (a unit of a group commit: api/group_commit.py)
    seal = _SEALS.get(session.get_bind().engine) if stored else None
    if seal is not None:   # set as the loaded value: the row is not dirtied, nothing is written back
        set_committed_value(device, "command_key", seal.open(device.id, stored))


TAG_QUERY_CHUNK = 500   # ids per IN (...) list: well under SQLite's bound-parameter limit


def tags_of(s: Session, device_ids: list[str]) -> dict[str, list[str]]:
    """Every listed device's tags (sorted), in one query per TAG_QUERY_CHUNK ids."""
    out: dict[str, list[str]] = {d: [] for d in device_ids}
    for i in range(0, len(device_ids), TAG_QUERY_CHUNK):
        chunk = device_ids[i:i + TAG_QUERY_CHUNK]
        for device_id, tag in s.exec(select(DeviceTag.device_id, DeviceTag.tag)
                                     .where(col(DeviceTag.device_id).in_(chunk)).order_by(col(DeviceTag.tag))):
            out[device_id].append(tag)
    return out


class DeviceRegistry:
    def __init__(self, db: Database, hooks: ChangeHooks = NO_HOOKS) -> None:
        """`hooks`: run inside each device change's transaction (the event log: api/hooks.py)."""
        self.db = db
        self.seal = keyseal.for_url(db.url)
        _SEALS[db.engine] = self.seal
        if db.async_engine is not None:
            _SEALS[db.async_engine.sync_engine] = self.seal
        self.hooks = hooks
        # awaited after a registration, rotation or revocation has committed, with the device id and
        # REGISTERED / ROTATED / REVOKED (e.g. to rewrite an external Mosquitto's password file); a
        # failing callback is logged, never raised
        self.after_change: list[Callable[[str, str], Awaitable[None]]] = []
        # What a command needs of its device (online, revoked, command key), kept in memory where this
        # process is the registry's only writer (SQLite: one API process; `latch broker` only reads it).
        # Profiled, the read per command was ~10 % of the API's samples: a trip to a database thread and
        # back. Every write of those fields here drops the entry before and after it commits, and a read
        # that overlapped a write is not kept (the generation moved), so a stale entry cannot outlive a
        # change. PostgreSQL (several replicas write presence): always read.
        self._for_command: dict[str, Device] | None = None if db.is_postgres else {}
        self._generation = 0

    async def _changed(self, device_id: str, change: str) -> None:
        for callback in self.after_change:
            try:
                await callback(device_id, change)
            except Exception:  # noqa: BLE001 — the change is committed; the callback's failure is its own
                log.exception("after-change callback for device %s failed", device_id)

    async def register(self, body: DeviceCreate) -> DeviceCredentials:
        secret, key = new_secret(), secrets.token_hex(32)
        device = Device(id=body.id, name=body.name, secret_hash=hash_secret(secret),
                        command_key=self.seal.seal(body.id, key), created_at=now_ms(), zone=body.zone)

        def insert(s: Session) -> None:
            s.add(device)
            s.add_all([DeviceTag(device_id=body.id, tag=t) for t in body.tags])   # same transaction
            try:
                s.commit()
            except IntegrityError as e:
                raise DeviceExists(body.id) from e

        self._forget(device.id)
        try:
            await self.db.write(insert)
        finally:
            self._forget(device.id)
        await self._changed(device.id, REGISTERED)
        return _credentials(device, secret, key, body.tags)

    async def rotate(self, device_id: str) -> DeviceCredentials | None:
        """New MQTT secret and command key; the old ones stop working at once."""
        secret, key = new_secret(), secrets.token_hex(32)

        def rotate(s: Session) -> Device | None:
            device = s.get(Device, device_id)
            if device is None:
                return None
            device.secret_hash = hash_secret(secret)
            device.command_key = self.seal.seal(device_id, key)
            device.revoked = False
            s.add(device)
            s.commit()
            return device

        self._forget(device_id)
        try:
            device = await self.db.write(rotate)
        finally:
            self._forget(device_id)
        if device is None:
            return None
        await self._changed(device_id, ROTATED)
        return _credentials(device, secret, key, (await self.tags_of([device_id]))[device_id])

    async def seal_plain_keys(self) -> int:
        """Seal every command key an earlier Latch stored in plain hex (in place: the locks keep their keys);
        how many were sealed. Plain SQL, so no ORM hook is involved."""
        def seal_all(s: Session) -> int:
            conn = s.connection()
            rows = conn.execute(text("SELECT id, command_key FROM device")).all()
            n = 0
            for device_id, stored in rows:
                if keyseal.is_plain(stored):
                    conn.execute(text("UPDATE device SET command_key = :k WHERE id = :id AND command_key = :old"),
                                 {"k": self.seal.seal(device_id, stored.lower()), "id": device_id, "old": stored})
                    n += 1
            s.commit()
            return n

        n = await self.db.write(seal_all)
        if n:
            log.info("sealed %d command key(s) stored in plain text by an earlier Latch", n)
        return n

    async def revoke(self, device_id: str) -> Device | None:
        """Refuse the device's credentials from now on (rotating them lets it back in); None if unknown."""

        def revoke(s: Session) -> Device | None:
            device = s.get(Device, device_id)
            if device is None:
                return None
            device.revoked = True
            s.add(device)
            s.commit()
            return device

        self._forget(device_id)
        try:
            device = await self.db.write(revoke)
        finally:
            self._forget(device_id)
        if device is not None:
            await self._changed(device_id, REVOKED)
        return device

    async def get(self, device_id: str) -> Device | None:
        return await self.db.read(lambda s: s.get(Device, device_id))

    MAX_KEPT_FOR_COMMANDS = 50_000

    async def get_for_command(self, device_id: str) -> Device | None:
        """The device as a command needs it: `id`, `online`, `revoked`, `command_key` are current; its
        other fields (reported state, last_seen) may be older. In memory where that is safe (see __init__)."""
        kept = self._for_command
        if kept is None:
            return await self.get(device_id)
        device = kept.get(device_id)
        if device is not None:
            return device
        generation = self._generation
        device = await self.get(device_id)
        if device is not None and generation == self._generation:   # no write of a device meanwhile
            self._keep(device)
        return device

    def _keep(self, device: Device) -> None:
        kept = self._for_command
        if kept is None:
            return
        if device.id not in kept and len(kept) >= self.MAX_KEPT_FOR_COMMANDS:
            kept.pop(next(iter(kept)))
        kept[device.id] = device

    def _forget(self, device_id: str) -> None:
        self._generation += 1
        if self._for_command is not None:
            self._for_command.pop(device_id, None)

    async def tags_of(self, device_ids: list[str]) -> dict[str, list[str]]:
        return await self.db.read(lambda s: tags_of(s, device_ids))

    async def patch(self, device_id: str, body: DevicePatch) -> tuple[Device, list[str]] | None:
        """Set the zone and/or replace the tags (only the fields sent); None when there is no such device."""
        fields = body.model_fields_set

        def patch(s: Session) -> tuple[Device, list[str]] | None:
            device = s.get(Device, device_id, with_for_update=True)
            if device is None:
                return None
            if "zone" in fields:
                device.zone = body.zone
                s.add(device)
            if "tags" in fields:
                s.exec(delete(DeviceTag).where(col(DeviceTag.device_id) == device_id))  # type: ignore[call-overload]
                s.add_all([DeviceTag(device_id=device_id, tag=t) for t in body.tags or []])
            s.commit()
            return device, tags_of(s, [device_id])[device_id]

        return await self.db.write(patch)

    async def list(self, limit: int, offset: int) -> list[Device]:
        return await self.db.read(
            lambda s: list(s.exec(select(Device).order_by(Device.id).offset(offset).limit(limit)).all()))

    async def set_presence(self, device_id: str, online: bool) -> Device | None:
        """Record presence; returns the device, or None when it is not in the registry."""
        now = now_ms()

        def mark(s: Session) -> Device | None:
            device = s.get(Device, device_id, with_for_update=True)   # replicas hear the same presence
            if device is None:
                return None
            was_online = device.online
            device.online = online
            device.last_seen = now
            self.hooks.device_changed(s, device, was_online, device.reported)
            s.add(device)
            s.commit()
            return device

        self._forget(device_id)
        device: Device | None = None
        try:
            device = await self.db.write(mark, Priority.REPORT)
            return device
        finally:
            self._forget(device_id)
            if device is not None:   # as committed: kept for the commands that follow (every lock that
                self._keep(device)   # comes online is, so the command path seldom reads)

    async def merge_reported(self, device_id: str, fields: dict[str, Any]) -> bool:
        now = now_ms()
        return await self.db.write(lambda s: merge_reported(s, device_id, fields, now, self.hooks), Priority.REPORT)


LAST_SEEN_RESOLUTION_MS = 5_000

def merge_reported(s: Session, device_id: str, fields: dict[str, Any], now: int,
                   hooks: ChangeHooks = NO_HOOKS) -> bool:
    """Merge reported state into the device's record (commits); False for an unknown device.

    The row is locked (FOR UPDATE on PostgreSQL) so replicas that all hear the same report compare it
    against what the previous one wrote, and only one of them records the change."""
    row = command_sql.select_reported(s, device_id)   # a read and an UPDATE, not the ORM's load and flush
    if row is None:
        s.commit()
        return False
    online, before, last_seen = row
    merged = {**before, **fields}
    if merged == before and last_seen is not None and now - last_seen < LAST_SEEN_RESOLUTION_MS:
        # a repeat of what we know (a lock reports its state in the ack and again, retained, right
        # after): not worth a write; last_seen is kept to this resolution
        s.commit()
        return True
    command_sql.update_reported(s, device_id, merged, now)
    hooks.device_changed(s, Device(id=device_id, online=online, reported=merged, secret_hash="", command_key="",
                                   created_at=0), online, before)
    s.commit()
    return True

"""The device registry: registration, credentials, presence and reported state."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api.clock import now_ms, to_datetime
from api.db import Database
from api.models import Device, DeviceCreate, DeviceCredentials, DevicePublic
from broker.identity import hash_secret, new_secret


class DeviceExists(Exception):
    pass


def public(d: Device) -> DevicePublic:
    return DevicePublic(
        id=d.id, name=d.name, online=d.online, last_seen=to_datetime(d.last_seen), reported=d.reported,
        reported_at=to_datetime(d.reported_at), created_at=to_datetime(d.created_at), revoked=d.revoked,
    )


def _credentials(d: Device, secret: str) -> DeviceCredentials:
    return DeviceCredentials(**public(d).model_dump(), mqtt_username=d.id, mqtt_password=secret,
                             mqtt_client_id=d.id, command_key=d.command_key)


class DeviceRegistry:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def register(self, body: DeviceCreate) -> DeviceCredentials:
        secret = new_secret()
        device = Device(id=body.id, name=body.name, secret_hash=hash_secret(secret),
                        command_key=secrets.token_hex(32), created_at=now_ms())
        async with self.db.session() as s:
            s.add(device)
            try:
                await s.commit()
            except IntegrityError as e:
                raise DeviceExists(body.id) from e
        return _credentials(device, secret)

    async def rotate(self, device_id: str) -> DeviceCredentials | None:
        """New MQTT secret and command key; the old ones stop working at once."""
        secret = new_secret()
        async with self.db.session() as s:
            device = await s.get(Device, device_id)
            if device is None:
                return None
            device.secret_hash = hash_secret(secret)
            device.command_key = secrets.token_hex(32)
            device.revoked = False
            s.add(device)
            await s.commit()
            return _credentials(device, secret)

    async def get(self, device_id: str) -> Device | None:
        async with self.db.session() as s:
            return await s.get(Device, device_id)

    async def list(self, limit: int, offset: int) -> list[Device]:
        async with self.db.session() as s:
            rows = await s.exec(select(Device).order_by(Device.id).offset(offset).limit(limit))
            return list(rows.all())

    async def set_presence(self, device_id: str, online: bool) -> bool:
        """Record presence; True when the device was known."""
        now = now_ms()
        async with self.db.session() as s:
            res = await s.exec(update(Device).where(Device.id == device_id)
                                  .values(online=online, last_seen=now))
            await s.commit()
            return res.rowcount == 1

    async def merge_reported(self, device_id: str, fields: dict[str, Any]) -> bool:
        now = now_ms()
        async with self.db.session() as s:
            device = await s.get(Device, device_id)
            if device is None:
                return False
            device.reported = {**device.reported, **fields}
            device.reported_at = now
            device.last_seen = now
            s.add(device)
            await s.commit()
            return True

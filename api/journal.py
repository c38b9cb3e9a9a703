"""Turns every change into events, in the transaction of the change (the ChangeHooks of api/hooks.py).

    command status change  → "command" (to its owner), and an unlock that settles moves its ride
    presence change        → "presence"     ┐ to the rider holding the bike, if any
    lock sensor change     → "lock_state"   │ (operators see everything); a lock reporting
    battery below the mark → "low_battery"  ┘ "locked" during an active ride ends the ride
    ride change            → "ride" (to its rider)
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from api.clock import now_ms
from api.commands.states import Status, is_final
from api.models import CommandRow, Device, HistoryRow
from api.push import event_models as ek
from api.push.events import EventLog
from api.riders.models import RideStatus
from api.riders.rides import move, open_ride_for_device, ride_data, settle_unlock
from api.rights import audience_of_owner
from foundation.settings import Settings


class Journal:
    def __init__(self, events: EventLog, settings: Settings) -> None:
        self.events = events
        self.low_battery_pct = settings.low_battery_pct

    def command_changed(self, s: Session, cmd: CommandRow, history: list[HistoryRow]) -> None:
        audience = audience_of_owner(cmd.owner)
        for h in history:
            if not h.applied or h.to_status is None:
                continue
            status = Status(h.to_status)
            self.events.append(s, ek.COMMAND, {
                "command_id": cmd.id, "device_id": cmd.device_id, "action": cmd.action, "status": status.value,
                "final": is_final(status), "reason": cmd.reason if status == cmd.status else None,
                "event": str(h.event), "created_at": cmd.created_at,
            }, audience, at=h.at)
        # a ride's unlock is its rider's command: an operator's or a fleet's unlock has no ride to settle
        if cmd.action == "unlock" and audience is not None and is_final(Status(cmd.status)):
            ride = settle_unlock(s, cmd, now_ms())
            if ride is not None:
                self.events.append(s, ek.RIDE, ride_data(ride), ride.user_id)

    def device_changed(self, s: Session, device: Device, was_online: bool, reported_before: dict[str, Any]) -> None:
        found: list[tuple[str, dict[str, Any]]] = []
        if device.online != was_online:
            found.append((ek.PRESENCE, {"device_id": device.id, "online": device.online}))
        locked_before, locked = reported_before.get("locked"), device.reported.get("locked")
        if locked is not None and locked != locked_before:
            found.append((ek.LOCK_STATE, {"device_id": device.id, "locked": locked}))
        battery_before, battery = reported_before.get("battery"), device.reported.get("battery")
        if (isinstance(battery, int) and battery < self.low_battery_pct
                and not (isinstance(battery_before, int) and battery_before < self.low_battery_pct)):
            found.append((ek.LOW_BATTERY, {"device_id": device.id, "battery": battery}))
        if not found:
            return
        ride = open_ride_for_device(s, device.id)
        audience = ride.user_id if ride is not None else None
        for kind, data in found:
            self.events.append(s, kind, data, audience)
        if ride is not None and locked is True and locked_before is False and ride.status == RideStatus.ACTIVE:
            s.expunge(ride)
            if move(s, ride, (RideStatus.ACTIVE,), RideStatus.ENDED, "the bike was locked", now_ms()):
                self.events.append(s, ek.RIDE, ride_data(ride), ride.user_id)

"""The API's live parts, built once at start-up and shared by every request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.admission import Admission
from api.commands.ingest import Ingest
from api.commands.service import CommandService
from api.commands.sweeper import Sweeper
from api.commands.waiters import Waiters
from api.db import Database
from api.fleet.service import FleetService
from api.link import BrokerLink
from api.metrics import Metrics
from api.push.events import EventLog
from api.registry.devices import DeviceRegistry
from api.riders.rides import RideService
from api.riders.users import UserService
from api.rights import Rights
from foundation.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    db: Database
    registry: DeviceRegistry
    commands: CommandService
    ingest: Ingest
    link: BrokerLink
    sweeper: Sweeper
    metrics: Metrics
    waiters: Waiters
    events: EventLog
    rides: RideService
    rights: Rights
    users: UserService
    fleet: FleetService          # fleet commands and their rollout worker (api/fleet/service.py)
    admission: Admission         # refuses new commands at once while this process is overloaded
    # api/notifications/service.py NotificationService (Any: it imports this module's peers)
    notifications: Any = None

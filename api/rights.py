"""What a caller may do: riders command only a bike they hold, see only their own things; rate limits.

Every refusal is a Refused(status, reason): 403 (not yours / not allowed), 404, 409 (state), 429
(too fast, with Retry-After). Operators (and the admin token) may do everything; only user accounts
are rate limited (the admin token is the automation and benchmark identity).
"""

from __future__ import annotations

import math

from fastapi import HTTPException
from sqlmodel import Session, col, select

from api.auth import ADMIN_NAME, Principal
from api.db import Database
from api.models import Command
from api.ratelimit import RateLimiter
from api.rider_models import OPEN_RIDE, Ride
from foundation.settings import Settings

RIDER_ACTIONS = ("unlock", "lock", "locate")


class Refused(Exception):
    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers

    def http(self) -> HTTPException:
        return HTTPException(self.status, self.reason, headers=self.headers)


def audience_of_owner(owner: str) -> str | None:
    """Who besides operators sees a command: its owner, when the owner is a user (not the operator
    token, not a fleet command's "fleet:<id>": those are operators' business only)."""
    return None if owner == ADMIN_NAME or owner.startswith("fleet:") else owner


class Rights:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.limiter = RateLimiter(settings.command_rate_per_s, settings.command_burst)

    def check_rate(self, who: Principal) -> None:
        if who.user_id is None:
            return
        wait = self.limiter.take(who.user_id)
        if wait:
            retry = max(1, math.ceil(wait))
            raise Refused(429, f"too many commands: at most {self.limiter.burst} at once and "
                               f"{self.limiter.rate:g} per second per user; retry in {retry}s",
                          {"Retry-After": str(retry)})

    async def check_command(self, who: Principal, device_id: str, action: str) -> None:
        """May `who` send `action` to `device_id` now? Rate limit first, then rights."""
        self.check_rate(who)
        if who.is_operator:
            return
        if action not in RIDER_ACTIONS:
            raise Refused(403, f"riders may {', '.join(RIDER_ACTIONS)} a bike they hold; {action!r} is for operators")

        def holder(s: Session) -> str | None:
            return s.exec(select(Ride.user_id).where(Ride.device_id == device_id,
                                                     col(Ride.status).in_(OPEN_RIDE))).first()

        if await self.db.read(holder) != who.user_id:
            raise Refused(403, f"you do not hold {device_id}: start a ride on it first (POST /v1/rides)")

    @staticmethod
    def check_sees_command(who: Principal, cmd: Command) -> None:
        if not who.sees(audience_of_owner(cmd.owner)):
            raise Refused(403, f"command {cmd.id} is not yours")

"""What a caller may do: riders command only a bike they hold, see only their own things; rate limits.

Every refusal is one of api/errors.py's: Forbidden (not yours / not allowed), NotFound, Conflict (state),
RateLimited (too fast, with Retry-After); create_app answers them (api/errors.py install). Operators (and the
admin token) may do everything; only user accounts are rate limited (the admin token is the automation and
benchmark identity). Nothing here knows HTTP.
"""

from __future__ import annotations

import math

from sqlmodel import Session, col, select

from api.auth import ADMIN_NAME, Principal
from api.db import Database
from api.errors import Forbidden, RateLimited
from api.models import Command
from api.ratelimit import RateLimiter
from api.riders.models import OPEN_RIDE, Ride
from foundation.settings import Settings

RIDER_ACTIONS = ("unlock", "lock", "locate")


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
            raise RateLimited(f"too many commands: at most {self.limiter.burst} at once and "
                              f"{self.limiter.rate:g} per second per user; retry in {retry}s", retry)

    async def check_command(self, who: Principal, device_id: str, action: str) -> None:
        """May `who` send `action` to `device_id` now? Rate limit first, then rights."""
        self.check_rate(who)
        if who.is_operator:
            return
        if action not in RIDER_ACTIONS:
            raise Forbidden(f"riders may {', '.join(RIDER_ACTIONS)} a bike they hold; {action!r} is for operators")

        def holder(s: Session) -> str | None:
            return s.exec(select(Ride.user_id).where(Ride.device_id == device_id,
                                                     col(Ride.status).in_(OPEN_RIDE))).first()

        if await self.db.read(holder) != who.user_id:
            raise Forbidden(f"you do not hold {device_id}: start a ride on it first (POST /v1/rides)")

    @staticmethod
    def check_sees_command(who: Principal, cmd: Command) -> None:
        if not who.sees(audience_of_owner(cmd.owner)):
            raise Forbidden(f"command {cmd.id} is not yours")

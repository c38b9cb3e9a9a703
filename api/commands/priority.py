"""Which writes go first when the database is busy (api/db.py Priority).

A rider standing at a bike is waiting on unlock and lock; a device's answer is someone's wait ending.
Those go first. Other single commands come next; fleet rollouts (api/fleet/service.py) last, so a
10,000-device rollout never holds an unlock behind its queue.
"""

from __future__ import annotations

from api.db import Priority

INTERACTIVE_ACTIONS = frozenset({"unlock", "lock"})


def action_priority(action: str) -> int:
    return Priority.INTERACTIVE if action in INTERACTIVE_ACTIONS else Priority.ROUTINE

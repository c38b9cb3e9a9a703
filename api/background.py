"""Background loops (rollouts, the sweeper, notification ticks): telling a stop from a failure.

Each loop catches a failing round, logs it and tries again. When its task is cancelled while a database
query is in flight, the driver can turn the CancelledError into another error on its way out (seen with
asyncpg: the rollback after the cancelled query raised PendingRollbackError), which such a loop would log
and retry — and whoever cancelled it (stop()) would wait forever. `reraise_if_stopping()` in the except
clause turns it back into the cancellation it was.
"""

from __future__ import annotations

import asyncio


def reraise_if_stopping() -> None:
    """Raise CancelledError when the running task has been asked to stop (call in an `except` clause)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from None

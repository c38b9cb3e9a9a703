"""The command state machine: one literal table and one advance() function.

    queued --dispatch--> sent --device_received--> received --device_succeeded--> succeeded
      |                   |                          |------device_failed------> failed
      |                   |                          |------device_rejected----> rejected
      |                   |                          '------timeout-----------> timed_out
      |                   |--publish_failed--> failed   (the broker link could not take it)
      |                   '--(any device outcome, timeout: as from received)
      |--device_offline--> failed      (fail-fast actions such as unlock)
      |--expire----------> expired     (never delivered before its expiry)
      '--cancel----------> cancelled   (only while nothing was sent)

A pair that is not in the table does not move the command: the event is
recorded in the history as not applied. That is how a duplicate or late
device answer is handled — it never moves a final state.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    RECEIVED = "received"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class Event(StrEnum):
    DISPATCH = "dispatch"
    DEVICE_RECEIVED = "device_received"
    DEVICE_SUCCEEDED = "device_succeeded"
    DEVICE_FAILED = "device_failed"
    DEVICE_REJECTED = "device_rejected"
    DEVICE_OFFLINE = "device_offline"
    PUBLISH_FAILED = "publish_failed"
    EXPIRE = "expire"
    TIMEOUT = "timeout"
    CANCEL = "cancel"


FINAL: frozenset[Status] = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.REJECTED, Status.EXPIRED, Status.TIMED_OUT, Status.CANCELLED}
)

S, E = Status, Event
TRANSITIONS: dict[tuple[Status, Event], Status] = {
    (S.QUEUED, E.DISPATCH): S.SENT,
    (S.QUEUED, E.DEVICE_RECEIVED): S.RECEIVED,
    (S.QUEUED, E.DEVICE_SUCCEEDED): S.SUCCEEDED,
    (S.QUEUED, E.DEVICE_FAILED): S.FAILED,
    (S.QUEUED, E.DEVICE_REJECTED): S.REJECTED,
    (S.QUEUED, E.DEVICE_OFFLINE): S.FAILED,
    (S.QUEUED, E.EXPIRE): S.EXPIRED,
    (S.QUEUED, E.CANCEL): S.CANCELLED,
    (S.SENT, E.DEVICE_RECEIVED): S.RECEIVED,
    (S.SENT, E.DEVICE_SUCCEEDED): S.SUCCEEDED,
    (S.SENT, E.DEVICE_FAILED): S.FAILED,
    (S.SENT, E.DEVICE_REJECTED): S.REJECTED,
    (S.SENT, E.TIMEOUT): S.TIMED_OUT,
    (S.SENT, E.PUBLISH_FAILED): S.FAILED,
    (S.RECEIVED, E.DEVICE_SUCCEEDED): S.SUCCEEDED,
    (S.RECEIVED, E.DEVICE_FAILED): S.FAILED,
    (S.RECEIVED, E.DEVICE_REJECTED): S.REJECTED,
    (S.RECEIVED, E.TIMEOUT): S.TIMED_OUT,
}
del S, E


def advance(status: Status, event: Event) -> Status | None:
    """The status after `event`, or None when the event does not apply (record it, change nothing)."""
    return TRANSITIONS.get((status, event))


def is_final(status: Status) -> bool:
    return status in FINAL

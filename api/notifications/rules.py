"""Per-rider delivery rules as pure functions of a rider's preferences and a moment (no I/O).

    opted_out(prefs, category)  transactional is never opted out of
    in_quiet(prefs, at_ms)      inside the rider's quiet hours, in the rider's time zone
    day_of(prefs, at_ms)        the rider's local calendar day (the frequency cap counts per day)

The fan-out (fanout.py) evaluates them at the moment a notification takes its place in the event
stream (the position's `at`), never at the moment a rider happens to read it, so a rider who reads
the stream again, or later, gets the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

from api.notifications.models import Category, NotificationPref, zone


@dataclass(frozen=True, slots=True)
class RiderPrefs:
    opt_out: frozenset[str] = field(default_factory=frozenset)
    quiet: tuple[int, int] | None = None   # (start, end) in seconds after local midnight
    tz: str = "UTC"

    @classmethod
    def from_row(cls, row: NotificationPref) -> "RiderPrefs":
        quiet = None
        if row.quiet_start_s is not None and row.quiet_end_s is not None and row.quiet_start_s != row.quiet_end_s:
            quiet = (row.quiet_start_s, row.quiet_end_s)
        return cls(frozenset(row.opt_out), quiet, row.timezone)


DEFAULT = RiderPrefs()


def _local(prefs: RiderPrefs, at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms / 1000, tz=zone(prefs.tz))


def opted_out(prefs: RiderPrefs, category: str) -> bool:
    return category != Category.TRANSACTIONAL and category in prefs.opt_out


def in_quiet(prefs: RiderPrefs, at_ms: int) -> bool:
    if prefs.quiet is None:
        return False
    t = _local(prefs, at_ms)
    x = t.hour * 3600 + t.minute * 60 + t.second
    start, end = prefs.quiet
    return start <= x < end if start < end else (x >= start or x < end)


def day_of(prefs: RiderPrefs, at_ms: int) -> date:
    return _local(prefs, at_ms).date()

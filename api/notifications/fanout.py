"""Who sees which position of a notification in the event stream, decided per rider when it is offered.

A notification takes one or more *positions* in the event log: the event written when it was sent,
and, for marketing held by quiet hours, a release event written when some held rider's quiet hours
ended (service.py). Each position has an id (the cursor) and a moment (`at`). For a rider R and the
k-th position of notification N the outcome is a pure function of N, R's preferences and the
positions before it (memoised per rider):

    not_audience  R is not in N's audience                              → nothing, not counted
    opted_out     R opted out of N's category (never transactional)     → held (counted)
    already       an earlier position of N was not held by quiet hours  → nothing: each rider at most once
    quiet_hours   marketing and `at` is inside R's quiet hours          → held; a later release may deliver it
    capped        R was already delivered the day's cap of N's category → held (counted)
                  (the day is R's local day of `at`; the count is of outcomes "deliver" before this id)
    deliver       → handed over, unless N's TTL has passed at this moment: then "expired" (counted)

Because nothing depends on when a rider reads, reading the stream again from the same cursor gives
the same events, and the cursor alone decides what is new: a rider offline when N was sent gets it
on reconnect while its TTL lasts, exactly once, and never after.

Counts (`delivered`, `mqtt_published`, held by each rule, `expired`) are of distinct riders per
process: each outcome is counted the first time this process hands it to (or withholds it from) a
rider, kept in memory and flushed to the notification row by service.py. `delivered` means handed to
one of the rider's open connections (SSE, WebSocket, a poll's answer); `mqtt_published` means
published to the rider's MQTT topic (the broker delivers it if the rider's app is subscribed or has
a persistent session: the API cannot know which).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Container
from typing import Any

from api.clock import now_ms
from api.notifications.models import Category
from api.notifications.rules import DEFAULT, RiderPrefs, day_of, in_quiet, opted_out
from api.push.events import LiveEvent

NOT_AUDIENCE = "not_audience"
OPTED_OUT = "opted_out"
ALREADY = "already"
QUIET = "quiet_hours"
CAPPED = "capped"
DELIVER = "deliver"
EXPIRED = "expired"
DELIVERED = "delivered"
MQTT = "mqtt_published"
COLUMNS = {DELIVERED: "delivered", MQTT: "mqtt_published", OPTED_OUT: "held_opted_out",
           QUIET: "held_quiet_hours", CAPPED: "held_capped", EXPIRED: "expired"}
RELEASE_RETRY_TICKS = 10


class Item:
    """One notification as the fan-out knows it (built from its event's data)."""

    __slots__ = ("id", "category", "sent_at", "expires_at", "members", "public", "positions", "views",
                 "counted", "pending", "flushing", "release_asked")

    def __init__(self, data: dict[str, Any]) -> None:
        self.id: str = data["notification_id"]
        self.category: str = data["category"]
        self.sent_at: int = int(data["sent_at"])
        self.expires_at: int = int(data["expires_at"])
        audience = data.get("audience") or {}
        members = audience.get("users") if "users" in audience else audience.get("riding")
        self.members: frozenset[str] | None = None if audience.get("all") else frozenset(members or ())
        # what a rider receives: the audience (other riders' ids) is operators' business
        self.public = {k: v for k, v in data.items() if k not in ("audience", "release")}
        self.positions: list[tuple[int, int]] = []   # (event id, at), by id
        self.views: dict[int, LiveEvent] = {}
        # outcome -> riders counted by this process, a bit per rider (Fanout.index): 1.25 KiB per 10,000
        # riders per outcome, not a set of ids (~50 bytes a rider) kept for every notification
        self.counted: dict[str, bytearray] = {}
        self.pending: dict[str, int] = defaultdict(int)        # counted since the last flush
        self.flushing: dict[str, int] = {}                     # taken by a flush still being written
        self.release_asked = 0   # ticks since a release was asked for and not yet seen (0: none asked)

    def includes(self, user_id: str) -> bool:
        return self.members is None or user_id in self.members

    def add_position(self, event_id: int, at: int) -> int:
        i = bisect.bisect_left(self.positions, (event_id, -1))
        if i == len(self.positions) or self.positions[i][0] != event_id:
            self.positions.insert(i, (event_id, at))
            self.release_asked = 0
        return i

    def view(self, ev: LiveEvent) -> LiveEvent:
        """The rider's copy of position `ev`: one object per position, encoded once for every rider."""
        v = self.views.get(ev.id)
        if v is None:
            v = self.views[ev.id] = LiveEvent(ev.id, ev.kind, ev.at, None, self.public, ev.local)
        return v


class Fanout:
    def __init__(self, caps: dict[str, int], clock: Callable[[], int] = now_ms) -> None:
        self.caps = caps
        self.clock = clock
        self.items: dict[str, Item] = {}
        self.prefs: dict[str, RiderPrefs] = {}
        self._memo: dict[str, dict[int, str]] = {}   # rider -> event id -> outcome
        self.index: dict[str, int] = {}              # rider -> a small number, their bit in Item.counted

    # ---- what is known ---------------------------------------------------------------
    def observe(self, event_id: int, at: int, data: dict[str, Any]) -> tuple[Item, int] | None:
        """Register a position (from a published event, a backlog row or the start-up load)."""
        nid = data.get("notification_id")
        if not isinstance(nid, str):
            return None
        item = self.items.get(nid)
        if item is None:
            try:
                item = self.items[nid] = Item(data)
            except (KeyError, TypeError, ValueError):
                return None
        return item, item.add_position(event_id, at)

    def set_prefs(self, user_id: str, prefs: RiderPrefs) -> None:
        if self.prefs.get(user_id, DEFAULT) != prefs:
            self.prefs[user_id] = prefs
            self._memo.pop(user_id, None)   # outcomes depend on them

    def forget_before(self, at_ms: int) -> None:
        """Drop notifications sent before `at_ms` and expired (kept a day and more for the cap)."""
        old = [nid for nid, it in self.items.items() if it.sent_at < at_ms and it.expires_at < self.clock()
               and not any(it.pending.values()) and not it.flushing]
        for nid in old:
            ids = {eid for eid, _ in self.items.pop(nid).positions}
            for memo in self._memo.values():
                for eid in ids:
                    memo.pop(eid, None)

    # ---- the rules -------------------------------------------------------------------
    def outcome(self, item: Item, k: int, user_id: str) -> str:
        event_id, at = item.positions[k]
        memo = self._memo.setdefault(user_id, {})
        out = memo.get(event_id)
        if out is None:
            out = memo[event_id] = self._decide(item, k, user_id)
        return out

    def _decide(self, item: Item, k: int, user_id: str) -> str:
        if not item.includes(user_id):
            return NOT_AUDIENCE
        prefs = self.prefs.get(user_id, DEFAULT)
        if opted_out(prefs, item.category):
            return OPTED_OUT
        if any(self.outcome(item, j, user_id) != QUIET for j in range(k)):
            return ALREADY
        event_id, at = item.positions[k]
        if item.category == Category.MARKETING and in_quiet(prefs, at):
            return QUIET
        if self._capped(item, event_id, at, user_id, prefs):
            return CAPPED
        return DELIVER

    def _capped(self, item: Item, event_id: int, at: int, user_id: str, prefs: RiderPrefs) -> bool:
        cap = self.caps.get(item.category, 0)
        if cap <= 0:
            return False
        day, n = day_of(prefs, at), 0
        for other in self.items.values():
            if other.category != item.category:
                continue
            for j, (oid, oat) in enumerate(other.positions):
                if oid >= event_id:
                    break
                if day_of(prefs, oat) == day and self.outcome(other, j, user_id) == DELIVER:
                    n += 1
                    if n >= cap:
                        return True
        return False

    # ---- handing over ----------------------------------------------------------------
    def offer(self, ev: LiveEvent, user_id: str, via: str = DELIVERED) -> LiveEvent | None:
        """The rider's copy of this position, or None (not theirs, held, expired); counts the outcome."""
        found = self.observe(ev.id, ev.at, ev.data)
        if found is None:
            return None
        item, k = found
        out = self.outcome(item, k, user_id)
        if out in (NOT_AUDIENCE, ALREADY):
            return None
        if out == DELIVER:
            if self.clock() >= item.expires_at:
                self._count(item, EXPIRED, user_id)
                return None
            self._count(item, via, user_id)
            return item.view(ev)
        self._count(item, out, user_id)
        return None

    def _bit(self, user_id: str) -> int:
        i = self.index.get(user_id)
        if i is None:
            i = self.index[user_id] = len(self.index)
        return i

    def _count(self, item: Item, what: str, user_id: str) -> None:
        i = self._bit(user_id)
        bits = item.counted.get(what)
        if bits is None:
            bits = item.counted[what] = bytearray()
        byte, mask = i >> 3, 1 << (i & 7)
        if byte >= len(bits):
            bits.extend(bytes(byte + 1 - len(bits) + 64))
        if not bits[byte] & mask:
            bits[byte] |= mask
            item.pending[what] += 1

    # ---- the same decision for everyone at once ---------------------------------------------------
    def plan(self, ev: LiveEvent, via: str = DELIVERED) -> tuple[LiveEvent, Container[str], Container[str] | None,
                                                                 Callable[[list[str]], None]] | None:
        """For the event log's broadcaster (EventLog._to_riders): when a position's outcome is the same for
        every rider with default preferences — its first position, a category without a daily cap, not
        expired — that outcome is "deliver" to each audience member, and the rider's copy is one object
        for all of them. Returns (copy, the riders with preferences of their own, who are decided one by
        one as before, the audience or None for all, a callback counting the riders it was handed to);
        None when the position must be decided per rider."""
        found = self.observe(ev.id, ev.at, ev.data)
        if found is None:
            return None
        item, k = found
        if k != 0 or self.caps.get(item.category, 0) > 0 or self.clock() >= item.expires_at:
            return None

        def handed(riders: list[str]) -> None:
            self._count_many(item, via, riders)

        return item.view(ev), self.prefs, item.members, handed

    def for_riders(self, ev: LiveEvent, riders: list[str], via: str) -> list[tuple[str, LiveEvent]]:
        """Each of these riders' copy of the position, for those who get it (the MQTT transport): the
        plan's one copy for riders with default preferences, offer() for the others."""
        plan = self.plan(ev, via)
        if plan is None:
            return [(u, mine) for u in riders if (mine := self.offer(ev, u, via)) is not None]
        view, special, members, handed = plan
        out: list[tuple[str, LiveEvent]] = []
        given: list[str] = []
        for u in riders:
            if u in special:
                mine = self.offer(ev, u, via)
                if mine is not None:
                    out.append((u, mine))
            elif members is None or u in members:
                out.append((u, view))
                given.append(u)
        handed(given)
        return out

    def _count_many(self, item: Item, what: str, riders: list[str]) -> None:
        if not riders:
            return
        index, bit = self.index, self._bit
        idx = [index.get(u) if u in index else bit(u) for u in riders]
        bits = item.counted.get(what)
        if bits is None:
            bits = item.counted[what] = bytearray()
        top = (max(idx) >> 3) + 1
        if top > len(bits):
            bits.extend(bytes(top - len(bits) + 64))
        new = 0
        for i in idx:
            byte, mask = i >> 3, 1 << (i & 7)
            if not bits[byte] & mask:
                bits[byte] |= mask
                new += 1
        if new:
            item.pending[what] += new

    def releases_due(self, now: int) -> list[Item]:
        """Live marketing notifications that a rider, held by quiet hours at every position so far,
        could now be given (their quiet hours ended): each needs a release position."""
        due = []
        for item in self.items.values():
            if item.category != Category.MARKETING or now >= item.expires_at or not item.positions:
                continue
            if item.release_asked:
                item.release_asked += 1
                if item.release_asked <= RELEASE_RETRY_TICKS:
                    continue
                item.release_asked = 0
            for user_id, prefs in self.prefs.items():
                if prefs.quiet is None or in_quiet(prefs, now) or not item.includes(user_id):
                    continue
                if all(self.outcome(item, j, user_id) == QUIET for j in range(len(item.positions))):
                    item.release_asked = 1
                    due.append(item)
                    break
        return due

    def take_pending(self) -> dict[str, dict[str, int]]:
        """Counts since the last call, per notification id and column; the caller writes them, then
        calls flushed() (or give_back() when the write failed). Until then unflushed() still counts them."""
        out: dict[str, dict[str, int]] = {}
        for item in self.items.values():
            if any(item.pending.values()):
                out[item.id] = item.flushing = {COLUMNS[k]: v for k, v in item.pending.items() if v}
                item.pending.clear()
        return out

    def flushed(self, pending: dict[str, dict[str, int]]) -> None:
        for nid in pending:
            item = self.items.get(nid)
            if item is not None:
                item.flushing = {}

    def give_back(self, pending: dict[str, dict[str, int]]) -> None:
        """A flush failed: its counts wait for the next one."""
        by_column = {v: k for k, v in COLUMNS.items()}
        for nid, cols in pending.items():
            item = self.items.get(nid)
            if item is not None:
                item.flushing = {}
                for col, n in cols.items():
                    item.pending[by_column[col]] += n

    def unflushed(self, nid: str) -> dict[str, int]:
        """This process's counts not yet in the notification's row (pending, or being written)."""
        item = self.items.get(nid)
        if item is None:
            return {}
        out = dict(item.flushing)
        for k, v in item.pending.items():
            if v:
                out[COLUMNS[k]] = out.get(COLUMNS[k], 0) + v
        return out

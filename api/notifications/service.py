"""Sending notifications, riders' preferences and receipts, and the background work of the fan-out.

    send()      one `notification` row and one event (kind "notification", audience RIDERS), one
                transaction; the audience is resolved at send time: "all" is every rider account
                (counted now; riders who sign up while it lives see it too), "users" must all be riders,
                "riding" is the riders with an open (starting or active) ride at that moment, stored
                in the row and the event
    offer()     the event log's per-rider hook (EventLog.personalize): fanout.py decides
    to_topics() the MQTT transport: each audience member's topic, by the process that sent it
    tick        every LATCH_NOTIFY_TICK_S: reload preferences changed on other replicas, write a release
                position for marketing held by quiet hours that ended (the lease holder only), flush
                the counts into the notification rows, forget old notifications

Why one module of ~410 lines: the service is the notification's whole life (send, per-rider offer, receipts,
counts, preferences); the decisions per rider are fanout.py's and rules.py's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.auth import RIDER, Principal
from api.background import reraise_if_stopping
from api.clock import now_ms
from api.db import Database, Priority
from api.errors import Conflict, Forbidden, Invalid, LatchError, NotFound
from api.link import BrokerLink
from api.notifications.fanout import DELIVERED, MQTT, Fanout
from api.notifications.models import (
    Action,
    Category,
    HeldCounts,
    Notification,
    NotificationCounts,
    NotificationCreate,
    NotificationCreated,
    NotificationPref,
    NotificationPublic,
    NotificationReceipt,
    Prefs,
    QuietHours,
    ReceiptCreate,
    ReceiptPublic,
    format_clock,
    parse_clock,
)
from api.notifications.rules import RiderPrefs
from api.push import event_models as ek
from api.push.event_models import LogEvent
from api.push.events import EventLog, LiveEvent
from api.riders.models import OPEN_RIDE, Ride, User
from foundation.settings import Settings
from mqtt_client import MqttError
from protocol import topics

log = logging.getLogger("latch.notifications")
KEEP_MS = 2 * 86_400_000   # notifications remembered this long after they were sent (the daily cap looks back a day)


class NotificationService:
    def __init__(self, db: Database, settings: Settings, events: EventLog, link: BrokerLink,
                 writes_here: Callable[[], bool]) -> None:
        self.db = db
        self.events = events
        self.link = link
        self.writes_here = writes_here   # the singleton lease: only its holder writes release positions
        self.max_ttl_s = settings.notify_max_ttl_s
        self.tick_s = settings.notify_tick_s
        self.window = settings.notify_mqtt_window
        self.mqtt_session_ms = int(settings.notify_mqtt_session_s * 1000)
        self.fanout = Fanout({str(k): int(v) for k, v in settings.notify_daily_cap.items()})
        self._prefs_seen = 0
        self._task: asyncio.Task[None] | None = None
        # MQTT copies are made by one worker, notification after notification: a backlog of copies (a large
        # audience, a slow broker) then delays only further copies, never the event loop's other work. With a
        # task per notification, 10 notifications/s to 10,000 riders piled up tasks that starved the NATS relay
        # on the sending replica, and every replica's SSE riders got notifications 4-8 s late (bench/push.py).
        self._mqtt_queue: collections.deque[LiveEvent] = collections.deque()
        self._mqtt_wake = asyncio.Event()
        self._mqtt_worker: asyncio.Task[None] | None = None
        self._riders_cache: tuple[tuple[int, int], list[str]] | None = None   # (count, newest login), ids

    # ---- life -------------------------------------------------------------------------
    async def start(self) -> None:
        """Before the transports open: the preferences and the recent notifications' positions."""
        await self._load_prefs()
        since = now_ms() - KEEP_MS

        cursor = self.events.cursor_column   # the event id, or with NATS its JetStream sequence

        def load(s: Session) -> list[tuple[int, int, dict[str, Any]]]:
            first = s.exec(select(func.min(col(Notification.event_id))).where(Notification.created_at >= since)).one()
            if first is None:
                return []
            return [(int(c), at, data) for c, at, data in
                    s.exec(select(cursor, LogEvent.at, LogEvent.data)
                           .where(col(LogEvent.id) >= first, LogEvent.kind == ek.NOTIFICATION, cursor.is_not(None))
                           .order_by(cursor)).all()]

        # positions not yet relayed to NATS are observed when the stream delivers them
        for position, at, data in await self.db.read(load):
            self.fanout.observe(position, at, data)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="latch-notifications")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._mqtt_worker is not None:
            self._mqtt_worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._mqtt_worker
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except Exception:
                reraise_if_stopping()   # api/background.py: stop() cancelled a query, not a failure
                log.exception("notification tick failed; trying again next tick")

    async def tick(self) -> None:
        await self._load_prefs()
        now = now_ms()
        if self.writes_here():
            for item in self.fanout.releases_due(now):
                await self._write_release(item.id)
        await self.flush()
        self.fanout.forget_before(now - KEEP_MS)

    # ---- sending ----------------------------------------------------------------------
    async def send(self, who: Principal, body: NotificationCreate) -> NotificationCreated:
        if body.ttl_s > self.max_ttl_s:
            raise Invalid(f"ttl_s {body.ttl_s} is above the most allowed, {self.max_ttl_s} s "
                               f"(LATCH_NOTIFY_MAX_TTL_S)")
        nid, now = uuid.uuid4().hex, now_ms()
        expires = now + body.ttl_s * 1000
        actions = [a.model_dump() for a in body.actions]

        def unit(s: Session) -> tuple[int, int]:
            if body.audience.users is not None:
                wanted = body.audience.users
                found = set(s.exec(select(User.id).where(col(User.id).in_(wanted), User.role == RIDER,
                                                         col(User.deleted_at).is_(None))).all())
                missing = [u for u in wanted if u not in found]
                if missing:
                    raise LatchError(f"audience.users: {missing[0][:32]!r} is not a rider"
                                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
                audience: dict[str, Any] = {"users": list(wanted)}
                size = len(wanted)
            elif body.audience.riding:
                riders = sorted(set(s.exec(select(Ride.user_id).where(col(Ride.status).in_(OPEN_RIDE))).all()))
                audience, size = {"riding": riders}, len(riders)
            else:
                size = int(s.exec(select(func.count()).select_from(User).where(
                    User.role == RIDER, col(User.deleted_at).is_(None))).one())
                audience = {"all": True}
            s.add(Notification(id=nid, created_at=now, expires_at=expires, created_by=who.name[:64],
                               category=body.category.value, title=body.title, body=body.body, actions=actions,
                               data=body.data, audience=audience, audience_size=size))
            ev = self.events.append(s, ek.NOTIFICATION, {
                "notification_id": nid, "category": body.category.value, "title": body.title, "body": body.body,
                "actions": actions, "data": body.data, "silent": body.silent, "sent_at": now,
                "expires_at": expires, "audience": audience}, ek.RIDERS, at=now)
            s.commit()
            assert ev.id is not None
            s.exec(update(Notification).where(col(Notification.id) == nid).values(event_id=ev.id))  # type: ignore[call-overload]
            s.commit()
            return ev.id, size

        event_id, size = await self.db.write(unit, Priority.ROUTINE)
        bus = self.events.bus
        if bus is not None:   # with NATS the cursor is the stream's sequence, known once JetStream stored it
            event_id = await bus.sequence_of(event_id)
        return NotificationCreated(id=nid, event_id=event_id, audience_size=size, expires_at=expires,
                                   silent=body.silent)

    async def _write_release(self, nid: str) -> None:
        """A new position for a held marketing notification: the same payload, later in the stream."""
        item = self.fanout.items.get(nid)
        if item is None or not item.positions:
            return

        cursor, position = self.events.cursor_column, item.positions[0][0]

        def unit(s: Session) -> None:
            first = s.exec(select(LogEvent).where(cursor == position)).first()
            if first is None:
                return
            self.events.append(s, ek.NOTIFICATION, {**first.data, "release": True}, ek.RIDERS)
            s.commit()

        await self.db.write(unit, Priority.ROUTINE)

    # ---- fan-out: the event log's hook and the MQTT transport ---------------------------
    def offer(self, ev: LiveEvent, user_id: str) -> LiveEvent | None:
        if ev.kind != ek.NOTIFICATION:
            return None
        return self.fanout.offer(ev, user_id, DELIVERED)

    def mqtt_sink(self, ev: LiveEvent) -> None:
        """Only the process that wrote a position publishes it, so a rider's topic gets it once."""
        if ev.kind == ek.NOTIFICATION and ev.audience == ek.RIDERS and ev.local:
            self._mqtt_queue.append(ev)
            self._mqtt_wake.set()
            if self._mqtt_worker is None:
                self._mqtt_worker = asyncio.get_running_loop().create_task(self._copy_to_topics(),
                                                                          name="latch-notify-mqtt")

    async def _copy_to_topics(self) -> None:
        while True:
            await self._mqtt_wake.wait()
            self._mqtt_wake.clear()
            while self._mqtt_queue:
                ev = self._mqtt_queue.popleft()
                try:
                    await self._to_topics(ev)
                except Exception:
                    reraise_if_stopping()
                    log.exception("MQTT copies of notification event %d failed", ev.id)

    async def _to_topics(self, ev: LiveEvent) -> None:
        found = self.fanout.observe(ev.id, ev.at, ev.data)
        if found is None:
            return
        item = found[0]
        on_mqtt = await self._mqtt_riders()
        riders = on_mqtt if item.members is None else [u for u in on_mqtt if u in item.members]
        batch = min(500, self.window)
        for i in range(0, len(riders), batch):
            if not self.link.is_connected:
                return   # the app reads the rest over HTTP by cursor
            # at most `window` unacknowledged after this batch (MQTT's 65,535 packet ids are shared with the
            # commands): on a slow broker the copies wait here, the commands never do
            await self.link.room(self.window - batch + 1)
            for user_id, mine in self.fanout.for_riders(ev, riders[i:i + batch], MQTT):   # fanout.py: decided once
                if topics.valid_device_id(user_id):
                    try:
                        self.link.publish(topics.user_events_topic(user_id), mine.json, qos=1)
                    except MqttError:   # the link went down meanwhile: the rest read it over HTTP by cursor
                        return
            await asyncio.sleep(0)   # let the loop breathe on a large audience

    async def _mqtt_riders(self) -> list[str]:
        """The riders whose app logged into the broker within LATCH_NOTIFY_MQTT_SESSION_S (their broker session
        may hold a copy), sorted: a copy to anyone else's topic reaches no one, and those riders read it by
        cursor on the transport they use. The ids are read again only when that set may have changed (its
        size or newest login moved: one aggregate, not the whole table, for each notification)."""
        table = User.__table__   # type: ignore[attr-defined]
        since = now_ms() - self.mqtt_session_ms
        riders = (table.c.role == RIDER) & table.c.deleted_at.is_(None) & (table.c.mqtt_login_at >= since)
        shape_q = select(func.count(), func.max(table.c.mqtt_login_at)).where(riders)
        ids_q = select(table.c.id).where(riders).order_by(table.c.id)
        cached = self._riders_cache

        def load(s: Session) -> tuple[tuple[int, int], list[str] | None]:
            n, newest = s.connection().execute(shape_q).one()
            shape = (int(n or 0), int(newest or 0))
            if cached is not None and cached[0] == shape:
                return shape, None
            return shape, list(s.connection().execute(ids_q).scalars().all())

        shape, ids = await self.db.read(load)
        if ids is None and cached is not None:
            return cached[1]
        self._riders_cache = (shape, ids or [])
        return self._riders_cache[1]

    # ---- preferences ------------------------------------------------------------------
    async def _load_prefs(self) -> None:
        since = self._prefs_seen

        def load(s: Session) -> list[NotificationPref]:
            return list(s.exec(select(NotificationPref).where(NotificationPref.updated_at >= since)).all())

        for row in await self.db.read(load):
            self.fanout.set_prefs(row.user_id, RiderPrefs.from_row(row))
            self._prefs_seen = max(self._prefs_seen, row.updated_at)

    @staticmethod
    def _mine(who: Principal) -> str:
        if who.user_id is None:
            raise Forbidden("the admin token has no account: preferences and receipts belong to users")
        return who.user_id

    async def get_prefs(self, who: Principal) -> Prefs:
        uid = self._mine(who)
        row = await self.db.read(lambda s: s.get(NotificationPref, uid))
        if row is None:
            return Prefs()
        quiet = None
        if row.quiet_start_s is not None and row.quiet_end_s is not None:
            quiet = QuietHours(start=format_clock(row.quiet_start_s), end=format_clock(row.quiet_end_s))
        return Prefs(opt_out=[Category(c) for c in row.opt_out], quiet_hours=quiet, timezone=row.timezone)

    async def put_prefs(self, who: Principal, prefs: Prefs) -> Prefs:
        uid = self._mine(who)
        qs = parse_clock(prefs.quiet_hours.start) if prefs.quiet_hours else None
        qe = parse_clock(prefs.quiet_hours.end) if prefs.quiet_hours else None

        def unit(s: Session) -> NotificationPref:
            row = s.get(NotificationPref, uid) or NotificationPref(user_id=uid, updated_at=0)
            row.opt_out = [c.value for c in prefs.opt_out]
            row.quiet_start_s, row.quiet_end_s, row.timezone = qs, qe, prefs.timezone
            row.updated_at = max(now_ms(), row.updated_at + 1)
            s.add(row)
            s.commit()
            return row

        row = await self.db.write(unit)
        self.fanout.set_prefs(uid, RiderPrefs.from_row(row))   # here at once; other replicas at their next tick
        return prefs

    # ---- receipts and counts ----------------------------------------------------------
    async def receipt(self, who: Principal, nid: str, body: ReceiptCreate) -> ReceiptPublic:
        uid = self._mine(who)
        row = await self.db.read(lambda s: s.get(Notification, nid))
        if row is None or not _includes(row.audience, uid, who):
            raise NotFound(f"no notification {nid[:40]!r} for you")
        if body.action is not None and body.action not in [a["id"] for a in row.actions]:
            raise Invalid(f"notification {nid} has no action {body.action[:32]!r}")
        now = now_ms()

        def unit(s: Session) -> NotificationReceipt:
            r = s.get(NotificationReceipt, (nid, uid)) or NotificationReceipt(notification_id=nid, user_id=uid)
            r.seen_at = r.seen_at or now   # pressing an action means it was seen
            if body.action is not None:
                if r.action is not None and r.action != body.action:
                    raise Conflict(f"you already answered {r.action!r} to notification {nid}")
                if r.action is None:
                    r.action, r.action_at = body.action, now
            s.add(r)
            s.commit()
            return r

        try:
            r = await self.db.write(unit)
        except IntegrityError:   # the same rider's two receipts raced: the second finds the first's row
            r = await self.db.write(unit)
        return ReceiptPublic(user_id=uid, seen_at=r.seen_at, action=r.action, action_at=r.action_at)

    async def detail(self, nid: str, limit: int, offset: int) -> NotificationPublic:
        def load(s: Session) -> tuple[Notification | None, int, dict[str, int], list[NotificationReceipt]]:
            row = s.get(Notification, nid)
            if row is None:
                return None, 0, {}, []
            seen = int(s.exec(select(func.count()).select_from(NotificationReceipt).where(
                NotificationReceipt.notification_id == nid, col(NotificationReceipt.seen_at).is_not(None))).one())
            pressed = {a: int(n) for a, n in s.exec(
                select(NotificationReceipt.action, func.count()).where(
                    NotificationReceipt.notification_id == nid, col(NotificationReceipt.action).is_not(None))
                .group_by(col(NotificationReceipt.action))).all()}
            receipts = list(s.exec(select(NotificationReceipt).where(NotificationReceipt.notification_id == nid)
                                   .order_by(col(NotificationReceipt.user_id)).offset(offset).limit(limit)).all())
            return row, seen, pressed, receipts

        row, seen, pressed, receipts = await self.db.read(load)
        if row is None:
            raise NotFound(f"no notification {nid[:40]!r}")
        extra = self.fanout.unflushed(nid)   # this process's counts not flushed yet

        def n(column: str) -> int:
            return int(getattr(row, column)) + extra.get(column, 0)

        counts = NotificationCounts(
            audience=row.audience_size, delivered=n("delivered"), mqtt_published=n("mqtt_published"), seen=seen,
            actions={a["id"]: pressed.get(a["id"], 0) for a in row.actions},
            held=HeldCounts(opted_out=n("held_opted_out"), quiet_hours=n("held_quiet_hours"),
                            capped=n("held_capped")),
            expired=n("expired"))
        return NotificationPublic(
            id=row.id, created_at=row.created_at, expires_at=row.expires_at, created_by=row.created_by,
            category=Category(row.category), title=row.title, body=row.body,
            actions=[Action(**a) for a in row.actions], data=row.data, audience=row.audience,
            silent=row.title is None, counts=counts,
            receipts=[ReceiptPublic(user_id=r.user_id, seen_at=r.seen_at, action=r.action, action_at=r.action_at)
                      for r in receipts])

    async def flush(self) -> None:
        pending = self.fanout.take_pending()
        if not pending:
            return

        def unit(s: Session) -> None:
            for nid, cols in pending.items():
                values = {c: getattr(Notification, c) + k for c, k in cols.items()}
                s.exec(update(Notification).where(col(Notification.id) == nid).values(**values))  # type: ignore[call-overload]
            s.commit()

        try:
            await self.db.write(unit, Priority.BULK)
        except BaseException:
            self.fanout.give_back(pending)
            raise
        self.fanout.flushed(pending)


def _includes(audience: dict[str, Any], user_id: str, who: Principal) -> bool:
    if audience.get("all"):
        return not who.is_operator
    members = audience.get("users") if "users" in audience else audience.get("riding")
    return user_id in (members or ())

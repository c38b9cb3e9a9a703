"""The event log: one append-only table, one in-process broadcaster, every push transport reads from here.

    a change's transaction ──append()──▶ event rows (same transaction; id = the cursor)
                         commit ──▶ published once, in commit order, on the event loop:
                                     ├─ ring of recent events (resume without a query)
                                     ├─ live subscriptions (SSE, WebSocket, long polls), by audience
                                     └─ sinks (each rider's MQTT topic)

Ordering: an event's id is its cursor, so ids must be handed out in commit order — a reader that has
seen 11 must never later meet 10. Rows are staged during the transaction and inserted just before it
commits (`_before_commit`): with SQLite's single writer that is enough. On PostgreSQL, where several
writers and several API replicas commit at once, the insert is made under a transaction-level
advisory lock (EVENT_ORDER_LOCK), held from the moment the ids are drawn until the commit: ids are
then in commit order across every replica. One statement, `latch_append_events()` (migration 0003),
takes the lock, inserts the events and queues the NOTIFY, so the lock that orders every replica's
events is held for that one round trip and the COMMIT — not for three round trips, each of which
waits for a busy process to get back to it.

Several replicas (PostgreSQL): the same transaction sends NOTIFY latch_events carrying its events
(`[[id, at, kind, audience, data], ...]`, or only the newest id when they do not fit in the 8,000-byte
payload; api/pg_bus.py). Every replica, on hearing it — or at once, for its own commits — publishes
everything after its head up to that id, in id order: from the events it was handed when they cover
the range, else with one query. So an SSE, WebSocket or long-poll client on replica A sees replica B's
events, in order, resumable by the same cursor, and replica A reads nothing back to do it. Only the
replica that made an event feeds it to the sinks (each rider's MQTT topic), so riders get each message
once; a replica never publishes past one of its own events before its own commit has reported it
(`_own_pending`), so its own events are always published as its own.

No loss, no duplicates: a subscription is registered for live events *before* its backlog is read,
and everything is filtered by the subscription's cursor (the newest id it has handed over), so an
event committed while the backlog was being read arrives exactly once.

Fan-out costs one pass over the subscribers that may see an event (operators, plus the one rider it
concerns), a list append each and a wake-up of the ones that were idle; the payload is encoded once
per event and format. A waiting long poll or an idle stream costs one future and one timer, no
thread and no query.

Why one module of ~900 lines (issue 16 asks for a reason above ~400): `EventLog` and `Subscription` share one
invariant — an event is handed to a subscription exactly once, after its cursor, whether it arrives from the
backlog, the buffer or the direct write — and each reaches into the other's state on the hot path (the
broadcaster marks subscriptions pending, a subscription's close releases the log's stream count). Split across
modules they would need a protocol for each other's private state; the staging hooks (`StagedEvent`,
`_before_commit`/`_after_commit`) are the part that could move first.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Container
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import func, insert, text
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, col, select

from api.auth import Principal
from api.clock import now_ms
from api.commands import sql as command_sql
from api.db import Database
from api.errors import RateLimited
from api.group_commit import after_durable_on_loop
from api.heap import HeapKeeper
from api.metrics import Metrics
from api.pg_bus import EVENTS as EVENTS_CHANNEL
from api.push.event_models import RIDERS, LogEvent
from api.push.nats_bus import NatsBus
from foundation.settings import Settings

log = logging.getLogger("latch.events")

_STAGED = "latch_events"
_LOG = "latch_event_log"   # Session.info: the EventLog whose events the session staged
MAX_CURSOR_DIGITS = 18
EVENT_ORDER_LOCK = 0x1A7C4_0002   # pg_advisory_xact_lock key: event ids drawn in commit order
CATCH_UP_RETRY_S = 0.5
APPEND_EVENTS = text("SELECT latch_append_events(:k, :c, CAST(:e AS json))")   # api/migrations 0003


class CursorError(ValueError):
    """A cursor that is not an event id, or one from the future; str(e) is the 400's message."""


SESSION_ENDED = "session ended: log in again"
SESSION_RECHECK_S = 5.0
HOUSEKEEPING_S = 1.0
OPEN_FILES_WANTED = 262_144   # file descriptors this process asks for (streams are sockets)


class TooManyStreams(RateLimited):
    """The user already holds LATCH_MAX_STREAMS_PER_USER open streams; str(e) is the 429's message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retry_after_s=5)


def parse_cursor(raw: str | None, head: int) -> int | None:
    """None for no cursor; otherwise an event id not after `head`."""
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_CURSOR_DIGITS:
        raise CursorError(f"cursor {raw[:40]!r} is not an event id: use the id of the last event you received, "
                          f"or 0 for the beginning")
    cursor = int(raw)
    if cursor > head:
        raise CursorError(f"cursor {cursor} is ahead of the newest event ({head}): it was not issued by this log")
    return cursor


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class StagedEvent:
    """An event appended in a transaction, before its commit gives it an id: plain data (an ORM LogEvent
    cost ~40 us to build, and a command makes one per state change; docs/performance.md)."""

    __slots__ = ("at", "kind", "audience", "data", "id")

    def __init__(self, at: int, kind: str, audience: str | None, data: dict[str, Any]) -> None:
        self.at, self.kind, self.audience, self.data = at, kind, audience, data
        self.id: int | None = None


def _before_commit(s: Session) -> None:
    owner = s.info.get(_LOG)
    if owner is not None:
        owner._before_commit(s)


def _after_commit(s: Session) -> None:
    owner = s.info.get(_LOG)
    if owner is not None:
        owner._committed(s)


def _after_rollback(s: Session) -> None:
    owner = s.info.get(_LOG)
    if owner is not None:
        owner._rolled_back(s)


# Listened to once, on the Session class, for every session: listening on each session that appends (three
# listeners) cost ~35 us per transaction, more than the statements of a state change
sa_event.listen(OrmSession, "before_commit", _before_commit)
sa_event.listen(OrmSession, "after_commit", _after_commit)
sa_event.listen(OrmSession, "after_rollback", _after_rollback)


class LiveEvent:
    """A committed event, with its encodings made once and shared by every subscriber."""

    __slots__ = ("id", "kind", "at", "audience", "data", "local", "_json", "_sse", "_ws", "_sse_chunk", "_ws_frame")

    def __init__(self, id: int, kind: str, at: int, audience: str | None, data: dict[str, Any],
                 local: bool = True) -> None:
        self.id, self.kind, self.at, self.audience, self.data = id, kind, at, audience, data
        self.local = local   # made by this process (not read back from another replica's commit)
        self._json: bytes | None = None
        self._sse: bytes | None = None
        self._ws: str | None = None
        self._sse_chunk: bytes | None = None
        self._ws_frame: bytes | None = None

    @classmethod
    def from_row(cls, row: "LogEvent | StagedEvent", local: bool = True) -> "LiveEvent":
        assert row.id is not None
        return cls(row.id, row.kind, row.at, row.audience, row.data, local)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at, "data": self.data}

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = _dumps(self.public())
        return self._json

    @property
    def sse(self) -> bytes:
        """One Server-Sent Events message: id (the cursor), event (the kind), data (the JSON)."""
        if self._sse is None:
            self._sse = b"id: %d\nevent: %s\ndata: %s\n\n" % (self.id, self.kind.encode(), self.json)
        return self._sse

    @property
    def ws(self) -> str:
        if self._ws is None:
            self._ws = '{"type":"event","event":' + self.json.decode() + "}"
        return self._ws

    @property
    def sse_chunk(self) -> bytes:
        """The SSE message as one HTTP/1.1 chunk: what a stream written straight to its socket sends
        (api/push/wire.py), the same bytes for every subscriber."""
        if self._sse_chunk is None:
            sse = self.sse
            self._sse_chunk = b"%x\r\n%s\r\n" % (len(sse), sse)
        return self._sse_chunk

    @property
    def ws_frame(self) -> bytes:
        """The WebSocket text frame (server to client: unmasked, so the same bytes for every subscriber)."""
        if self._ws_frame is None:
            self._ws_frame = ws_text_frame(self.ws.encode())
        return self._ws_frame


def ws_text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


FLUSH_CHUNK = 256   # direct subscribers written per loop turn (~2-3 ms of socket writes)


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Subscription:
    """One connection's view of the log: a bounded buffer of events it may see, after its cursor.

    Two ways out to the client. Buffered: the broadcaster appends to `_buf` and wakes the connection's
    task, which writes the batch through the server (ASGI send). Direct (`wire`, api/push/wire.py): once the
    backlog is written and the buffer drained, the broadcaster writes each event's bytes, encoded once per
    event, straight to the socket; no task wakes per event. A direct subscriber whose socket stops
    draining is cut off when `limit` events were written while the socket's own buffer was not empty."""

    __slots__ = ("user_id", "session_id", "who", "checked_at", "operator", "cursor", "sent", "live", "closed",
                 "reason", "cut", "task", "wire", "queued", "wrote", "on_close", "epoch", "keepalive_s", "due", "_buf",
                 "_pending", "_limit", "_waiter", "_log")

    def __init__(self, who: Principal, cursor: int, limit: int, log_: "EventLog") -> None:
        self.user_id = who.user_id
        self.session_id = who.session_id
        self.who = who
        self.checked_at = time.monotonic()   # when the session behind it was last confirmed
        self.operator = who.is_operator
        self.cursor = cursor      # every visible event up to here has been handed over (backlog or buffer)
        self.sent = cursor        # the newest id the transport has written to its client
        self.live = False
        self.closed = False
        self.cut = False          # closed because the client fell too far behind
        self.reason: str | None = None
        self.task: asyncio.Task[Any] | None = None   # the writer; cancelled when cut off while blocked
        self.wire: Any = None     # api/push/wire.py Wire: events written straight to the socket
        self.queued = 0           # direct: events written while the socket's buffer was not empty
        self.wrote = False        # direct: something was written since the last keep-alive check
        self.on_close: Callable[[Subscription], None] | None = None   # direct: the transport ends the connection
        self.epoch = log_.heap.epoch   # api/heap.py: which freeze it came after
        self.keepalive_s: float | None = None   # detached: the keep-alive interval, and when the next is due
        self.due: float | None = None
        self._buf: list[LiveEvent] = []
        self._pending: list[LiveEvent] | None = None   # direct: handed over, not yet written (EventLog._flush)
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None
        self._log = log_

    def push(self, ev: LiveEvent) -> None:
        """From the broadcaster: never blocks; a full buffer cuts the subscription off."""
        if self.closed or ev.id <= self.cursor:
            return
        if self.wire is not None:
            self.cursor = ev.id
            pending = self._pending
            if pending is None:
                self._pending = [ev]
                self._log._mark(self)
            elif len(pending) >= self._limit:
                self.cut_off(f"too far behind: {self._limit} events waiting to be sent; "
                             f"reconnect with the id of the last event you received")
            else:
                pending.append(ev)
            return
        if len(self._buf) >= self._limit:
            self.cut_off(f"too far behind: {self._limit} events waiting to be sent; "
                         f"reconnect with the id of the last event you received")
            return
        self._buf.append(ev)
        self.cursor = ev.id
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def write_out(self) -> None:
        """Direct: what was handed over since the last write, in one write (EventLog._flush)."""
        events, self._pending = self._pending, None
        if not events or self.closed:
            return
        wire = self.wire
        self.sent = events[-1].id
        self.wrote = True
        if not wire.write_events(events):
            self.close("client disconnected")
        elif wire.backed_up():
            self.queued += len(events)
            if self.queued > self._limit:
                self.cut_off(f"too far behind: {self._limit} events waiting to be sent; "
                             f"reconnect with the id of the last event you received")
        else:
            self.queued = 0

    def go_direct(self, wire: Any) -> bool:
        """Switch to writing straight to the socket: only live, with nothing buffered (so the order
        holds: everything before was written by the task, everything after is written here)."""
        if wire is None or self.closed or not self.live or self._buf:
            return False
        self.wire = wire
        self._log.metrics.inc("subscribers_direct")
        return True

    def cut_off(self, reason: str) -> None:
        if self.closed:
            return
        self.cut = True
        self._log.metrics.inc("subscribers_cut_off")
        log.info("subscriber %s cut off: %s", self.user_id or "operator", reason)
        self.close(reason)
        if self.task is not None and self.task is not asyncio.current_task() and self.wire is None:
            self.task.cancel()   # it may be blocked writing to the slow client

    def close(self, reason: str) -> None:
        if self.closed:
            return
        pending, self._pending = self._pending, None
        if pending and not self.cut and reason != "client disconnected":
            self.sent = pending[-1].id   # handed over before the end: written before the goodbye
            self.wire.write_events(pending)
        self.closed = True
        self.reason = reason
        self._log._remove(self)
        self._log._release_stream(self)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            try:
                on_close(self)
            except Exception:
                log.exception("ending a closed subscription's connection failed")

    async def next(self, timeout: float) -> list[LiveEvent]:
        """Everything buffered; waits up to `timeout` when there is nothing (then []). A direct
        subscription has nothing buffered: this waits until it closes or the time is up."""
        if not self._buf and not self.closed:
            loop = asyncio.get_running_loop()
            w = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _release, w)
            try:
                await w
            finally:
                timer.cancel()
                self._waiter = None
        out, self._buf = self._buf, []
        return out

    def keepalive(self) -> None:
        """Direct: after a quiet interval, the wire's keep-alive (SSE comment) unless something was written."""
        if self.wire is not None and not self.closed:
            if not self.wrote and not self.wire.keepalive():
                self.close("client disconnected")
            self.wrote = False


class EventLog:
    def __init__(self, db: Database, settings: Settings, metrics: Metrics) -> None:
        self.db = db
        self.metrics = metrics
        self.buffer = settings.subscriber_buffer
        self.page = settings.event_page
        self.ring: deque[LiveEvent] = deque(maxlen=max(1, settings.event_ring))
        self.floor = 0   # every event after this id is in the ring (it was published by this process)
        self.head = 0    # the newest published id
        self.sinks: list[Callable[[LiveEvent], None]] = []
        self._operators: set[Subscription] = set()
        self._riders: dict[str, set[Subscription]] = {}
        self.max_streams_per_user = settings.max_streams_per_user
        self._streams: dict[str, set[Subscription]] = {}   # open subscriptions per user account (not the admin)
        # re-checks an open stream's session (revoked, user deleted) every SESSION_RECHECK_S: set by the app
        self.confirm: Callable[[Principal], Awaitable[Principal]] | None = None
        # an event for every rider (audience RIDERS: notifications) -> that rider's copy, or None when the
        # rider does not get this one (api/notifications/fanout.py): set by the app
        self.personalize: Callable[[LiveEvent, str], LiveEvent | None] | None = None
        # the same decision for every connected rider at once, when it can be made once (fanout.py Fanout.plan):
        # (the copy every rider gets, the riders who need personalize() instead, the audience or None for all,
        # a callback with the riders it was handed to); None: ask personalize() for each rider
        self.plan: Callable[[LiveEvent], tuple[LiveEvent, Container[str], Container[str] | None,
                                               Callable[[list[str]], None]] | None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self.heap = HeapKeeper()   # the cyclic collector kept off the push path (api/heap.py)
        self._detached: set[Subscription] = set()   # SSE streams whose ASGI call ended (detach)
        self._dirty: deque[Subscription] = deque()   # direct subscriptions with events to write (_flush)
        self._flushing = False
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        # with NATS (LATCH_NATS_URL) events travel on JetStream and its sequence is the cursor (api/push/nats_bus.py);
        # without it, on PostgreSQL, other processes may append too (api/pg_bus.py)
        self.bus: NatsBus | None = NatsBus(settings, db, metrics) if settings.nats_url else None
        self.shared = db.is_postgres and self.bus is None
        self._local: dict[int, LiveEvent] = {}   # committed events known here (ours, or from NOTIFY) not yet published
        # ids of our own events drawn but whose commit we have not yet seen end: publishing stops short
        # of them until it does, so our own events are published as ours (fed to the sinks) whatever
        # arrives first, our commit's callback or the notification of it. Added on a writer thread.
        self._own_pending: set[int] = set()
        self._want = 0                        # every id up to here is committed; publish up to it
        self._catching: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """With several processes, start listening (api/pg_bus.py) before this: nothing falls between."""
        self._loop = asyncio.get_running_loop()
        if self.bus is not None:
            self.head = self.floor = self._want = await self.bus.start(self._publish, LiveEvent)
        else:
            self.head = self.floor = self._want = max(self.head, await self._newest_id())
        raise_open_files()
        self._housekeeping = self._loop.create_task(self._recheck_sessions(), name="latch-events-sessions")

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.bus is not None:
            await self.bus.stop()

    def __len__(self) -> int:
        return len(self._operators) + sum(len(v) for v in self._riders.values())

    @property
    def cursor_column(self) -> Any:
        """The `event` column that holds an event's cursor: its JetStream sequence with NATS, else its id."""
        return col(LogEvent.seq) if self.bus is not None else col(LogEvent.id)

    # ---- appending: inside the transaction of the change, on the writer thread ------------
    def append(self, s: Session, kind: str, data: dict[str, Any], audience: str | None,
               at: int | None = None) -> StagedEvent:
        """Stage an event in `s`'s transaction; it is inserted (and gets its id) just before the commit."""
        row = StagedEvent(at or now_ms(), kind, audience, data)
        staged = s.info.get(_STAGED)
        if staged is None:
            s.info[_STAGED] = [row]
            s.info[_LOG] = self   # the Session class's listeners (below the class) find this log
        else:
            staged.append(row)
        return row

    def _before_commit(self, s: Session) -> None:
        rows: list[StagedEvent] = s.info.get(_STAGED) or []
        if not rows:
            return
        if not self.shared:   # SQLite: one writer, ids are in commit order as they are drawn
            ids = command_sql.append_log_events_sqlite(s, [(r.at, r.kind, r.audience, r.data) for r in rows])
            if ids is None:   # one process on another database: ids in draw order, as on SQLite
                table = LogEvent.__table__
                ids = s.connection().execute(
                    insert(table).returning(table.c.id, sort_by_parameter_order=True),
                    [{"at": r.at, "kind": r.kind, "audience": r.audience, "data": r.data} for r in rows]
                ).scalars().all()
            for row, event_id in zip(rows, ids, strict=True):
                row.id = int(event_id)
            if self.bus is not None:   # the outbox rows, in the same transaction (api/push/nats_bus.py)
                self.bus.stage(s, [int(i) for i in ids])
            return
        # PostgreSQL: ids in commit order across processes (see the module's docstring). Everything else
        # of the transaction is written first; then one statement (migration 0003) takes the order lock,
        # inserts the events and queues the NOTIFY, so the lock is held for that round trip and the
        # COMMIT only, and never waits on a row lock (no deadlock).
        s.flush()
        ids = s.connection().execute(APPEND_EVENTS, {
            "k": EVENT_ORDER_LOCK, "c": EVENTS_CHANNEL,
            "e": json.dumps([{"at": r.at, "kind": r.kind, "audience": r.audience, "data": r.data} for r in rows],
                            separators=(",", ":"))}).scalars().all()
        for row, event_id in zip(rows, ids, strict=True):
            row.id = int(event_id)
        self._own_pending.update(int(i) for i in ids)

    def _committed(self, s: Session) -> None:
        rows: list[StagedEvent] = s.info.pop(_STAGED, None) or []
        if not rows or self._loop is None:
            return
        events = [LiveEvent.from_row(r) for r in rows]
        publish = (self.bus.hand_over if self.bus is not None
                   else self._local_committed if self.shared else self._publish)
        # published on the loop once durable: for a unit of a group commit that is the batch's COMMIT, not
        # this savepoint's, in the same wake-up of the loop as the batch's answers (api/group_commit.py)
        after_durable_on_loop(s, self._loop, lambda: publish(events))

    # ---- several processes (PostgreSQL): publish in id order up to what is known committed --------
    def _local_committed(self, events: list[LiveEvent]) -> None:
        for ev in events:
            self._own_pending.discard(ev.id)
            if ev.id > self.head:
                self._local[ev.id] = ev   # ours, even if the notification's copy came first
        # every id up to our newest is committed: ours held the order lock until it committed
        self.catch_up(events[-1].id)

    def on_notify(self, payload: str) -> None:
        """NOTIFY latch_events from any replica: a commit's events as [[id, at, kind, audience, data], ...]
        when they fit in a notification (published from it, no query), else the commit's newest id."""
        try:
            if payload.startswith("["):
                events = [LiveEvent(int(i), str(kind), int(at), audience, data, local=False)
                          for i, at, kind, audience, data in json.loads(payload)]
                for ev in events:
                    if ev.id > self.head and ev.id not in self._own_pending:
                        self._local.setdefault(ev.id, ev)   # our own commit's copy, if there, stays
                upto = events[-1].id
            else:
                upto = int(payload)
        except (ValueError, TypeError, IndexError):
            log.warning("ignored a malformed %s notification: %r", EVENTS_CHANNEL, payload[:80])
            return
        self.catch_up(upto)

    def resync(self) -> None:
        """After the listening connection was lost: publish whatever was committed meanwhile."""
        if self.bus is not None:   # events do not travel on PostgreSQL then
            return
        asyncio.get_running_loop().create_task(self._resync(), name="latch-events-resync")

    async def _resync(self) -> None:
        self.catch_up(await self._newest_id())

    async def _newest_id(self) -> int:
        return int(await self.db.read(lambda s: s.exec(select(func.max(col(LogEvent.id)))).one() or 0))

    def catch_up(self, upto: int) -> None:
        self._want = max(self._want, upto)
        if self._want > self.head and (self._catching is None or self._catching.done()):
            self._catching = asyncio.get_running_loop().create_task(self._catch_up(), name="latch-events-catch-up")

    async def _catch_up(self) -> None:
        while self._want > self.head:
            want, head = self._want, self.head
            own = [i for i in list(self._own_pending) if i <= want]   # list(): a writer thread may add
            if own:
                want = min(own) - 1   # our own commit's callback calls catch_up again
                if want <= head:
                    return
            try:
                if all(i in self._local for i in range(head + 1, min(want, head + self.page) + 1)):
                    upto = min(want, head + self.page)
                    page = [self._local[i] for i in range(head + 1, upto + 1)]
                else:
                    page, upto = await self._read_committed(head, want)
            except Exception:
                log.exception("reading committed events after %d failed; retrying", head)
                await asyncio.sleep(CATCH_UP_RETRY_S)
                continue
            self._publish(page)
            self.head = max(self.head, upto)   # ids in between that have no row were rolled back
            for i in [i for i in self._local if i <= self.head]:
                del self._local[i]

    async def _read_committed(self, after: int, upto: int) -> tuple[list[LiveEvent], int]:
        """Events after `after` up to `upto` (one page), and the id the page covers."""
        limit = self.page

        def load(s: Session) -> tuple[list[LogEvent], int]:
            rows = list(s.exec(select(LogEvent).where(col(LogEvent.id) > after, col(LogEvent.id) <= upto)
                               .order_by(col(LogEvent.id)).limit(limit)).all())
            return rows, (int(rows[-1].id or after) if len(rows) >= limit else upto)

        rows, covered = await self.db.read(load)
        self.metrics.inc("event_catch_up_queries")
        return [self._local.get(r.id or 0) or LiveEvent.from_row(r, local=False) for r in rows], covered

    def _rolled_back(self, s: Session) -> None:
        drawn = [row.id for row in s.info.pop(_STAGED, None) or [] if row.id is not None]
        if drawn and self.shared:   # drawn, never committed: publishing need not wait for them any more
            self._own_pending.difference_update(drawn)
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self.catch_up, 0)
                except RuntimeError:   # the loop is closed: shutting down
                    pass

    # ---- publishing: on the event loop, in commit order --------------------------------------
    def _publish(self, events: list[LiveEvent]) -> None:
        for ev in events:
            if ev.id <= self.head:
                if self.shared or self.bus is not None:
                    continue
                log.warning("event %d published after %d: cursors need a single writer", ev.id, self.head)
            self.head = max(self.head, ev.id)
            if len(self.ring) == self.ring.maxlen:
                self.floor = self.ring[0].id
            self.ring.append(ev)
            for sub in tuple(self._operators):
                sub.push(ev)
            if ev.audience == RIDERS:
                if self.personalize is not None:
                    self._to_riders(ev, self.personalize)
            elif ev.audience is not None:
                for sub in tuple(self._riders.get(ev.audience, ())):
                    sub.push(ev)
            for sink in self.sinks:
                try:
                    sink(ev)
                except Exception:
                    log.exception("event sink failed for event %d", ev.id)
        self.metrics.inc("events_published", len(events))

    def _to_riders(self, ev: LiveEvent, personalize: Callable[[LiveEvent, str], LiveEvent | None]) -> None:
        """An event for every rider: decided once for all riders the plan covers (one shared copy, one
        encoding), per rider for the others."""
        plan = self.plan(ev) if self.plan is not None else None
        if plan is None:
            for user_id, subs in tuple(self._riders.items()):
                mine = personalize(ev, user_id)
                if mine is not None:
                    for sub in tuple(subs):
                        sub.push(mine)
            return
        view, special, members, handed = plan
        given: list[str] = []
        for user_id, subs in tuple(self._riders.items()):
            if user_id in special:
                mine = personalize(ev, user_id)
                if mine is None:
                    continue
            elif members is None or user_id in members:
                mine = view
                given.append(user_id)
            else:
                continue
            if len(subs) == 1:
                for sub in subs:
                    sub.push(mine)
            else:
                for sub in tuple(subs):
                    sub.push(mine)
        handed(given)

    def _add(self, sub: Subscription) -> None:
        if sub.operator:
            self._operators.add(sub)
        elif sub.user_id is not None:
            self._riders.setdefault(sub.user_id, set()).add(sub)
        sub.live = True

    def _remove(self, sub: Subscription) -> None:
        if sub.epoch < self.heap.epoch:   # frozen with it: its cycles wait for the next full collection
            self.heap.stream_closed()
        if sub.operator:
            self._operators.discard(sub)
        elif sub.user_id is not None:
            subs = self._riders.get(sub.user_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._riders[sub.user_id]

    # ---- direct subscriptions: writing what was handed over ---------------------------------------
    def _mark(self, sub: Subscription) -> None:
        self._dirty.append(sub)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write to FLUSH_CHUNK direct subscribers, then let the loop run and come back for the rest.

        A socket write costs far more than handing an event over (on loopback ~7 us of kernel time against
        ~1 us: the kernel's TCP path, the receiver's included, is charged to the writer). So the broadcaster
        only hands events over (Subscription.push) and this writes them, a slice at a time: requests and
        newer events go on between slices, and when the writes fall behind the events, a subscriber's turn
        takes everything handed over since its last turn in one write. At low rates that is one event per
        write, one loop turn after the commit; at 10,000 riders and more events a second than one pass of
        writes takes, the writes per event fall and the delay stays one pass (docs/notifications.md)."""
        dirty = self._dirty
        n = min(len(dirty), FLUSH_CHUNK)
        for _ in range(n):
            dirty.popleft().write_out()
        self.metrics.inc("push_writes", n)
        if dirty:
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._flushing = False

    # ---- detached SSE streams: the ASGI call ended, the event log writes and ends the connection ------
    def detach(self, sub: Subscription, keepalive_s: float) -> bool:
        """A direct SSE subscription whose connection this log now owns (api/push/wire.py SseWire.detach):
        keep-alives and noticing a closed connection are this log's housekeeping (one pass over the
        detached streams), ending the body its on_close. False: the caller keeps the connection."""
        wire = sub.wire
        if wire is None or not hasattr(wire, "detach") or sub.closed \
                or not wire.detach(lambda: sub.close("client disconnected")):
            return False
        sub.task = None
        sub.keepalive_s = keepalive_s
        sub.due = time.monotonic() + keepalive_s
        sub.on_close = self._end_detached
        self._detached.add(sub)
        self.metrics.inc("subscribers_detached")
        return True

    def _end_detached(self, sub: Subscription) -> None:
        self._detached.discard(sub)
        last = b""
        if sub.cut or sub.reason == SESSION_ENDED:
            last = b"event: error\ndata: %s\n\n" % json.dumps({"reason": sub.reason}).encode()
        sub.wire.finish(last)

    def _tend_detached(self) -> None:
        now = time.monotonic()
        for sub in tuple(self._detached):
            wire = sub.wire
            if wire.gone():
                sub.close("client disconnected")
                continue
            if not wire.released:
                wire.release_scope()   # the ASGI call has ended by now
            if sub.due is not None and sub.due <= now:
                sub.keepalive()
                sub.due = now + (sub.keepalive_s or 15.0)

    def close_all(self, reason: str) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        for sub in list(self._operators) + [s for subs in self._riders.values() for s in subs]:
            sub.close(reason)

    # ---- reading -----------------------------------------------------------------------
    async def check_cursor(self, raw: str | None) -> int | None:
        """The cursor a client sent, checked; CursorError when it is not one this log issued."""
        try:
            return parse_cursor(raw, self.head)
        except CursorError:
            if self.bus is not None:   # another replica may have handed it out a moment before it reached here
                return parse_cursor(raw, await self.bus.last_seq())
            if not self.shared:
                raise
        # several processes: another replica may have issued it a moment before this one published it
        top = await self._newest_id()
        cursor = parse_cursor(raw, top)
        self.catch_up(top)
        return cursor

    def open(self, who: Principal, after: int | None) -> Subscription:
        """A subscription from `after` (None: from now). Call backlog() until it is live.

        Each user account holds at most `max_streams_per_user` at once (SSE, WebSocket subscriptions
        and held long polls together): TooManyStreams past that. One rider held 400 SSE streams, each
        a buffer and a task here; a phone needs one. The admin token (automation) is not capped."""
        uid = who.user_id
        if uid is not None:
            held = self._streams.get(uid)
            if held is not None and len(held) >= self.max_streams_per_user:
                self.metrics.inc("streams_refused")
                raise TooManyStreams(f"you already have {len(held)} open event streams, the most allowed "
                                     f"(LATCH_MAX_STREAMS_PER_USER); close one, or resume with your cursor")
        sub = Subscription(who, self.head if after is None else after, self.buffer, self)
        if uid is not None:
            self._streams.setdefault(uid, set()).add(sub)
        return sub

    def _release_stream(self, sub: Subscription) -> None:
        held = self._streams.get(sub.user_id) if sub.user_id is not None else None
        if held is not None:
            held.discard(sub)
            if not held:
                del self._streams[sub.user_id]   # type: ignore[arg-type]

    def end_sessions(self, user_id: str, only: str | None = None, keep: str | None = None) -> int:
        """Close the user's open streams of session `only` (logout), or of every session but `keep`
        (password change, deletion): a revoked session stops receiving at once here; other replicas
        find out at their next recheck (still_allowed). How many were closed."""
        ended = [sub for sub in self._streams.get(user_id, ())
                 if (only is None or sub.session_id == only) and (keep is None or sub.session_id != keep)]
        for sub in ended:
            sub.close(SESSION_ENDED)
        return len(ended)

    async def still_allowed(self, sub: Subscription) -> bool:
        """Whether the stream may go on: the sessions behind every open stream are re-read together every
        SESSION_RECHECK_S (_recheck_sessions: a revocation made on another replica), and a revoked one's
        streams closed; one query for all of them, not one per stream."""
        return not sub.closed

    async def _recheck_sessions(self) -> None:
        """Housekeeping, once a second: the collector's freezes (api/heap.py); every SESSION_RECHECK_S
        the sessions of every open stream."""
        last = time.monotonic()
        heap_at = last
        while True:
            await asyncio.sleep(min(HOUSEKEEPING_S, max(0.05, self.settings.sse_keepalive_s)))
            try:
                self._tend_detached()
            except Exception:
                log.exception("tending detached streams failed")
            if time.monotonic() - heap_at >= HOUSEKEEPING_S:
                heap_at = time.monotonic()
                try:
                    self.heap.tick(len(self))
                except Exception:
                    log.exception("heap housekeeping failed")
            if self.confirm is None or time.monotonic() - last < SESSION_RECHECK_S:
                continue
            last = time.monotonic()
            try:
                await self.recheck_sessions()
            except Exception:
                log.exception("re-reading the sessions of open streams failed; trying again")

    async def recheck_sessions(self) -> int:
        """Close every open stream whose session was revoked, ended or whose user was deleted; how many."""
        subs = [sub for held in self._streams.values() for sub in held if sub.session_id is not None]
        if not subs:
            return 0
        sids = sorted({sub.session_id for sub in subs if sub.session_id is not None})
        good: dict[str, str] = {}
        for i in range(0, len(sids), RECHECK_CHUNK):
            chunk = sids[i:i + RECHECK_CHUNK]
            good.update(await self.db.read(lambda s, chunk=chunk: _sessions_standing(s, chunk)))
        ended = 0
        for sub in subs:
            if not sub.closed and good.get(sub.session_id or "") != sub.user_id:
                sub.close(SESSION_ENDED)
                ended += 1
        return ended

    async def backlog(self, sub: Subscription, limit: int | None = None) -> list[LiveEvent]:
        """The next page of visible events after the subscription's cursor. When the page is the last
        of what is in memory, the subscription turns live in the same step, so nothing falls between."""
        limit = limit or self.page
        if sub.cursor >= self.floor:
            page = self._ring_after(sub, limit)
            if page:
                sub.cursor = page[-1].id
            if len(page) < limit and not sub.closed:
                self._add(sub)
            return page
        if self.bus is not None:   # further back than the ring: read from the stream itself
            page, covered = await self.bus.read(sub.cursor, self.head, None if sub.operator else sub.user_id, limit)
            if not sub.operator and sub.user_id is not None:
                user_id = sub.user_id
                page = [mine for ev in page if (mine := self._for_rider(ev, user_id)) is not None]
        else:
            page, covered = await self._db_page(sub, limit)
        sub.cursor = max(sub.cursor, covered)
        return page

    def _ring_after(self, sub: Subscription, limit: int) -> list[LiveEvent]:
        i = bisect.bisect_right(self.ring, sub.cursor, key=_event_id)
        tail = itertools.islice(self.ring, i, None)
        if not sub.operator:
            user_id = sub.user_id
            tail = (mine for ev in tail if user_id is not None and (mine := self._for_rider(ev, user_id)) is not None)
        return list(itertools.islice(tail, limit))

    def _for_rider(self, ev: LiveEvent, user_id: str) -> LiveEvent | None:
        if ev.audience == user_id:
            return ev
        if ev.audience == RIDERS and self.personalize is not None:
            return self.personalize(ev, user_id)
        return None

    async def _db_page(self, sub: Subscription, limit: int) -> tuple[list[LiveEvent], int]:
        after, operator, user_id = sub.cursor, sub.operator, sub.user_id

        def load(s: Session) -> tuple[list[LiveEvent], int]:
            top = s.exec(select(func.max(col(LogEvent.id)))).one() or 0   # first: the page is read up to here
            q = select(LogEvent).where(col(LogEvent.id) > after, col(LogEvent.id) <= top)
            if not operator:
                q = q.where(col(LogEvent.audience).in_((user_id, RIDERS)))
            rows = s.exec(q.order_by(col(LogEvent.id)).limit(limit)).all()
            covered = rows[-1].id if len(rows) >= limit else top
            return [LiveEvent.from_row(r) for r in rows], int(covered or after)

        self.metrics.inc("event_backlog_queries")
        page, covered = await self.db.read(load)
        if not operator and user_id is not None:   # here, on the loop: personalize keeps in-memory state
            page = [mine for ev in page if (mine := self._for_rider(ev, user_id)) is not None]
        return page, covered


def _event_id(ev: LiveEvent) -> int:
    return ev.id


RECHECK_CHUNK = 500


def _sessions_standing(s: Session, sids: list[str]) -> dict[str, str]:
    """Of these session ids, the ones still accepted (not revoked, their user not deleted): id -> user id."""
    from api.riders.models import User, UserSession

    rows = s.exec(select(UserSession.id, UserSession.user_id)
                  .join(User, col(User.id) == col(UserSession.user_id))
                  .where(col(UserSession.id).in_(sids), col(UserSession.revoked_at).is_(None),
                         col(User.deleted_at).is_(None))).all()
    return {sid: uid for sid, uid in rows}


OPEN_FILES_WARN_BELOW = 8192   # fewer open files than this: a WARNING at start (else INFO)


def raise_open_files(want: int = OPEN_FILES_WANTED) -> tuple[int, int]:
    """Every stream is a socket, so a file: raise this process's soft RLIMIT_NOFILE to its hard limit and,
    where the OS lets this process (root, CAP_SYS_RESOURCE), the hard limit to `want` (bounded by
    fs.nr_open). Otherwise the limit stays, a warning says so: set `ulimit -n` (LimitNOFILE= in a systemd
    unit, `nofile` in /etc/security/limits.conf, `--ulimit nofile=` for docker) before starting Latch."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        ceiling = int(open("/proc/sys/fs/nr_open").read())
    except (OSError, ValueError):
        ceiling = want
    target = min(want, ceiling)
    if hard != resource.RLIM_INFINITY and hard < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target, target
        except (ValueError, OSError):
            pass
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < target:
        # a warning only where it bites a small deployment (a few thousand streams); a limit in the tens of
        # thousands is a normal machine's, and a normal start stays free of warnings (issue 17)
        level = logging.WARNING if soft < OPEN_FILES_WARN_BELOW else logging.INFO
        log.log(level, "open files limited to %d (RLIMIT_NOFILE): each event stream holds one; for more "
                "streams raise it with `ulimit -n %d` (or LimitNOFILE=) before starting Latch", soft, target)
    return soft, hard

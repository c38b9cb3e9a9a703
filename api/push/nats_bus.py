"""Events across API replicas on NATS JetStream (LATCH_NATS_URL): the outbox relay, the live feed, the backlog.

    a change's transaction ──▶ event row + event_outbox row (same transaction: nothing committed is lost)
              commit ──▶ relay (this replica, in commit order) ──publish, Nats-Msg-Id──▶ JetStream stream
                                        ◀──PubAck(seq)── event.seq = seq, outbox row deleted
    every replica ◀── ordered consumer from its head ── the stream: EventLog publishes each event, id = seq

The JetStream stream sequence is the cursor every client holds (SSE `id:`, WebSocket, polls), on every
replica: all replicas read one stream in one order, so a rider who drops from replica A and reconnects to
replica B with its cursor gets exactly the events after it — from B's ring of recent events, or, further
back, read from the stream itself (`read`). There is no ordering lock in the database and no replica reads
another's commits back: PostgreSQL's advisory lock and NOTIFY (api/pg_bus.py) are not used for events when
NATS is configured.

Subjects partition the stream (`latch.<stream>.`…): `u.<user id>` an event for one rider, `riders` an event
offered to every rider (notifications), `d.<device id>` a device's events for operators, `ops.<kind>` other
operators' events. Operators read `>`; a rider's backlog reads its own subject and `riders` only.

No loss, no duplicates:
- The outbox row commits with the change. The relay publishes what this replica committed, in commit
  order, and deletes the outbox rows JetStream acknowledged. While NATS is unreachable the relay stops
  and, every SWEEP_DEGRADED_S, tries again from the outbox table in id order; rows another replica left
  behind (it crashed) are relayed by anyone after ORPHAN_MS.
- A message may be published twice (the acknowledgement was lost, a sweep and the live relay overlapped):
  its `Nats-Msg-Id` (the event's database id and time) makes JetStream store it once within the stream's
  duplicate window (LATCH_NATS_DUPLICATE_WINDOW_S, 10 minutes by default), so a relay retried within that
  window after NATS comes back is not delivered twice.
- Each replica's ordered consumer delivers every sequence once, in order, and recreates itself from its
  last sequence after NATS restarts (nats-py).

Latency: an event reaches local subscribers after the JetStream round trip (~1 ms on loopback). A
`?wait=` answer does not wait for it (api/commands/service.py answers from the command in hand).

Why one module of ~450 lines: the outbox relay, the live consumer and the backlog read share the stream's
sequence as the cursor and the outbox's commit order; each half is short and they change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.js import api as js_api
from sqlalchemy import bindparam, delete, false, or_, select, update

from api.background import reraise_if_stopping
from api.clock import now_ms
from api.db import Database, Priority
from api.metrics import Metrics
from api.push.event_models import RIDERS, EventOutbox, LogEvent
from broker.identity import SERVICE_USERNAME
from foundation.settings import Settings
from protocol import topics

if TYPE_CHECKING:
    from sqlmodel import Session

# api/push/events.py's LiveEvent, which EventLog hands in (start()'s `make`): not imported, so that this module, which
# api/push/events.py uses, does not point back up at it
LiveEvent = Any

log = logging.getLogger("latch.nats")

BATCH = 500                 # events published per relay round, outbox rows read per sweep page
ACK_TIMEOUT_S = 5.0         # JetStream acknowledgements of one round
SWEEP_S = 5.0               # how often the outbox is checked for rows another replica left behind
SWEEP_DEGRADED_S = 0.5      # how often the relay tries again while NATS is unreachable
ORPHAN_MS = 10_000          # an outbox row this old is relayed by any replica (its own may have crashed)
READ_TIMEOUT_S = 5.0        # one backlog page from the stream
STOP_FLUSH_S = 2.0          # at shutdown, the longest spent relaying what is still queued
SETTLE_EVERY_S = 0.2        # at most this often, one transaction records what was relayed
RECENT_SEQS = 10_000        # acknowledged sequences kept in memory for sequence_of()
WATCH_S = 1.0               # how often the feed is compared with the stream's newest sequence
STUCK_ROUNDS = 3            # a feed behind the stream without progress this many rounds is made again
ORIGIN = "Latch-Origin"


def _rows(events: list[Any]) -> list[tuple[int, int, str, str | None, dict[str, Any]]]:
    """Committed events (their ids: database ids) as the relay publishes them, as the outbox sweep reads them."""
    return [(e.id, e.at, e.kind, e.audience, e.data) for e in events]


def subject_prefix(stream: str) -> str:
    return f"latch.{stream}"


def subject_for(prefix: str, audience: str | None, kind: str, data: dict[str, Any]) -> str:
    """The subject an event is stored under (the partition; see the module's docstring)."""
    if audience == RIDERS:
        return f"{prefix}.riders"
    if audience is not None:
        return f"{prefix}.u.{audience}" if topics.valid_device_id(audience) else f"{prefix}.ops.{kind}"
    device = data.get("device_id")
    if isinstance(device, str) and topics.valid_device_id(device):
        return f"{prefix}.d.{device}"
    return f"{prefix}.ops.{kind}"


class NatsBus:
    """One replica's connection to the event stream: relays its outbox, feeds its EventLog, reads backlogs."""

    def __init__(self, settings: Settings, db: Database, metrics: Metrics) -> None:
        assert settings.nats_url
        self.servers = [u.strip() for u in settings.nats_url.split(",") if u.strip()]
        self.stream = settings.nats_stream
        self.prefix = subject_prefix(settings.nats_stream)
        self.replicas = settings.nats_replicas
        self.max_age_s = settings.nats_max_age_s
        self.duplicate_window_s = settings.nats_duplicate_window_s
        self.origin = settings.api_client_id   # unique per replica (it is also its MQTT client id)
        # on the NATS cluster that is also Latch's MQTT broker (LATCH_NATS_AUTH_URL), logins go through Latch's
        # auth callout: the API logs in as the service (api/registry/nats_auth.py places it in the LATCH account);
        # credentials in LATCH_NATS_URL itself (nats://user:pass@host) win
        self.credentials: dict[str, str] = {}
        if settings.nats_auth_url is not None and not any("@" in u for u in self.servers):
            self.credentials = {"user": SERVICE_USERNAME, "password": settings.service_secret or ""}
        self.db = db
        self.metrics = metrics
        self.nc: Any = None
        self.js: Any = None
        self._deliver: Callable[[list[LiveEvent]], None] | None = None
        self._make: Callable[..., LiveEvent] | None = None
        self._feed: Any = None
        self._queue: list[LiveEvent] = []      # committed here, not yet handed to JetStream (ids: database ids)
        self._wake = asyncio.Event()
        self._degraded = False                 # NATS did not answer: relay from the outbox table
        self._failing = False                  # the last relay round failed (cleared by one that succeeds)
        self._relay_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.delivered = 0                     # the newest sequence the feed handed to the EventLog
        self._seqs: OrderedDict[int, int] = OrderedDict()   # database id -> sequence, the latest RECENT_SEQS
        self._seq_waiters: dict[int, list[asyncio.Future[int]]] = {}
        self._to_settle: list[dict[str, int]] = []   # relayed, not yet recorded: {"i": database id, "s": sequence}
        self._settle_wake = asyncio.Event()
        self._settled = asyncio.Event()          # nothing left to record
        self._settled.set()
        self._settle_task: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- life ----------------------------------------------------------------------------
    async def start(self, deliver: Callable[[list[LiveEvent]], None], make: Callable[..., LiveEvent]) -> int:
        """Connect, make sure the stream exists, relay what the outbox holds, and feed `deliver` with every
        event after the stream's newest, which is returned (the head). A NATS that cannot be reached at
        start stops the start, with the address in the message."""
        self._deliver, self._make = deliver, make
        try:
            self.nc = await nats.connect(servers=self.servers, connect_timeout=5, max_reconnect_attempts=-1,
                                         **self.credentials,
                                         reconnect_time_wait=0.25, allow_reconnect=True,
                                         name=f"latch-api {self.origin}",
                                         error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                                         reconnected_cb=self._on_reconnected)
        except Exception as e:
            raise RuntimeError(f"cannot reach NATS at {','.join(self.servers)} (LATCH_NATS_URL): {e!r}") from e
        self.js = self.nc.jetstream(timeout=ACK_TIMEOUT_S)
        await self._ensure_stream()
        head = self.delivered = await self.last_seq()
        await self._subscribe()
        self._degraded = True   # first round: whatever the outbox holds from before (a crash, NATS away)
        loop = asyncio.get_running_loop()
        self._relay_task = loop.create_task(self._relay(), name="latch-nats-relay")
        self._watch_task = loop.create_task(self._watch(), name="latch-nats-watch")
        self._settle_task = loop.create_task(self._settle(), name="latch-nats-settle")
        log.info("events on NATS JetStream: stream %s at %s, from sequence %d", self.stream,
                 ",".join(self.servers), head + 1)
        return head

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._watch_task, self._relay_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._queue and not self._degraded:   # what is left: now, briefly; else the outbox keeps it
            left, self._queue = self._queue, []
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._publish(_rows(left)),
                                       STOP_FLUSH_S)
        with contextlib.suppress(asyncio.TimeoutError):   # what was relayed gets recorded, briefly
            self._settle_wake.set()
            await asyncio.wait_for(self._settled.wait(), STOP_FLUSH_S)
        if self._settle_task is not None:
            self._settle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settle_task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def _ensure_stream(self) -> None:
        config = js_api.StreamConfig(
            name=self.stream, subjects=[f"{self.prefix}.>"], storage=js_api.StorageType.FILE,
            retention=js_api.RetentionPolicy.LIMITS, max_age=self.max_age_s, num_replicas=self.replicas,
            duplicate_window=self.duplicate_window_s, allow_direct=True)
        try:
            await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            log.info("created JetStream stream %s (%d replica(s), events kept %.0f s)", self.stream,
                     self.replicas, self.max_age_s)

    @property
    def connected(self) -> bool:
        """Connected, and the last relay round was acknowledged."""
        return self.nc is not None and self.nc.is_connected and not self._failing

    async def last_seq(self) -> int:
        """The stream's newest sequence: the newest cursor any replica may have handed out."""
        info = await self.js.stream_info(self.stream)
        return int(info.state.last_seq)

    async def _on_error(self, e: Exception) -> None:
        log.debug("NATS: %r", e)

    async def _on_disconnected(self) -> None:
        if not self._stopping:
            log.warning("lost the connection to NATS; reconnecting (events wait in the outbox)")

    async def _on_reconnected(self) -> None:
        log.info("connected to NATS again")
        self._wake.set()

    # ---- the live feed: every replica, every event, in stream order -------------------------------
    async def _subscribe(self) -> None:
        """The feed: an ordered consumer of the whole stream from the sequence after the newest delivered."""
        self._feed = await self.js.subscribe(
            f"{self.prefix}.>", stream=self.stream, ordered_consumer=True, cb=self._on_msg, idle_heartbeat=2.0,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            config=js_api.ConsumerConfig(opt_start_seq=self.delivered + 1))

    async def _watch(self) -> None:
        """nats-py remakes an ordered consumer that stops (missed heartbeats), but a remake that fails while
        NATS restarts is not retried reliably (its check task can end on the error). So: when the stream has
        newer events than the feed delivered and the feed made no progress for STUCK_ROUNDS checks, the
        feed is made again from where it stopped (a message delivered twice is skipped by the EventLog)."""
        stuck, seen = 0, self.delivered
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                behind = await self.last_seq() > self.delivered
            except (Exception, asyncio.CancelledError) as e:
                reraise_if_stopping()
                log.debug("NATS stream info failed: %r", e)
                continue
            stuck = stuck + 1 if behind and self.delivered == seen else 0
            seen = self.delivered
            if stuck < STUCK_ROUNDS:
                continue
            stuck = 0
            log.warning("the NATS feed stopped at sequence %d: making it again", self.delivered)
            self.metrics.inc("nats_feed_restarts")
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._feed.unsubscribe(), ACK_TIMEOUT_S)
            reraise_if_stopping()
            try:
                await asyncio.wait_for(self._subscribe(), ACK_TIMEOUT_S)
            except (Exception, asyncio.CancelledError) as e:
                reraise_if_stopping()
                log.warning("making the NATS feed again failed (%r); trying again", e)

    async def _on_msg(self, msg: Any) -> None:
        try:
            seq = int(msg.metadata.sequence.stream)
            at, kind, audience, data = orjson.loads(msg.data)
            origin = (msg.headers or {}).get(ORIGIN)
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("ignored a malformed message on %s: %r", msg.subject, e)
            return
        assert self._deliver is not None and self._make is not None
        if seq <= self.delivered:   # a remade feed's overlap
            return
        self.delivered = seq
        self._deliver([self._make(seq, kind, int(at), audience, data, origin == self.origin)])

    # ---- the backlog: further back than a replica's ring -----------------------------------------
    async def read(self, after: int, upto: int, user_id: str | None, limit: int) -> tuple[list[LiveEvent], int]:
        """Up to `limit` events after `after` (a rider's own and those offered to every rider; all for an
        operator), and the sequence the page covers (`upto` when it holds everything up to there)."""
        filters = [f"{self.prefix}.u.{user_id}", f"{self.prefix}.riders"] if user_id is not None else None
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1,
            ack_policy=js_api.AckPolicy.NONE, filter_subjects=filters, inactive_threshold=30.0,
            mem_storage=True, num_replicas=1)
        sub = await self.js.pull_subscribe(f"{self.prefix}.>", stream=self.stream, config=config)
        try:
            pending = int((await sub.consumer_info()).num_pending)
            msgs = await sub.fetch(min(limit, pending), timeout=READ_TIMEOUT_S) if pending else []
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(self.stream, sub._consumer)
        self.metrics.inc("event_backlog_reads")
        assert self._make is not None
        page = []
        for m in msgs:
            at, kind, audience, data = orjson.loads(m.data)
            page.append(self._make(int(m.metadata.sequence.stream), kind, int(at), audience, data, False))
        covered = page[-1].id if len(page) >= limit else max(upto, page[-1].id if page else upto)
        return page, covered

    # ---- the relay: this replica's committed events into the stream ------------------------------
    def stage(self, s: "Session", event_ids: list[int]) -> None:
        """In the transaction that appends the events (api/push/events.py): their outbox rows."""
        s.connection().execute(EventOutbox.__table__.insert(),   # type: ignore[attr-defined]
                               [{"event_id": i, "origin": self.origin} for i in event_ids])

    def hand_over(self, events: list[LiveEvent]) -> None:
        """On the loop, once the transaction is durable: relay these (their ids are database ids)."""
        if not self._degraded:
            self._queue.extend(events)
        self._wake.set()

    async def sequence_of(self, db_id: int, timeout: float = ACK_TIMEOUT_S) -> int | None:
        """The stream sequence (the cursor) JetStream gave the event with this database id, once relayed:
        at once when it already was, else when it is (None after `timeout`: NATS away)."""
        seq = self._seqs.get(db_id)
        if seq is not None:
            return seq
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._seq_waiters.setdefault(db_id, []).append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiting = self._seq_waiters.get(db_id)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(fut)
                if not waiting:
                    del self._seq_waiters[db_id]

    def _acknowledged(self, db_id: int, seq: int) -> None:
        self._seqs[db_id] = seq
        if len(self._seqs) > RECENT_SEQS:
            self._seqs.popitem(last=False)
        for fut in self._seq_waiters.pop(db_id, ()):
            if not fut.done():
                fut.set_result(seq)

    def _headers(self, db_id: int, at: int) -> dict[str, str]:
        return {"Nats-Msg-Id": f"{db_id}.{at}", ORIGIN: self.origin}

    async def _relay(self) -> None:
        while True:
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), SWEEP_DEGRADED_S if self._degraded else SWEEP_S)
                self._wake.clear()
                if self._degraded or not self._queue:
                    await self._sweep(own=self._degraded)
                while self._queue:
                    batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
                    await self._publish(_rows(batch))
            except (Exception, asyncio.CancelledError) as e:
                # a CancelledError that is not this task's own stop: nats-py cancels the futures of unanswered
                # publishes when its connection is lost; it once ended this loop for good (CI, 2026-12-07)
                reraise_if_stopping()
                if not self._degraded:
                    log.warning("relaying events to NATS failed (%r): they wait in the outbox and are "
                                "relayed when NATS answers again", e)
                self._degraded = self._failing = True
                self._queue.clear()   # every one of them is in the outbox: the sweep relays them in order
                self.metrics.inc("nats_relay_failures")

    async def _sweep(self, own: bool) -> None:
        """Relay outbox rows in id order: this replica's (`own`: after a failure or a start) and any left
        behind for ORPHAN_MS by a replica that stopped. Leaves degraded mode when its own are all out."""
        if own:
            self._degraded = False   # events committed from here on are relayed live (a duplicate is stored once)
        origin = self.origin
        for _ in range(1000):   # bounded: 500,000 rows per sweep
            old = now_ms() - ORPHAN_MS

            def load(s: Session) -> list[tuple[int, int, str, str | None, dict[str, Any]]]:
                ev, ob = LogEvent.__table__, EventOutbox.__table__   # type: ignore[attr-defined]
                mine = (ob.c.origin == origin) if own else false()
                q = (select(ev.c.id, ev.c.at, ev.c.kind, ev.c.audience, ev.c.data)
                     .select_from(ob.join(ev, ev.c.id == ob.c.event_id))
                     .where(or_(mine, ev.c.at < old)).order_by(ob.c.event_id).limit(BATCH))
                return [tuple(r) for r in s.connection().execute(q).all()]   # type: ignore[misc]

            rows = await self.db.read(load)
            if not rows:
                return
            await self._publish(rows)
            if len(rows) < BATCH:
                return

    async def _publish(self, rows: list[tuple[int, int, str, str | None, dict[str, Any]]]) -> None:
        """Publish in order, then record each one's sequence and drop its outbox row (one write)."""
        futures = []
        for db_id, at, kind, audience, data in rows:
            payload = orjson.dumps([at, kind, audience, data])
            futures.append(await self.js.publish_async(subject_for(self.prefix, audience, kind, data), payload,
                                                       headers=self._headers(db_id, at)))
        try:
            acks = await asyncio.wait_for(asyncio.gather(*futures), ACK_TIMEOUT_S)
        except asyncio.CancelledError:
            reraise_if_stopping()
            raise ConnectionError("NATS dropped unanswered publishes (its connection was lost)") from None
        finally:
            for f in futures:   # unanswered: give back nats-py's slots for pending publishes
                if not f.done():
                    f.cancel()
        self._failing = False
        done = [{"i": r[0], "s": int(a.seq)} for r, a in zip(rows, acks, strict=True)]
        for d in done:
            self._acknowledged(d["i"], d["s"])
        self.metrics.inc("nats_relayed", len(done))
        self.metrics.inc("nats_duplicates", sum(1 for a in acks if a.duplicate))
        self._to_settle.extend(done)
        self._settled.clear()
        self._settle_wake.set()

    async def _settle(self) -> None:
        """Record the sequences and drop the outbox rows of what JetStream acknowledged: one transaction per
        SETTLE_EVERY_S at most, not one per relay round (measured: per round it cost more API CPU per command
        than the relay itself). Until then a row stays in the outbox, which is harmless: only a failed relay or
        a row ORPHAN_MS old is relayed again from it, and a repeat is stored once."""
        ev, ob = LogEvent.__table__, EventOutbox.__table__   # type: ignore[attr-defined]
        set_seq = update(ev).where(ev.c.id == bindparam("i")).values(seq=bindparam("s"))
        while True:
            await self._settle_wake.wait()
            self._settle_wake.clear()
            done, self._to_settle = self._to_settle, []
            if done:
                def settle(s: Session, done: list[dict[str, int]] = done) -> None:
                    conn = s.connection()
                    conn.execute(set_seq, done)
                    conn.execute(delete(ob).where(ob.c.event_id.in_([d["i"] for d in done])))
                    s.commit()
                try:
                    await self.db.write(settle, Priority.ROUTINE)
                except (Exception, asyncio.CancelledError) as e:
                    reraise_if_stopping()
                    log.warning("recording %d relayed events failed (%r); trying again", len(done), e)
                    self._to_settle[:0] = done
            if not self._to_settle:
                self._settled.set()
            await asyncio.sleep(SETTLE_EVERY_S)
            if self._to_settle:
                self._settle_wake.set()

"""The API's metrics: one Prometheus CollectorRegistry per app, served at GET /metrics (api/routes/health.py).

Owns what is counted and how it is exposed (docs/observability.md lists every family):
- `Metrics.inc(name, n)`: the named event counters the services bump (commands_created, acks_succeeded,
  dropped_malformed, ...; a bounded set of names made in code). Plain ints in a dict, exposed at scrape time
  as `latch_api_events_total{event=...}`, and as JSON at GET /v1/metrics (`snapshot`).
- `Metrics.command_changed(cmd, history, entered_ms)`: per command transition, the stage histogram
  `latch_command_stage_seconds{stage}` (accepted -> sent -> received -> final) and the counters of
  commands created and finished by action and final status. Called where a transition is applied.
- the HTTP middleware (`HttpMetrics`) and the database transaction timer (`time_transactions`).
- queue depths read when scraped (api/runtime_metrics.py, which knows the runtime this module must not).

Label values come from fixed sets only (action, status, stage, route template, status class): never a
device id or a command id.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from api.commands.states import Status, is_final

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from api.models import CommandRow, HistoryRow

# seconds: a command stage is milliseconds on a quiet system, up to its TTL (30 s by default) on a bad day
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))


def _stage_end(status: Status) -> str:
    return "final" if is_final(status) else status.value


def _stage_start(status: Status) -> str:
    return "accepted" if status == Status.QUEUED else status.value


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.commands_created = PromCounter("latch_commands_created", "Commands accepted, by action",
                                            ["action"], registry=r)
        self.commands_finished = PromCounter("latch_commands_finished",
                                             "Commands that reached a final status, by action and that status",
                                             ["action", "status"], registry=r)
        self.stage_seconds = Histogram(
            "latch_command_stage_seconds",
            "Time a command spent in one stage: accepted_to_sent, sent_to_received, received_to_final "
            "(and the shortcuts sent_to_final, accepted_to_final, accepted_to_received)",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.final_seconds = Histogram("latch_command_final_seconds",
                                       "Time from a command's acceptance to its final status, by action",
                                       ["action"], buckets=STAGE_BUCKETS, registry=r)
        self.http_seconds = Histogram(
            "latch_http_request_duration_seconds",
            "HTTP requests by method, route template and status class (streams and held polls included)",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=r)
        self.db_seconds = Histogram("latch_db_transaction_seconds",
                                    "Database transactions, BEGIN to COMMIT or ROLLBACK (reads end in rollback)",
                                    ["end"], buckets=DB_BUCKETS, registry=r)
        r.register(_EventCounts(self.counts))
        ProcessCollector(registry=r)   # process_cpu_seconds_total, process_resident_memory_bytes, ...
        # the registry's count of devices online, set by GET /metrics before each scrape (every replica reports
        # the same); read by api/runtime_metrics.py's collector
        self.devices_online: int | None = None

    # ---- the named counters (GET /v1/metrics and latch_api_events_total) -------------
    def inc(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    # ---- commands ---------------------------------------------------------------------
    def command_changed(self, cmd: CommandRow, history: list[HistoryRow], entered_ms: int) -> None:
        """The applied transitions in `history` (one change of `cmd`), the command having entered the
        status they start from at `entered_ms` (its previous updated_at; created_at for a new command)."""
        elapsed = max(0.0, (time.time() * 1000 - entered_ms) / 1000)
        for h in history:
            if not h.applied or h.to_status is None:
                continue
            to = Status(h.to_status)
            if h.from_status is None:     # "created"
                self.commands_created.labels(cmd.action).inc()
                continue
            self.stage_seconds.labels(f"{_stage_start(Status(h.from_status))}_to_{_stage_end(to)}").observe(elapsed)
            if is_final(to):
                self.commands_finished.labels(cmd.action, to.value).inc()
                self.final_seconds.labels(cmd.action).observe(max(0.0, (time.time() * 1000 - cmd.created_at) / 1000))


class _EventCounts(Collector):
    """latch_api_events_total{event}: the `Metrics.inc` names, read when scraped."""

    def __init__(self, counts: Counter[str]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily("latch_api_events", "What the API saw and refused, by event name "
                                     "(the counters of GET /v1/metrics)", labels=["event"])
        for name, value in sorted(self._counts.items()):
            family.add_metric([name], value)
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily("latch_api_events", "", labels=["event"])


def time_transactions(engine: Engine, metrics: Metrics) -> None:
    """Time every transaction of `engine` (the sync engine, or an async engine's sync_engine): two clock
    reads and one histogram observation per transaction, through SQLAlchemy's connection events."""
    observe = metrics.db_seconds.labels

    def begin(conn: Any) -> None:
        conn.info["latch_tx_started"] = time.perf_counter()

    def end(kind: str) -> Any:
        hist = observe(kind)

        def done(conn: Any) -> None:
            try:
                started = conn.info.pop("latch_tx_started", None)
            except sa_exc.SQLAlchemyError:
                # the connection is already invalid (a query cancelled mid-flight, then rolled back): nothing
                # to time, and raising here would replace the CancelledError that is on its way out
                return
            if started is not None:
                hist.observe(time.perf_counter() - started)
        return done

    sa_event.listen(engine, "begin", begin)
    sa_event.listen(engine, "commit", end("commit"))
    sa_event.listen(engine, "rollback", end("rollback"))


class HttpMetrics:
    """ASGI middleware: latch_http_request_duration_seconds by method, route template (the path a route was
    declared with, `unmatched` for 404s) and status class (2xx ...). HTTP only: WebSockets are not timed."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.hist = metrics.http_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) if route is not None else None
            if template is not None and template == "" and hasattr(route, "app"):
                template = "/static"   # the static files' mount
            method = scope.get("method", "GET")
            self.hist.labels(method if method in METHODS else "other", template or "unmatched",
                             f"{status[0] // 100}xx").observe(time.perf_counter() - started)

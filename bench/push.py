"""Push fan-out benchmark: N subscribers per transport on one Latch.

Default (`--mode notify`, issue 14 section 2): N rider accounts, each holding one SSE or WebSocket stream,
and notifications to all riders (POST /v1/notifications, audience all, transactional) at a fixed rate.
Delivery latency runs from the notification's `at` to its arrival at each rider; "lost" counts
(notification, rider) pairs that never arrived; memory per subscriber is the server's RSS growth / N;
CPU per delivery is the server's CPU time in the window / deliveries. `--idle S` holds the subscribers idle
S seconds and sends one notification (50,000 idle riders: `--sizes 50000 --idle 10`).

    python -m bench.push                                      # 10,000 riders, SSE then WebSocket, 10/s for 10 s
    python -m bench.push --transports sse --sizes 50000 --idle 10
    python -m bench.push --profile                           # py-spy the server during the window

`--mode commands` is the older run: N operator subscribers of one transport (SSE, WebSocket, long polling)
and commands at a fixed rate:

Starts `latch serve` (broker + API + a small simulated fleet) as a subprocess, connects N operator
subscribers of one transport over loopback (lean asyncio clients, so the client is not the
bottleneck), then sends commands at a fixed rate through the HTTP API. Each command makes three or
four events (queued, sent, [received,] succeeded) that every subscriber must receive. Delivery latency
runs from the event's append time (its `at`, stamped in the transaction) to its arrival at each
subscriber: p50/p99 over all deliveries, and per event the time until the *last* subscriber had it.
Also: the server's memory per subscriber (RSS growth / N) and its CPU during the publishing window.

    python -m bench.push --mode commands --sizes 1000,10000 --rate 2   # SSE, WebSocket, long polling

Figures are printed and written to bench/results/push-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.ports import free_port
from bench.procs import Proc, rss_kib

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-push-token"
AT = re.compile(rb'"id":(\d+),"kind":"[a-z_]+","at":(\d+)')


def now_ms() -> float:
    return time.time_ns() / 1e6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))], 1)


class Recorder:
    """Every (event id, latency) seen by any subscriber."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.last: dict[int, float] = {}   # event id -> latest arrival latency (the last subscriber)
        self.count: dict[int, int] = {}
        self.recording = False

    def seen(self, chunk: bytes) -> int:
        t = now_ms()
        newest = -1
        for m in AT.finditer(chunk):
            eid, at = int(m.group(1)), int(m.group(2))
            newest = max(newest, eid)
            if self.recording:
                lat = t - at
                self.latencies.append(lat)
                if lat > self.last.get(eid, -1.0):
                    self.last[eid] = lat
                self.count[eid] = self.count.get(eid, 0) + 1
        return newest


class SseClient(asyncio.Protocol):
    def __init__(self, rec: Recorder, request: bytes, ready: asyncio.Future[None]) -> None:
        self.rec, self.request, self.ready = rec, request, ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.ready.done() and b"event: ready" in data:
            self.ready.set_result(None)
        self.rec.seen(data)


class WsClient(asyncio.Protocol):
    """A minimal RFC 6455 client: no extensions (so no per-message compression), text frames only."""

    def __init__(self, rec: Recorder, request: bytes, ready: asyncio.Future[None]) -> None:
        self.rec, self.request, self.ready = rec, request, ready
        self.buf = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        assert self.transport is not None
        self.transport.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            self.upgraded = True
            self.buf = rest
            self.send_text(json.dumps({"type": "subscribe", "after": None}))
        while len(self.buf) >= 2:
            n = self.buf[1] & 0x7F
            off = 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, off = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, off = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < off + n:
                return
            frame, self.buf = self.buf[off:off + n], self.buf[off + n:]
            if not self.ready.done() and frame.startswith(b'{"type": "subscribed"'):
                self.ready.set_result(None)
            self.rec.seen(frame)


class LongPollClient(asyncio.Protocol):
    """Keep-alive HTTP/1.1 long polls: on each answer, ask again from the new cursor."""

    def __init__(self, rec: Recorder, host: str, cursor: int, ready: asyncio.Future[None]) -> None:
        self.rec, self.host, self.cursor, self.ready = rec, host, cursor, ready
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def ask(self) -> None:
        assert self.transport is not None
        self.transport.write(f"GET /v1/events?after={self.cursor}&wait=30&limit=1000 HTTP/1.1\r\nHost: {self.host}\r\n"
                             f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ask()
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            m = re.search(rb"content-length: (\d+)", head, re.I)
            n = int(m.group(1)) if m else 0
            if len(rest) < n:
                return
            body, self.buf = rest[:n], rest[n:]
            cur = re.search(rb'"cursor":(\d+)}$', body)
            self.rec.seen(body)
            if cur:
                self.cursor = int(cur.group(1))
            self.ask()


@dataclass
class Result:
    transport: str
    subscribers: int
    connected: int
    rate_cmd_per_s: float
    duration_s: float
    events: int
    deliveries: int
    expected_deliveries: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    all_p50_ms: float
    all_p99_ms: float
    server_rss_mib: float
    rss_per_subscriber_kib: float
    server_cpu_pct: float
    client_cpu_pct: float
    connect_s: float


async def run(transport: str, n: int, rate: float, duration: float, data_dir: Path) -> Result:
    port = free_port()
    serve = await Proc.start("serve", "serve", "--demo-fleet", "10", "--http-port", str(port), "--mqtt-port", "0",
                             "--data-dir", str(data_dir), "--log-level", "WARNING", env={"LATCH_ADMIN_TOKEN": TOKEN})
    try:
        await serve.expect(r"Demo fleet:", timeout=120)
        serve.drain()
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            metrics = (await http.get("/v1/metrics")).json()
            head = metrics["event_head"]
            rss0 = rss_kib(serve.proc.pid)
            rec = Recorder()
            loop = asyncio.get_running_loop()
            gate = asyncio.Semaphore(200)
            transports: list[asyncio.BaseTransport] = []
            host = f"127.0.0.1:{port}"
            key = base64.b64encode(os.urandom(16)).decode()

            async def connect() -> None:
                ready: asyncio.Future[None] = loop.create_future()
                if transport == "sse":
                    req = (f"GET /v1/events/stream HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                           f"Accept: text/event-stream\r\n\r\n").encode()
                    factory = lambda: SseClient(rec, req, ready)  # noqa: E731
                elif transport == "ws":
                    req = (f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
                    factory = lambda: WsClient(rec, req, ready)  # noqa: E731
                else:
                    factory = lambda: LongPollClient(rec, host, head, ready)  # noqa: E731
                async with gate:
                    t, _ = await loop.create_connection(factory, "127.0.0.1", port)
                    transports.append(t)
                    await asyncio.wait_for(ready, 60)

            t0 = time.monotonic()
            results = await asyncio.gather(*(connect() for _ in range(n)), return_exceptions=True)
            connected = sum(1 for r in results if r is None)
            for _ in range(600):   # bounded: until the server holds them all
                if (await http.get("/v1/metrics")).json()["event_subscribers"] >= connected:
                    break
                await asyncio.sleep(0.1)
            connect_s = time.monotonic() - t0
            rss1 = rss_kib(serve.proc.pid)
            print(f"  {transport}: {connected}/{n} subscribers connected in {connect_s:.1f}s; "
                  f"server RSS +{(rss1 - rss0) / 1024:.0f} MiB", flush=True)
            head = (await http.get("/v1/metrics")).json()["event_head"]
            rec.recording = True
            cpu0, ccpu0, w0 = cpu_seconds(serve.proc.pid), time.process_time(), time.monotonic()
            sent = 0
            start = loop.time() + 0.1
            while loop.time() < start + duration:
                delay = start + sent / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                device = f"bike-{sent % 10 + 1:04d}"
                loop.create_task(http.post(f"/v1/devices/{device}/commands", json={"action": "report"}))
                sent += 1
            for _ in range(300):   # bounded: until every command is final
                counts = (await http.get("/v1/metrics")).json()["counts"]
                if sum(v for k, v in counts.items() if k.startswith("commands_") and k not in
                       ("commands_created", "commands_sent")) >= sent:
                    break
                await asyncio.sleep(0.1)
            expected_events = (await http.get("/v1/metrics")).json()["event_head"] - head
            for _ in range(600):   # bounded drain: until every subscriber has every event, or 60 s
                if len(rec.count) >= expected_events and all(c >= connected for c in rec.count.values()):
                    break
                await asyncio.sleep(0.1)
            wall = time.monotonic() - w0
            cpu = (cpu_seconds(serve.proc.pid) - cpu0) / wall * 100
            ccpu = (time.process_time() - ccpu0) / wall * 100
            for t in transports:
                t.abort()
        per_event = list(rec.last.values())
        return Result(transport=transport, subscribers=n, connected=connected, rate_cmd_per_s=rate,
                      duration_s=round(wall, 1), events=len(rec.count), deliveries=len(rec.latencies),
                      expected_deliveries=expected_events * connected, p50_ms=pct(rec.latencies, 50),
                      p99_ms=pct(rec.latencies, 99), max_ms=round(max(rec.latencies, default=float("nan")), 1),
                      all_p50_ms=pct(per_event, 50), all_p99_ms=pct(per_event, 99),
                      server_rss_mib=round(rss1 / 1024, 1),
                      rss_per_subscriber_kib=round((rss1 - rss0) / max(1, connected), 1),
                      server_cpu_pct=round(cpu, 1), client_cpu_pct=round(ccpu, 1), connect_s=round(connect_s, 1))
    finally:
        await serve.stop()


def show(r: Result) -> None:
    print(f"  {r.transport:>8} N={r.connected:>6}: {r.events} events, {r.deliveries}/{r.expected_deliveries} "
          f"deliveries | latency p50 {r.p50_ms} ms p99 {r.p99_ms} ms max {r.max_ms} ms | to all: p50 "
          f"{r.all_p50_ms} ms p99 {r.all_p99_ms} ms | server RSS {r.server_rss_mib} MiB "
          f"({r.rss_per_subscriber_kib} KiB/subscriber), CPU {r.server_cpu_pct}% | client CPU {r.client_cpu_pct}%",
          flush=True)


# ---- notify mode: riders, one notification to all of them -----------------------------------------
# Each subscriber is its own rider account (rows written straight into the bench's SQLite database, tokens
# minted with the server's JWT secret: signing up 50,000 riders through the API would take argon2 hours).
# The clients run in worker processes (at most WORKER_MAX connections each, each on its own 127.0.0.x
# source address: one address has ~28,000 ephemeral ports, one process 20,000 files here).

WORKER_MAX = 12_500
JWT_SECRET = "bench-push-jwt-secret-0123456789abcdef"
NOTIFY_BODY = {"title": "Service update", "body": "Downtown docks are open again", "category": "transactional",
               "audience": {"all": True}, "ttl_s": 600}


def _rider_rows(n: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[str]]:
    """n riders' `user` rows, one open `user_session` each, and their access tokens."""
    from api import tokens

    now = int(time.time() * 1000)
    exp_s = int(time.time()) + 6 * 3600
    users, sessions, out = [], [], []
    for i in range(n):
        uid, sid = f"bench{i:07d}", f"benchsession{i:07d}"
        users.append((uid, f"{uid}@bench.invalid", "Bench", "x", "rider", now))
        sessions.append((sid, uid, now, exp_s * 1000))
        out.append(tokens.issue(JWT_SECRET, uid, "rider", tokens.ACCESS, 6 * 3600, session_id=sid)[0])
    return users, sessions, out


def make_riders(db_path: Path, n: int) -> list[str]:
    """n rider accounts with one open session each, straight into the database; their access tokens."""
    import sqlite3

    users, sessions, out = _rider_rows(n)
    db = sqlite3.connect(db_path, timeout=60)
    with db:
        db.executemany('INSERT INTO "user" (id, email, name, password_hash, role, created_at) VALUES (?,?,?,?,?,?)',
                       users)
        db.executemany("INSERT INTO user_session (id, user_id, created_at, expires_at) VALUES (?,?,?,?)", sessions)
    db.close()
    return out


class RiderClient(asyncio.Protocol):
    """One rider's stream (SSE or WebSocket) read with as little work as the client can do: find each
    event's id and `at` in what arrives (the tail of the last read is kept, so a message split between two
    reads is found), count each id once (ids only grow on a connection)."""

    __slots__ = ("w", "request", "ready", "ws", "tail", "last", "transport", "upgraded", "pending")

    def __init__(self, w: "Worker", request: bytes, ready: asyncio.Future[None], ws: bool) -> None:
        self.w, self.request, self.ready, self.ws = w, request, ready, ws
        self.tail = b""
        self.last = 0
        self.upgraded = False
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        t = time.time() * 1000
        if not self.ready.done():
            if self.ws and not self.upgraded and b"\r\n\r\n" in data:
                self.upgraded = True
                sub = b'{"type":"subscribe","after":null}'
                assert self.transport is not None
                self.transport.write(bytes([0x81, 0x80 | len(sub)]) + b"\0\0\0\0" + sub)   # mask 0: payload as is
            if (b'"subscribed"' if self.ws else b"event: ready") in data:
                self.ready.set_result(None)
        if self.ws and self.upgraded:
            data = self._frames(data)   # answers the server's pings (it closes a socket that does not)
        chunk = self.tail + data
        w = self.w
        for m in AT.finditer(chunk):
            eid = int(m.group(1))
            if eid > self.last:
                self.last = eid
                w.got(eid, t - int(m.group(2)))
        self.tail = chunk[-300:]

    def _frames(self, data: bytes) -> bytes:
        """The text of the complete frames in what arrived (server frames are unmasked); a ping is answered."""
        buf = self.pending + data if self.pending else data
        if not self.ready.done():   # the handshake answer precedes the first frame
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep and head.startswith(b"HTTP/"):
                buf = rest
        out: list[bytes] = []
        i, n = 0, len(buf)
        while i + 2 <= n:
            op, ln, j = buf[i] & 0x0F, buf[i + 1] & 0x7F, i + 2
            if ln == 126:
                if j + 2 > n:
                    break
                ln, j = int.from_bytes(buf[j:j + 2], "big"), j + 2
            elif ln == 127:
                if j + 8 > n:
                    break
                ln, j = int.from_bytes(buf[j:j + 8], "big"), j + 8
            if j + ln > n:
                break
            if op == 0x9 and self.transport is not None:   # ping -> pong, masked with 0 (payload as is)
                self.transport.write(bytes([0x8A, 0x80 | ln]) + b"\0\0\0\0" + buf[j:j + ln])
            elif op in (0x1, 0x0):
                out.append(buf[j:j + ln])
            i = j + ln
        self.pending = buf[i:]
        return b"\n".join(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.w.lost += 1


class Worker:
    def __init__(self) -> None:
        self.lat: dict[int, list[float]] = {}
        self.lost = 0

    def got(self, eid: int, lat: float) -> None:
        v = self.lat.get(eid)
        if v is None:
            v = self.lat[eid] = []
        v.append(lat)


def worker_main(conn: Any, transport: str, port: int, source: str, tokens_: list[str]) -> None:
    """A client process: connect every rider's stream, then answer the parent's questions."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = len(tokens_) + 1000
        if hard < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))   # root may raise its hard limit
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_worker(conn, transport, port, source, tokens_))


async def _worker(conn: Any, transport: str, port: int, source: str, tokens_: list[str]) -> None:
    loop = asyncio.get_running_loop()
    w = Worker()
    host = f"127.0.0.1:{port}"
    gate = asyncio.Semaphore(100)
    transports: list[asyncio.BaseTransport] = []
    key = base64.b64encode(os.urandom(16)).decode()

    async def connect(token: str) -> None:
        ready: asyncio.Future[None] = loop.create_future()
        if transport == "ws":
            req = (f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n")
        else:
            req = (f"GET /v1/events/stream HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                   f"Accept: text/event-stream\r\n\r\n")
        async with gate:
            for attempt in range(3):   # bounded: a refused connect (accept backlog full) is tried again
                try:
                    t, _ = await loop.create_connection(lambda: RiderClient(w, req.encode(), ready, transport == "ws"),
                                                        "127.0.0.1", port, local_addr=(source, 0))
                    break
                except OSError:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.5)
            transports.append(t)
            await asyncio.wait_for(ready, 120)

    t0 = time.monotonic()
    results = await asyncio.gather(*(connect(tok) for tok in tokens_), return_exceptions=True)
    errors = [repr(r) for r in results if r is not None]
    conn.send(("connected", len(tokens_) - len(errors), time.monotonic() - t0, errors[:3]))
    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg[0] == "wait":   # until every connected stream has these ids, or the time is up
            ids, deadline = msg[1], time.monotonic() + msg[2]
            want = len(transports) - w.lost
            while time.monotonic() < deadline and not all(len(w.lat.get(i, ())) >= want for i in ids):
                await asyncio.sleep(0.05)
            conn.send(("waited", {i: w.lat.get(i, []) for i in ids}, w.lost))
        elif msg[0] == "close":
            for t in transports:
                t.abort()
            conn.send(("closed",))
            return


@dataclass
class NotifyResult:
    transport: str
    subscribers: int
    connected: int
    rate_per_s: float
    duration_s: float
    notifications: int
    deliveries: int
    expected_deliveries: int
    lost: int
    dropped_connections: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    to_all_p50_ms: float
    to_all_p99_ms: float
    server_rss_mib: float
    rss_per_subscriber_kib: float
    rss_per_subscriber_after_kib: float
    server_fds: int
    server_cpu_pct: float
    server_cpu_us_per_delivery: float
    server_sys_share: float                      # of the server's CPU, the kernel's (socket writes)
    clients_cores: float                         # the benchmark's subscriber processes, cores busy in the window
    machine_busy_cores: float
    steal_cores: float
    loadavg_before: str
    connect_s: float
    profile: list[tuple[str, float]] | None = None
    replicas: int = 1                            # API processes holding the riders (more: PostgreSQL + NATS)
    cpu_us_per_delivery_by_process: dict[str, float] | None = None   # each replica's, and nats-server's


@dataclass
class Servers:
    """What a notify run talks to: one `latch serve`, or `latch broker` + N `latch api` on PostgreSQL with
    events between them on NATS JetStream. Riders are spread over `ports` evenly."""
    ports: list[int]
    api: list[Proc]                  # the processes holding riders (their CPU, memory and files are measured)
    others: list[Proc]               # the rest (broker, nats-server)
    add_riders: Any                  # n -> access tokens

    async def stop(self) -> None:
        for p in reversed(self.api + self.others):
            await p.stop()


async def _single(data_dir: Path) -> Servers:
    port = free_port()
    serve = await Proc.start("serve", "serve", "--demo-fleet", "2", "--http-port", str(port), "--mqtt-port", "0",
                             "--data-dir", str(data_dir), "--log-level", "WARNING",
                             env={"LATCH_ADMIN_TOKEN": TOKEN, "LATCH_JWT_SECRET": JWT_SECRET})
    await serve.expect(r"Demo fleet:", timeout=120)
    serve.drain(keep_tail=True)
    return Servers([port], [serve], [], lambda n: make_riders(data_dir / "latch.db", n))


async def _cluster(data_dir: Path, admin_url: str, replicas: int) -> Servers:
    """A fresh PostgreSQL database, nats-server with JetStream, `latch broker`, `replicas` × `latch api`."""
    from bench.natsserver import start_nats
    from bench.scale import _fresh_database

    url = _fresh_database(admin_url, "latch_push")
    nats_url, nats_proc = await start_nats(data_dir / "nats")
    env = {"LATCH_ADMIN_TOKEN": TOKEN, "LATCH_JWT_SECRET": JWT_SECRET, "LATCH_DATABASE_URL": url,
           "LATCH_SERVICE_SECRET": "bench-push-service-secret", "LATCH_COMMAND_KEY_SECRET": "bench-push-key-secret",
           "LATCH_NATS_URL": nats_url}
    others: list[Proc] = [nats_proc]
    api: list[Proc] = []
    try:
        upgrade = await Proc.start("migrate", "db", "upgrade", "--data-dir", str(data_dir), env=env)
        if await upgrade.proc.wait() != 0:
            raise RuntimeError("latch db upgrade failed")
        broker = await Proc.start("broker", "broker", "--data-dir", str(data_dir / "broker"), "--mqtt-port", "0",
                                  "--log-level", "WARNING", env=env)
        others.append(broker)
        mqtt_port = (await broker.expect(r"default 127\.0\.0\.1:(\d+)")).group(1)
        broker.drain()
        ports = []
        for i in range(replicas):
            port = free_port()
            p = await Proc.start(f"api-{i + 1}", "api", "--data-dir", str(data_dir / f"api-{i + 1}"), "--mqtt-port",
                                 mqtt_port, "--http-port", str(port), "--api-client-id", f"latch-api-{i + 1}",
                                 "--log-level", "WARNING", env=env)
            api.append(p)
            await p.expect(r"API:\s+(http\S+)")
            p.drain(keep_tail=True)
            ports.append(port)
    except BaseException:
        for p in reversed(api + others):
            await p.stop()
        raise
    return Servers(ports, api, others, lambda n: make_riders_pg(url, n))


def make_riders_pg(url: str, n: int) -> list[str]:
    """make_riders on PostgreSQL."""
    import psycopg
    from sqlalchemy.engine import make_url

    users, sessions, out = _rider_rows(n)
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as db, db.cursor() as cur:
        cur.executemany('INSERT INTO "user" (id, email, name, password_hash, role, created_at) '
                        'VALUES (%s,%s,%s,%s,%s,%s)', users)
        cur.executemany("INSERT INTO user_session (id, user_id, created_at, expires_at) VALUES (%s,%s,%s,%s)",
                        sessions)
    return out


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def _ask(conns: list[Any], msg: tuple[Any, ...], timeout: float) -> list[Any]:
    loop = asyncio.get_running_loop()
    for c in conns:
        c.send(msg)
    return [await asyncio.wait_for(loop.run_in_executor(None, c.recv), timeout) for c in conns]


async def notify_run(transport: str, n: int, rate: float, duration: float, data_dir: Path,
                     profile: bool = False, idle_s: float = 0.0, replicas: int = 1,
                     database_url: str | None = None) -> NotifyResult:
    """n riders on `transport`; notifications to all at `rate` per second for `duration` seconds (with
    `idle_s`: first hold them idle that long, and send just one). With `replicas` > 1 (needs `database_url`, a
    PostgreSQL admin URL): that many API replicas with events on NATS JetStream, the riders spread over them."""
    import multiprocessing

    from bench.procs import cpu_seconds as cpu_s
    from bench.procs import machine_busy_seconds, machine_steal_seconds, sys_cpu_seconds

    loadavg = Path("/proc/loadavg").read_text().strip()
    if replicas > 1:
        if not database_url:
            raise SystemExit("--replicas > 1 needs --database-url (a PostgreSQL admin URL)")
        servers = await _cluster(data_dir, database_url, replicas)
    else:
        servers = await _single(data_dir)
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    conns: list[Any] = []
    pids = [p.proc.pid for p in servers.api]
    every = {p.name: p.proc.pid for p in servers.api + servers.others if p.name != "broker"}

    def total(f: Any) -> Any:
        return sum(f(pid) for pid in pids)
    try:
        port = servers.ports[0]
        tokens_ = servers.add_riders(n)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            await http.get("/v1/metrics")
            rss0 = total(rss_kib)
            workers = max(min(2, n), -(-n // WORKER_MAX), len(servers.ports))
            share = -(-n // workers)
            t0 = time.monotonic()
            for i in range(workers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=worker_main, args=(child, transport, servers.ports[i % len(servers.ports)],
                                                          f"127.0.0.{2 + i}",
                                                          tokens_[i * share:(i + 1) * share]), daemon=True)
                p.start()
                procs.append(p)
                conns.append(parent)
            loop = asyncio.get_running_loop()
            answers = [await asyncio.wait_for(loop.run_in_executor(None, c.recv), 900) for c in conns]
            connected = sum(a[1] for a in answers)
            for a in answers:
                if a[3]:
                    print(f"  connect errors: {a[3]}", flush=True)
            for _ in range(600):   # bounded: until the servers hold them all
                held = 0
                for q in servers.ports:
                    held += (await http.get(f"http://127.0.0.1:{q}/v1/metrics")).json()["event_subscribers"]
                if held >= connected:
                    break
                await asyncio.sleep(0.1)
            connect_s = time.monotonic() - t0
            rss1 = total(rss_kib)
            print(f"  {transport}: {connected}/{n} riders connected in {connect_s:.1f}s ({workers} client processes, "
                  f"{len(pids)} API process(es)); server RSS +{(rss1 - rss0) / 1024:.0f} MiB, {total(_fds)} fds",
                  flush=True)
            if idle_s:
                await asyncio.sleep(idle_s)
            spy = None
            if profile:
                spy = await asyncio.create_subprocess_exec(
                    str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pids[0]), "-r", "200",
                    "-d", str(int(duration) + 1), "-f", "raw", "-o", str(data_dir / "profile.txt"), "--nonblocking",
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            each0 = {k: cpu_s(v) for k, v in every.items()}
            sys0 = total(sys_cpu_seconds)
            clients0 = sum(cpu_s(p.pid) for p in procs)
            cpu0, busy0, steal0, w0 = total(cpu_s), machine_busy_seconds(), machine_steal_seconds(), time.monotonic()
            print(f"  window from {time.time():.1f}", flush=True)
            ids: list[int] = []
            count = 1 if idle_s else max(1, int(rate * duration))
            start = loop.time() + 0.1
            pending: list[asyncio.Task[httpx.Response]] = []
            for k in range(count):
                delay = start + k / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(loop.create_task(http.post("/v1/notifications", json=NOTIFY_BODY)))
            for r in await asyncio.gather(*pending):
                assert r.status_code == 201, r.text
                ids.append(r.json()["event_id"])
            waited = await _ask(conns, ("wait", ids, 60.0), 120)
            wall = time.monotonic() - w0
            cpu = total(cpu_s) - cpu0
            sys_s = total(sys_cpu_seconds) - sys0
            clients_s = sum(cpu_s(p.pid) for p in procs) - clients0
            each = {k: cpu_s(v) - each0[k] for k, v in every.items()}
            busy, steal = machine_busy_seconds() - busy0, machine_steal_seconds() - steal0
            rss2 = total(rss_kib)
            fds = total(_fds)
            if spy is not None:
                await asyncio.wait_for(spy.wait(), 60)
            await _ask(conns, ("close",), 60)
        lats: list[float] = []
        to_all: list[float] = []
        per_id: dict[int, list[float]] = {i: [] for i in ids}
        dropped = sum(a[2] for a in waited)
        for a in waited:
            for i, v in a[1].items():
                per_id[i].extend(v)
        for i, v in per_id.items():
            lats.extend(v)
            if len(v) >= connected:
                to_all.append(max(v))
        expected = len(ids) * connected
        return NotifyResult(
            transport=transport, subscribers=n, connected=connected, rate_per_s=rate, duration_s=round(wall, 1),
            notifications=len(ids), deliveries=len(lats), expected_deliveries=expected, lost=expected - len(lats),
            dropped_connections=dropped, p50_ms=pct(lats, 50), p99_ms=pct(lats, 99),
            max_ms=round(max(lats, default=float("nan")), 1), to_all_p50_ms=pct(to_all, 50),
            to_all_p99_ms=pct(to_all, 99), server_rss_mib=round(rss2 / 1024, 1),
            rss_per_subscriber_kib=round((rss1 - rss0) / max(1, connected), 2),
            rss_per_subscriber_after_kib=round((rss2 - rss0) / max(1, connected), 2), server_fds=fds,
            server_cpu_pct=round(cpu / wall * 100, 1),
            server_cpu_us_per_delivery=round(cpu / max(1, len(lats)) * 1e6, 2),
            server_sys_share=round(sys_s / cpu, 2) if cpu else 0.0,
            clients_cores=round(clients_s / wall, 2),
            machine_busy_cores=round(busy / wall, 2), steal_cores=round(steal / wall, 2), loadavg_before=loadavg,
            connect_s=round(connect_s, 1), profile=_top(data_dir / "profile.txt") if profile else None,
            replicas=len(pids),
            cpu_us_per_delivery_by_process={k: round(v / max(1, len(lats)) * 1e6, 2) for k, v in each.items()})
    finally:
        for c in conns:
            c.close()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        await servers.stop()


def _top(path: Path, n: int = 25) -> list[tuple[str, float]]:
    """From py-spy's raw output: the functions where the samples were (self), then Latch's own functions
    and the server's most often on the stack (inclusive), as shares of all samples."""
    if not path.exists():
        return []
    total = 0
    self_: dict[str, int] = {}
    incl: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        if not k.isdigit():
            continue
        total += int(k)
        frames = stack.split(";")
        leaf = frames[-1] if frames else "?"
        self_[leaf] = self_.get(leaf, 0) + int(k)
        for frame in set(frames):
            if "(api/" in frame or "(bench/" in frame or "uvicorn/" in frame or "idle" in frame:
                incl[frame] = incl.get(frame, 0) + int(k)

    def top(d: dict[str, int], tag: str) -> list[tuple[str, float]]:
        return [(f"{tag} {f}", round(c / max(1, total) * 100, 1))
                for f, c in sorted(d.items(), key=lambda x: -x[1])[:n]]

    return top(self_, "self") + top(incl, "incl")


def show_notify(r: NotifyResult) -> None:
    print(f"  {r.transport:>4} N={r.connected:>6}: {r.notifications} notifications at {r.rate_per_s}/s, "
          f"{r.deliveries}/{r.expected_deliveries} deliveries (lost {r.lost}) | latency p50 {r.p50_ms} ms "
          f"p99 {r.p99_ms} ms max {r.max_ms} ms | to all p50 {r.to_all_p50_ms} p99 {r.to_all_p99_ms} ms | "
          f"RSS {r.server_rss_mib} MiB, {r.rss_per_subscriber_kib} KiB/subscriber ({r.rss_per_subscriber_after_kib} "
          f"after), {r.server_fds} fds | server CPU {r.server_cpu_pct}%, {r.server_cpu_us_per_delivery} us/delivery "
          f"({r.server_sys_share:.0%} kernel) | "
          f"clients {r.clients_cores} cores | machine {r.machine_busy_cores} cores busy, steal {r.steal_cores}; "
          f"load before {r.loadavg_before}",
          flush=True)
    if r.replicas > 1:
        print(f"      {r.replicas} replicas on NATS JetStream: CPU us/delivery by process "
              f"{r.cpu_us_per_delivery_by_process}", flush=True)
    for f, share in r.profile or []:
        print(f"      {share:5.1f}%  {f}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("notify", "commands"), default="notify")
    ap.add_argument("--transports", default=None, help="notify: sse,ws; commands: sse,ws,longpoll")
    ap.add_argument("--sizes", default="10000", help="subscriber counts")
    ap.add_argument("--rate", type=float, default=None, help="notify: notifications/s (10); commands: commands/s (1)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--idle", type=float, default=0.0, help="notify: hold the subscribers idle this long, then "
                                                            "send one notification (the 50,000 idle run)")
    ap.add_argument("--profile", action="store_true", help="notify: py-spy the server during the window")
    ap.add_argument("--replicas", type=int, default=1, help="notify: API replicas holding the riders, events "
                                                             "between them on NATS JetStream (needs --database-url)")
    ap.add_argument("--database-url", help="notify with --replicas > 1: a PostgreSQL admin URL (a database is made)")
    ap.add_argument("--label", default="", help="a word for the results file (before, after)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs: list[Any] = []
    notify = args.mode == "notify"
    transports = (args.transports or ("sse,ws" if notify else "sse,ws,longpoll")).split(",")
    rate = args.rate if args.rate is not None else (10.0 if notify else 1.0)
    for n in [int(x) for x in args.sizes.split(",")]:
        for transport in transports:
            with tempfile.TemporaryDirectory(prefix="latch-push-") as tmp:
                try:
                    if notify:
                        r: Any = await notify_run(transport, n, rate, args.duration, Path(tmp), args.profile, args.idle,
                                                  args.replicas, args.database_url)
                        show_notify(r)
                    else:
                        r = await run(transport, n, rate, args.duration, Path(tmp))
                        show(r)
                except Exception as e:   # one size too big for the machine must not lose the others
                    print(f"  {transport} N={n}: failed: {e!r}", flush=True)
                    continue
                runs.append(r)
    label = f"-{args.label}" if args.label else ""
    out = args.out or RESULTS / f"push-{time.strftime('%Y%m%d-%H%M%S')}{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "push", "mode": args.mode, "label": args.label,
                               "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(),
                               "runs": [asdict(r) for r in runs]}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())

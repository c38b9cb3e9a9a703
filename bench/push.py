"""Push fan-out benchmark: N subscribers per transport (SSE, WebSocket, long polling) on one Latch.

Starts `latch serve` (broker + API + a small simulated fleet) as a subprocess, connects N operator
subscribers of one transport over loopback (lean asyncio clients, so the client is not the
bottleneck), then sends commands at a fixed rate through the HTTP API. Each command makes three or
four events (queued, sent, [received,] succeeded) that every subscriber must receive. Delivery latency
runs from the event's append time (its `at`, stamped in the transaction) to its arrival at each
subscriber: p50/p99 over all deliveries, and per event the time until the *last* subscriber had it.
Also: the server's memory per subscriber (RSS growth / N) and its CPU during the publishing window.

    python -m bench.push                                  # SSE, WebSocket, long polling at N = 1,000 and 10,000
    python -m bench.push --transports sse --sizes 1000 --rate 2 --duration 10

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
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

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
    port = _free_port()
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def show(r: Result) -> None:
    print(f"  {r.transport:>8} N={r.connected:>6}: {r.events} events, {r.deliveries}/{r.expected_deliveries} "
          f"deliveries | latency p50 {r.p50_ms} ms p99 {r.p99_ms} ms max {r.max_ms} ms | to all: p50 "
          f"{r.all_p50_ms} ms p99 {r.all_p99_ms} ms | server RSS {r.server_rss_mib} MiB "
          f"({r.rss_per_subscriber_kib} KiB/subscriber), CPU {r.server_cpu_pct}% | client CPU {r.client_cpu_pct}%",
          flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default="sse,ws,longpoll")
    ap.add_argument("--sizes", default="1000,10000", help="subscriber counts")
    ap.add_argument("--rate", type=float, default=1.0, help="commands per second (4 events each)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs: list[Result] = []
    for n in [int(x) for x in args.sizes.split(",")]:
        for transport in args.transports.split(","):
            with tempfile.TemporaryDirectory(prefix="latch-push-") as tmp:
                try:
                    r = await run(transport, n, args.rate, args.duration, Path(tmp))
                except Exception as e:   # one size too big for the machine must not lose the others
                    print(f"  {transport} N={n}: failed: {e!r}", flush=True)
                    continue
                show(r)
                runs.append(r)
    out = args.out or RESULTS / f"push-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "push", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(),
                               "runs": [asdict(r) for r in runs]}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())

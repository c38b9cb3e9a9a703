"""The MQTT broker alone: Latch's broker against Mosquitto, same load generator, same run.

    python -m bench.broker                       # everything, 1,000 devices
    python -m bench.broker --quick               # smaller counts, for a smoke run
    python -m bench.broker --only latch --tests rtt

Brokers (each started fresh for each measurement, on a free loopback port):

* ``latch``: ``latch broker --allow-anonymous --data-dir TMP`` (uvloop, its durable SQLite store on);
* ``mosquitto``: /usr/sbin/mosquitto with ``set_tcp_nodelay true``, ``persistence false``,
  ``max_queued_messages 1000``, ``max_inflight_messages 100`` (the limits Latch uses).

Measurements (clients are raw asyncio protocols on uvloop in this process, anonymous, topics under bench/):

* ``idle``: RSS of the broker before and after N idle devices (CONNECT clean_session=0 + SUBSCRIBE own
  topic, like a Latch lock) -> KiB per connection;
* ``connect``: N CONNECT/CONNACK handshakes (clean session), 50 at a time, 3 rounds -> median connects/s;
* ``qos0_1to1``, ``qos1_1to1``: one publisher, one subscriber, messages/s received (QoS 1: 100 in flight);
* ``qos0_1000to1``, ``qos1_1000to1``: 1,000 publishers (QoS 1: each waits for its PUBACK before its next
  message), one wildcard subscriber, messages/s received (and how many were lost, if any);
* ``rtt``: 1,000 devices (persistent sessions, QoS 1, each subscribed to bench/cmd/<i>; in a second
  process, so that one Python load generator is not the bottleneck) and one service
  (subscribed to bench/ack/+): open-loop commands at fixed rates; a device answers each on
  bench/ack/<i>; latency runs from the command's *scheduled* send time to the answer's arrival
  (no coordinated omission). Reports p50/p99 per rate and the highest rate with p99 < 25 ms;
* ``fanout``: one QoS 1 message to 1,000 subscribers (QoS 1), repeated: time until the last copy.

Every figure is printed with its ratio to Mosquitto and written to bench/results/broker-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.ports import free_port
from bench.procs import pct, rss_kib

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"
P99_GOAL_MS = 25.0


# --------------------------------------------------------------------------- brokers


async def wait_port(port: int, proc: asyncio.subprocess.Process, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection(HOST, port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker not listening on {port}") from None
            await asyncio.sleep(0.05)   # polling another process's port; there is no event to await


@dataclass
class Broker:
    name: str
    port: int
    proc: asyncio.subprocess.Process

    @property
    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


MOSQUITTO_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
max_queued_messages 1000
max_inflight_messages 100
log_dest none
"""


@contextlib.asynccontextmanager
async def start_broker(name: str) -> AsyncIterator[Broker]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        if name == "mosquitto":
            binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            conf = Path(tmp, "mosquitto.conf")
            conf.write_text(MOSQUITTO_CONF.format(port=port))
            argv = [binary, "-c", str(conf)]
        else:
            argv = [sys.executable, "-m", "latch.cli", "broker", "--mqtt-port", str(port), "--data-dir", tmp,
                    "--allow-anonymous", "--log-level", "WARNING"]
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=open(Path(tmp, "stderr.log"), "wb"))
        try:
            await wait_port(port, proc)
            yield Broker(name, port, proc)
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()


# --------------------------------------------------------------------------- a minimal MQTT client


def _rl(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(x: bytes) -> bytes:
    return struct.pack("!H", len(x)) + x


def connect_packet(client_id: str, clean: bool, keepalive: int = 60) -> bytes:
    body = _s(b"MQTT") + bytes((4, 0x02 if clean else 0)) + struct.pack("!H", keepalive) + _s(client_id.encode())
    return b"\x10" + _rl(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int, pid: int = 0) -> bytes:
    body = _s(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return bytes((0x30 | (qos << 1),)) + _rl(len(body)) + body


def subscribe_packet(pid: int, flt: str, qos: int) -> bytes:
    body = struct.pack("!H", pid) + _s(flt.encode()) + bytes((qos,))
    return b"\x82" + _rl(len(body)) + body


class Client(asyncio.Protocol):
    """Just enough MQTT: CONNECT, SUBSCRIBE, PUBLISH QoS 0/1 (window), auto-PUBACK."""

    def __init__(self, on_message: Callable[[Client, bytes, bytes], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.on_message = on_message
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[None] | None = None
        self.pid = 0
        self.inflight = 0
        self.window_open: asyncio.Event = asyncio.Event()
        self.window_open.set()
        self.window = 100
        self.closed = asyncio.get_running_loop().create_future()
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        n = len(data)
        i = 0
        while i < n:
            j = i + 1
            rl = 0
            shift = 0
            while True:
                if j >= n:
                    self.buf = data[i:]
                    return
                b = data[j]
                j += 1
                rl |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            end = j + rl
            if end > n:
                self.buf = data[i:]
                return
            first = data[i]
            t = first >> 4
            if t == 3:
                tl = (data[j] << 8) | data[j + 1]
                topic = data[j + 2:j + 2 + tl]
                pos = j + 2 + tl
                qos = (first >> 1) & 3
                if qos:
                    pid = data[pos:pos + 2]
                    pos += 2
                    self.transport.write(b"\x40\x02" + pid)  # type: ignore[union-attr]
                self.received += 1
                if self.on_message is not None:
                    self.on_message(self, topic, data[pos:end])
            elif t == 4:
                self.inflight -= 1
                if self.inflight < self.window:
                    self.window_open.set()
            elif t == 2:
                if not self.connack.done():
                    self.connack.set_result(data[j + 1])
            elif t == 9:
                if self.suback is not None and not self.suback.done():
                    self.suback.set_result(None)
            i = end
        self.buf = b""

    def next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def publish(self, topic: bytes, payload: bytes, qos: int) -> None:
        if qos:
            self.inflight += 1
            if self.inflight >= self.window:
                self.window_open.clear()
            self.transport.write(publish_packet(topic, payload, qos, self.next_pid()))  # type: ignore[union-attr]
        else:
            self.transport.write(publish_packet(topic, payload, 0))  # type: ignore[union-attr]

    async def subscribe(self, flt: str, qos: int) -> None:
        self.suback = asyncio.get_running_loop().create_future()
        self.transport.write(subscribe_packet(self.next_pid(), flt, qos))  # type: ignore[union-attr]
        await asyncio.wait_for(self.suback, 30)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\xe0\x00")
            self.transport.close()


async def connect(port: int, client_id: str, clean: bool = True, on_message: Any = None) -> Client:
    loop = asyncio.get_running_loop()
    _, c = await loop.create_connection(lambda: Client(on_message), HOST, port)
    c.transport.write(connect_packet(client_id, clean))  # type: ignore[union-attr]
    rc = await asyncio.wait_for(c.connack, 30)
    if rc != 0:
        raise RuntimeError(f"CONNACK {rc}")
    return c


async def connect_many(port: int, ids: list[str], clean: bool, parallel: int = 200,
                       on_message: Any = None) -> list[Client]:
    sem = asyncio.Semaphore(parallel)

    async def one(cid: str) -> Client:
        async with sem:
            return await connect(port, cid, clean, on_message)

    return list(await asyncio.gather(*(one(i) for i in ids)))


async def close_all(clients: list[Client]) -> None:
    for c in clients:
        c.close()
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 30)


# --------------------------------------------------------------------------- measurements


@dataclass
class Cfg:
    devices: int = 1000
    idle: int = 2000
    connects: int = 3000
    messages: int = 50000
    rtt_rates: list[int] = field(default_factory=lambda: [1000, 2000, 3000, 4000, 6000, 8000, 10000, 12000, 15000])
    rtt_duration: float = 5.0
    fanout_rounds: int = 20


async def m_idle(b: Broker, cfg: Cfg) -> dict[str, Any]:
    before = b.rss_kib
    clients = await connect_many(b.port, [f"idle-{i}" for i in range(cfg.idle)], clean=False)
    for i, c in enumerate(clients):
        c.transport.write(subscribe_packet(1, f"bench/cmd/idle-{i}", 1))  # type: ignore[union-attr]
    await asyncio.sleep(2.0)    # let the broker settle its allocations (and store writes) before reading RSS
    after = b.rss_kib
    await close_all(clients)
    return {"connections": cfg.idle, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_connection": round((after - before) / cfg.idle, 2)}


async def m_connect(b: Broker, cfg: Cfg) -> dict[str, Any]:
    """50 handshakes in flight (Mosquitto listens with a backlog of 100: more would measure SYN
    retransmits, not the broker); three rounds, the median reported."""
    rates = []
    for r in range(3):
        t0 = time.perf_counter()
        clients = await connect_many(b.port, [f"conn-{r}-{i}" for i in range(cfg.connects)], clean=True, parallel=50)
        dt = time.perf_counter() - t0
        await close_all(clients)
        rates.append(round(cfg.connects / dt))
    return {"connects": cfg.connects, "rounds": rates, "connects_per_s": sorted(rates)[1]}


async def _throughput(b: Broker, pubs: int, qos: int, total: int, window: int = 100) -> dict[str, Any]:
    done = asyncio.get_running_loop().create_future()
    count = 0

    def got(c: Client, topic: bytes, payload: bytes) -> None:
        nonlocal count
        count += 1
        if count >= total and not done.done():
            done.set_result(time.perf_counter())

    sub = await connect(b.port, "tp-sub", on_message=got)
    await sub.subscribe("bench/tp/+", qos)
    publishers = await connect_many(b.port, [f"tp-pub-{i}" for i in range(pubs)], clean=True)
    for p in publishers:
        p.window = window
    per = total // pubs
    cpu0 = b.cpu_s()

    async def run(i: int, p: Client) -> None:
        topic = f"bench/tp/{i}".encode()
        payload = b"x" * 64
        for k in range(per):
            if qos:
                if not p.window_open.is_set():
                    await p.window_open.wait()
            if k % 5 == 0:     # let the subscriber's side of this process run (a real one has its own)
                await asyncio.sleep(0)
                while p.transport.get_write_buffer_size() > 256 * 1024:  # type: ignore[union-attr]
                    await asyncio.sleep(0.001)
            p.publish(topic, payload, qos)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i, p) for i, p in enumerate(publishers)))
    total = per * pubs
    # done when everything arrived, or when nothing more arrived for a second (a broker that dropped
    # messages must not be charged a minute of waiting: the loss is reported instead)
    last, last_t = -1, time.perf_counter()
    while not done.done():
        if count != last:
            last, last_t = count, time.perf_counter()
        elif time.perf_counter() - last_t > 1.0:
            break
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), 0.1)
    t1 = done.result() if done.done() else last_t
    cpu = b.cpu_s() - cpu0
    received = count
    await close_all([*publishers, sub])
    dt = t1 - t0
    return {"publishers": pubs, "qos": qos, "sent": total, "received": received, "lost": total - received,
            "msgs_per_s": round(received / dt), "broker_cpu_us_per_msg": round(cpu / max(received, 1) * 1e6, 1)}


async def m_qos0_1to1(b: Broker, cfg: Cfg) -> dict[str, Any]:
    return await _throughput(b, 1, 0, cfg.messages)


async def m_qos1_1to1(b: Broker, cfg: Cfg) -> dict[str, Any]:
    return await _throughput(b, 1, 1, cfg.messages)


async def m_qos0_1000to1(b: Broker, cfg: Cfg) -> dict[str, Any]:
    return await _throughput(b, cfg.devices, 0, cfg.messages)


async def m_qos1_1000to1(b: Broker, cfg: Cfg) -> dict[str, Any]:
    """Each of the 1,000 publishers waits for its PUBACK before the next message, like a device."""
    return await _throughput(b, cfg.devices, 1, cfg.messages, window=1)


async def echo_devices(port: int, n: int) -> None:
    """The devices of the round-trip test, in their own process (so the load generator is not the
    bottleneck): n persistent QoS 1 sessions, each answering bench/cmd/<i> on bench/ack/<i>."""
    ack_topics = [f"bench/ack/{i}".encode() for i in range(n)]
    index = {f"bench/cmd/{i}".encode(): i for i in range(n)}

    def device_answers(c: Client, topic: bytes, payload: bytes) -> None:
        c.publish(ack_topics[index[topic]], payload, 1)

    devices = await connect_many(port, [f"dev-{i}" for i in range(n)], clean=False, on_message=device_answers)
    for d in devices:
        d.window = 1 << 30
    await asyncio.gather(*(d.subscribe(f"bench/cmd/{i}", 1) for i, d in enumerate(devices)))
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)       # until the parent closes our stdin
    await close_all(devices)


async def m_rtt(b: Broker, cfg: Cfg) -> dict[str, Any]:
    n = cfg.devices
    cmd_topics = [f"bench/cmd/{i}".encode() for i in range(n)]
    echo = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.broker", "--echo-devices",
                                                f"{b.port}:{n}", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(echo.stdout.readline(), 120)  # type: ignore[union-attr]
    if line.strip() != b"READY":
        raise RuntimeError(f"device process failed: {line!r}")
    sched: list[float] = []
    lat: list[float] = []
    state = {"expect": 0}
    finished = asyncio.Event()

    def service_got(c: Client, topic: bytes, payload: bytes) -> None:
        k = int.from_bytes(payload[:4], "big")
        lat.append((time.perf_counter() - sched[k]) * 1000)
        if len(lat) >= state["expect"]:
            finished.set()

    service = await connect(b.port, "bench-service", clean=False, on_message=service_got)
    service.window = 1 << 30
    await service.subscribe("bench/ack/+", 1)
    runs = []
    best = None
    for rate in cfg.rtt_rates:
        sched.clear()
        lat.clear()
        finished.clear()
        total = int(rate * cfg.rtt_duration)
        state["expect"] = total
        cpu0 = b.cpu_s()
        t0 = time.perf_counter() + 0.01
        sent = 0
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - t0) * rate) + 1)
            while sent < due:
                sched.append(t0 + sent / rate)
                service.publish(cmd_topics[sent % n], sent.to_bytes(4, "big") + b"unlock", 1)
                sent += 1
            await asyncio.sleep(0.0005)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(finished.wait(), 10 + cfg.rtt_duration)
        elapsed = time.perf_counter() - t0
        cpu = b.cpu_s() - cpu0
        got = len(lat)
        r = {"rate": rate, "sent": total, "answered": got, "achieved_per_s": round(got / elapsed),
             "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2), "max_ms": round(max(lat or [0]), 1),
             "broker_cpu_share": round(cpu / elapsed, 2)}
        runs.append(r)
        print(f"    {b.name:9s} rtt {rate:5d}/s: answered {got}/{total}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"broker CPU {r['broker_cpu_share']:.0%}", flush=True)
        ok = got == total and r["p99_ms"] < P99_GOAL_MS
        if ok:
            best = rate
        else:
            break
    await close_all([service])
    echo.stdin.close()  # type: ignore[union-attr]
    await asyncio.wait_for(echo.wait(), 30)
    return {"devices": n, "duration_s": cfg.rtt_duration, "runs": runs, "best_rate_p99_under_25ms": best}


async def m_fanout(b: Broker, cfg: Cfg) -> dict[str, Any]:
    n = cfg.devices
    state = {"count": 0, "target": n}
    done = asyncio.Event()

    def got(c: Client, topic: bytes, payload: bytes) -> None:
        state["count"] += 1
        if state["count"] >= state["target"]:
            done.set()

    subs = await connect_many(b.port, [f"fan-{i}" for i in range(n)], clean=True, on_message=got)
    await asyncio.gather(*(s.subscribe("bench/fan", 1) for s in subs))
    pub = await connect(b.port, "fan-pub")
    times = []
    for r in range(cfg.fanout_rounds):
        state["count"] = 0
        done.clear()
        t0 = time.perf_counter()
        pub.publish(b"bench/fan", b"f" * 32, 1)
        await asyncio.wait_for(done.wait(), 30)
        times.append((time.perf_counter() - t0) * 1000)
    await close_all([*subs, pub])
    return {"subscribers": n, "rounds": cfg.fanout_rounds, "p50_ms": round(pct(times, 50), 2),
            "p99_ms": round(pct(times, 99), 2), "deliveries_per_s": round(n / (pct(times, 50) / 1000))}


MEASUREMENTS: dict[str, tuple[Callable[[Broker, Cfg], Any], str, bool]] = {
    # name: (function, headline figure, higher is better)
    "idle": (m_idle, "kib_per_connection", False),
    "connect": (m_connect, "connects_per_s", True),
    "qos0_1to1": (m_qos0_1to1, "msgs_per_s", True),
    "qos1_1to1": (m_qos1_1to1, "msgs_per_s", True),
    "qos0_1000to1": (m_qos0_1000to1, "msgs_per_s", True),
    "qos1_1000to1": (m_qos1_1000to1, "msgs_per_s", True),
    "rtt": (m_rtt, "best_rate_p99_under_25ms", True),
    "fanout": (m_fanout, "p50_ms", False),
}


async def main(args: argparse.Namespace) -> None:
    cfg = Cfg()
    if args.quick:
        cfg = Cfg(devices=200, idle=500, connects=1000, messages=10000, rtt_rates=[500, 1000, 2000],
                  rtt_duration=2.0, fanout_rounds=5)
    if args.rates:
        cfg.rtt_rates = [int(r) for r in args.rates.split(",")]
    if args.duration:
        cfg.rtt_duration = args.duration
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    brokers = args.only.split(",") if args.only else ["latch", "mosquitto"]
    tests = args.tests.split(",") if args.tests else list(MEASUREMENTS)
    results: dict[str, dict[str, Any]] = {t: {} for t in tests}
    for t in tests:
        fn = MEASUREMENTS[t][0]
        for name in brokers:
            async with start_broker(name) as b:
                print(f"  {t:13s} {name} ...", flush=True)
                results[t][name] = await fn(b, cfg)
    print()
    print(f"{'measurement':15s} {'figure':28s} {'latch':>10s} {'mosquitto':>10s} {'latch/mosq':>10s}")
    summary = {}
    for t in tests:
        key, higher = MEASUREMENTS[t][1], MEASUREMENTS[t][2]
        vals = {n: results[t].get(n, {}).get(key) for n in brokers}
        lv, mv = vals.get("latch"), vals.get("mosquitto")
        ratio = (lv / mv) if isinstance(lv, (int, float)) and isinstance(mv, (int, float)) and mv else None
        summary[t] = {"figure": key, "higher_is_better": higher, "latch": lv, "mosquitto": mv,
                      "latch_to_mosquitto": round(ratio, 3) if ratio is not None else None}
        note = "" if higher else "  (lower is better)"
        print(f"{t:15s} {key:28s} {lv!s:>10s} {mv!s:>10s} {('%.2f' % ratio) if ratio is not None else '-':>10s}{note}")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
           "load_avg_at_end": os.getloadavg(), "config": cfg.__dict__, "summary": summary, "results": results}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"broker-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwritten to {path}")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help="latch,mosquitto")
    p.add_argument("--tests", help=",".join(MEASUREMENTS))
    p.add_argument("--rates", help="command round-trip rates to try, e.g. 1000,2000,3000")
    p.add_argument("--duration", type=float, help="seconds per round-trip rate")
    p.add_argument("--echo-devices", metavar="PORT:N", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo_devices:
        port, n = args.echo_devices.split(":")
        work = echo_devices(int(port), int(n))
    else:
        work = main(args)
    try:
        import uvloop
    except ImportError:
        asyncio.run(work)
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(work)


if __name__ == "__main__":
    cli()

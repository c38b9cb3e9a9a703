"""End-to-end unlock benchmark: HTTP API -> MQTT -> simulated lock -> MQTT -> API -> HTTP response.

Starts `latch broker`, `latch api` and `latch sim` as separate processes on
loopback, then sends commands through the HTTP API at a fixed open-loop
rate. Latency runs from each command's *scheduled* send time to the moment
its response reports a final state (POST ...?wait=), so a backlog counts
against the platform instead of hiding (no coordinated omission).

    python -m bench.e2e                         # 1,000 locks, 200 commands/s, then a search for p99 < 50 ms
    python -m bench.e2e --rates 100,200 --duration 10
    python -m bench.e2e --database-url postgresql://... --replicas 3 --broker mosquitto

With --replicas N (PostgreSQL only) N `latch api` processes share the database and the broker, and the
load generator spreads requests over them round-robin, as a load balancer would. bench/scale.py runs
1, 2 and 3 replicas in a row.

Figures are printed and written to bench/results/e2e-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx

from bench.cpu_quota import CpuQuota
from bench.procs import (
    Proc,
    cpu_seconds,
    cpu_seconds_named,
    free_port,
    machine_busy_seconds,
    machine_steal_seconds,
    pct,
    sys_cpu_seconds,
)

RESULTS = Path(__file__).parent / "results"


@dataclass
class RunResult:
    rate: float
    duration_s: float
    sent: int
    succeeded: int
    errors: int
    other_final: dict[str, int]
    achieved_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    broker_rss_mib: float
    api_rss_mib: float
    sim_rss_mib: float
    cpu_ms_per_command: dict[str, float]
    replicas: int = 1
    db_writes_per_command: float | None = None   # PostgreSQL rows inserted + updated, per command
    machine_busy_cores: float | None = None      # the whole machine's average busy cores during the run
    machine_steal_cores: float | None = None     # cores' worth taken by the host meanwhile (a noisy neighbour)
    api_to_broker_cpu: float | None = None       # the API's CPU per command over the broker's, same run (goal: <= 2)
    ceiling_per_s: float | None = None           # the machine's cores / CPU per command of every process together
    share_of_ceiling: float | None = None        # achieved / ceiling (goal at p99 < 50 ms: >= 0.8)
    kernel_ms_per_command: dict[str, float] | None = None   # of cpu_ms_per_command, the kernel's (I/O, sockets)
    # where a succeeded command's time went, from its own history (PHASES), p50 and p99 in ms
    phase_ms: dict[str, dict[str, float]] | None = None
    # when the slowest 1 % of succeeded commands were due (seconds into the run, 0.1 s bins: count): a tail
    # bunched at the start is the connection ramp, one bunched at one moment a stall, a spread one a queue
    slowest_due_s: dict[str, int] | None = None


# A succeeded command's time, split at the points its history records (api/commands/states.py events):
# "generator" from the time it was due to be sent until the load generator began sending it (its own lag),
# "intake" from then to its creation (connecting, the kernel's queues, the HTTP stack, admission, the
# create's write), "dispatch" until it was published to its lock (waiting behind the lock's
# earlier command is here), "to_lock" until the lock said received (broker, simulator), "actuate" until it
# said succeeded, "answer" until the load generator had the response. Clocks: the history's wall-clock
# milliseconds against the load generator's wall clock, on one machine.
PHASES = (("generator", None, "start"), ("intake", "start", "created"), ("dispatch", "created", "dispatch"),
          ("to_lock", "dispatch", "device_received"),
          ("actuate", "device_received", "device_succeeded"), ("answer", "device_succeeded", None))


def phases_of(history: list[dict], due_at: float, started_at: float, done_at: float) -> dict[str, float] | None:
    """Milliseconds per PHASES entry for one succeeded command (None if its history lacks a point)."""
    at: dict[str, float] = {"start": started_at}
    for h in history:
        if h.get("applied", True) and h["event"] not in at:
            at[h["event"]] = datetime.fromisoformat(h["at"]).timestamp()
    out = {}
    for name, start, end in PHASES:
        a = due_at if start is None else at.get(start)
        b = done_at if end is None else at.get(end)
        if a is None or b is None:
            return None
        out[name] = (b - a) * 1000
    return out


@dataclass
class Bench:
    devices: int
    data_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    api_urls: list[str] = field(default_factory=list)
    token: str = "bench-token"
    database_url: str | None = None
    replicas: int = 1
    broker: str = "latch"          # latch: `latch broker`; mosquitto: Debian's, configured by `latch broker-config`
    share_group: str | None = None  # replicas take acks as $share/<group>/... (Mosquitto)
    replica_cpu: float | None = None  # each API replica held to this many cores (bench/cpu_quota.py)
    nats: bool = False             # events between the replicas on NATS JetStream (a nats-server started here)
    quotas: list[CpuQuota] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return self.api_urls[0]

    async def start(self) -> None:
        env = {"LATCH_ADMIN_TOKEN": self.token, "LATCH_SERVICE_SECRET": "bench-service-secret",
               "LATCH_JWT_SECRET": "bench-jwt-secret", "LATCH_COMMAND_KEY_SECRET": "bench-command-key-secret"}
        if self.database_url:
            env["LATCH_DATABASE_URL"] = self.database_url
        d = str(self.data_dir)
        nats_proc = None
        if self.nats:
            from bench.natsserver import start_nats

            env["LATCH_NATS_URL"], nats_proc = await start_nats(self.data_dir / "nats")
        upgrade = await Proc.start("migrate", "db", "upgrade", "--data-dir", d, env=env)
        if await upgrade.proc.wait() != 0:
            raise RuntimeError(f"latch db upgrade failed:\n{(await upgrade.proc.stdout.read()).decode()}")  # type: ignore[union-attr]
        if self.broker == "mosquitto":
            from bench.mosquitto import start_mosquitto

            port, service_port, broker = await start_mosquitto(self.data_dir / "mosquitto", env)
            api_broker = ["--broker", f"mqtt://127.0.0.1:{service_port}"]   # the replicas' own listener
            env["LATCH_MOSQUITTO_CONFIG_DIR"] = str(self.data_dir / "mosquitto" / "latch")
            env["LATCH_MOSQUITTO_PID_FILE"] = str(self.data_dir / "mosquitto" / "mosquitto.pid")
        else:
            broker = await Proc.start("broker", "broker", "--data-dir", d, "--mqtt-port", "0",
                                      "--log-level", "WARNING", env=env)
            port = (await broker.expect(r"default 127\.0\.0\.1:(\d+)")).group(1)
            broker.drain()
            api_broker = ["--mqtt-port", str(port)]
        self.procs = {"broker": broker}
        if nats_proc is not None:
            self.procs["nats"] = nats_proc
        for i in range(self.replicas):
            # SQLite: the API shares the broker's data dir, so both read one registry (latch.db) that was migrated
            # above; PostgreSQL: the database is shared anyway, each replica keeps its own files
            api_dir = f"{d}/api-{i + 1}" if self.database_url else d
            api = await Proc.start(f"api-{i + 1}", "api", "--data-dir", api_dir, *api_broker,
                                   "--http-port", str(free_port()), "--api-client-id", f"latch-api-{i + 1}",
                                   *(["--share-group", self.share_group] if self.share_group else []),
                                   "--log-level", "WARNING", env=env)
            self.api_urls.append((await api.expect(r"API:\s+(http\S+)")).group(1))
            api.drain()
            self.procs[f"api-{i + 1}"] = api
        sim = await Proc.start("sim", "sim", "--devices", str(self.devices), "--broker", f"127.0.0.1:{port}",
                               "--api", self.api_url, "--data-dir", d, "--actuation-delay", "0",
                               "--log-level", "WARNING", env=env)
        await sim.expect(r"simulated locks online", timeout=300)
        sim.drain()
        self.procs["sim"] = sim
        async with self.client() as http:
            for _ in range(600):  # presence is applied asynchronously; bounded wait for the fleet
                devices = (await http.get("/v1/devices", params={"limit": 1000})).json()
                online = sum(d["online"] for d in devices)
                if online >= min(self.devices, 1000):
                    break
                await asyncio.sleep(0.1)
        await self.settle()
        if self.replica_cpu:   # after start-up: registering and 1,000 locks' first reports are not the run
            for name, p in self.procs.items():
                if name.startswith("api-"):
                    quota = CpuQuota(f"latch-bench-{name}", self.replica_cpu)
                    quota.add(p.proc.pid)
                    self.quotas.append(quota)

    async def settle(self, quiet_cores: float = 0.05, window_s: float = 0.5, tries: int = 120) -> None:
        """Wait (bounded) until every process is quiet: the locks' first reports are applied, so a run's
        CPU figures are the run's own."""
        for _ in range(tries):
            before = {name: p.cpu_s for name, p in self.procs.items()}
            await asyncio.sleep(window_s)
            if all((p.cpu_s - before[name]) / window_s < quiet_cores for name, p in self.procs.items()):
                return

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=60, limits=httpx.Limits(max_connections=2000, max_keepalive_connections=500))

    async def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            await p.stop()
        for q in self.quotas:
            q.close()
        self.quotas = []

    def _db_writes(self) -> int | None:
        """Rows inserted + updated in the PostgreSQL database so far (pg_stat_database)."""
        if not self.database_url:
            return None
        import psycopg

        from api.pg_bus import libpq_dsn

        with psycopg.connect(libpq_dsn(self.database_url), autocommit=True) as conn:
            conn.execute("SELECT pg_stat_force_next_flush()")
            row = conn.execute("SELECT tup_inserted + tup_updated FROM pg_stat_database "
                               "WHERE datname = current_database()").fetchone()
        return int(row[0]) if row else None

    async def run(self, rate: float, duration: float) -> RunResult:
        """Open-loop load. The generator uses aiohttp: httpx saturated its own core at ~100 requests/s
        with hundreds in flight, which measured the client instead of Latch."""
        n = int(rate * duration)
        writes_before = self._db_writes()
        cpu_before = {name: p.cpu_s for name, p in self.procs.items()}
        sys_before = {name: sys_cpu_seconds(p.proc.pid) for name, p in self.procs.items()}
        own_before = cpu_seconds(os.getpid())
        pg_before = cpu_seconds_named("postgres") if self.database_url else 0.0
        busy_before, steal_before, wall_before = machine_busy_seconds(), machine_steal_seconds(), time.monotonic()
        latencies: list[float] = []
        phases: list[dict[str, float]] = []
        due: list[tuple[float, float]] = []   # (latency ms, seconds into the run it was due) per succeeded command
        finals: dict[str, int] = {}
        errors = 0
        connector = aiohttp.TCPConnector(limit=2000)
        async with aiohttp.ClientSession(connector=connector,
                                         headers={"Authorization": f"Bearer {self.token}"},
                                         timeout=aiohttp.ClientTimeout(total=60)) as http:
            loop = asyncio.get_running_loop()
            urls = self.api_urls
            start = loop.time() + 0.2

            async def one(i: int, scheduled: float) -> None:
                nonlocal errors
                began = loop.time()
                device = f"sim-{i % self.devices + 1:04d}"
                action = "unlock" if (i // self.devices) % 2 == 0 else "lock"
                try:
                    async with http.post(f"{urls[i % len(urls)]}/v1/devices/{device}/commands", params={"wait": "30"},
                                         json={"action": action}) as r:
                        body = await r.json()
                    status = body.get("status") if r.status in (200, 201) else f"http_{r.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                    status = f"error_{type(e).__name__}"
                done = loop.time()
                finals[status] = finals.get(status, 0) + 1
                if status == "succeeded":
                    latencies.append((done - scheduled) * 1000)
                    wall = time.time()
                    if (split := phases_of(body.get("history") or [], wall - (done - scheduled),
                                           wall - (done - began), wall)) is not None:
                        phases.append(split)
                    due.append((latencies[-1], scheduled - start))
                else:
                    errors += 1

            tasks = []
            for i in range(n):
                scheduled = start + i / rate
                delay = scheduled - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(loop.create_task(one(i, scheduled)))
            await asyncio.wait(tasks, timeout=duration + 60)
            elapsed = loop.time() - start
        succeeded = finals.pop("succeeded", 0)
        per = max(succeeded, 1)
        writes_after = self._db_writes()
        cpu = {name: round((p.cpu_s - cpu_before[name]) * 1000 / per, 2) for name, p in self.procs.items()}
        kernel = {name: round((sys_cpu_seconds(p.proc.pid) - sys_before[name]) * 1000 / per, 2)
                  for name, p in self.procs.items()}
        cpu["load_generator"] = round((cpu_seconds(os.getpid()) - own_before) * 1000 / per, 2)
        if self.database_url:   # the PostgreSQL server on this machine (a remote one shows as 0)
            cpu["postgres"] = round((cpu_seconds_named("postgres") - pg_before) * 1000 / per, 2)
        wall = max(time.monotonic() - wall_before, 1e-9)
        api_ms = sum(v for k, v in cpu.items() if k.startswith("api-"))
        total_ms = sum(cpu.values())
        ceiling = (os.cpu_count() or 1) * 1000 / total_ms if total_ms > 0 else None
        busy = (machine_busy_seconds() - busy_before) / wall
        steal = (machine_steal_seconds() - steal_before) / wall
        return RunResult(
            rate=rate, duration_s=round(elapsed, 2), sent=n, succeeded=succeeded, errors=errors, other_final=finals,
            achieved_per_s=round(succeeded / elapsed, 1), p50_ms=round(pct(latencies, 50), 1),
            p95_ms=round(pct(latencies, 95), 1), p99_ms=round(pct(latencies, 99), 1),
            max_ms=round(max(latencies, default=float("nan")), 1),
            broker_rss_mib=round(self.procs["broker"].rss_kib / 1024, 1),
            api_rss_mib=round(sum(p.rss_kib for name, p in self.procs.items() if name.startswith("api")) / 1024, 1),
            sim_rss_mib=round(self.procs["sim"].rss_kib / 1024, 1), cpu_ms_per_command=cpu,
            kernel_ms_per_command=kernel, replicas=self.replicas,
            db_writes_per_command=(round((writes_after - writes_before) / per, 1)
                                   if writes_before is not None and writes_after is not None else None),
            machine_busy_cores=round(busy, 2), machine_steal_cores=round(steal, 2),
            api_to_broker_cpu=round(api_ms / cpu["broker"], 1) if cpu.get("broker") else None,
            ceiling_per_s=round(ceiling, 1) if ceiling else None,
            share_of_ceiling=round(succeeded / elapsed / ceiling, 2) if ceiling else None,
            phase_ms={name: {"p50": round(pct([p[name] for p in phases], 50), 1),
                             "p99": round(pct([p[name] for p in phases], 99), 1)} for name, _, _ in PHASES}
            if phases else None,
            slowest_due_s=slowest_due(due))


def slowest_due(due: list[tuple[float, float]]) -> dict[str, int] | None:
    """RunResult.slowest_due_s from (latency, due second) pairs."""
    if not due:
        return None
    bins: dict[str, int] = {}
    for _, at in sorted(due, reverse=True)[:max(1, len(due) // 100)]:
        key = f"{at:.1f}"
        bins[key] = bins.get(key, 0) + 1
    return dict(sorted(bins.items(), key=lambda kv: float(kv[0])))


def show(r: RunResult) -> None:
    print(f"  {r.rate:>6.0f}/s for {r.duration_s:>5.1f}s: {r.succeeded}/{r.sent} ok, {r.errors} errors "
          f"{r.other_final or ''}| achieved {r.achieved_per_s}/s | p50 {r.p50_ms} ms  p95 {r.p95_ms} ms  "
          f"p99 {r.p99_ms} ms  max {r.max_ms} ms | RSS broker {r.broker_rss_mib} MiB, api {r.api_rss_mib} MiB, "
          f"sim {r.sim_rss_mib} MiB | CPU ms/command {r.cpu_ms_per_command} (kernel {r.kernel_ms_per_command})"
          + (f" | machine busy {r.machine_busy_cores} cores, stolen by the host {r.machine_steal_cores}"
             if r.machine_busy_cores is not None else "")
          + (f" | API/broker CPU {r.api_to_broker_cpu}x, ceiling {r.ceiling_per_s}/s, carried "
             f"{r.share_of_ceiling:.0%} of it" if r.ceiling_per_s and r.share_of_ceiling is not None else "")
          + (" | p50/p99 ms by phase: " + ", ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in r.phase_ms.items())
             if r.phase_ms else "")
          + (f" | slowest 1 % due at s: {r.slowest_due_s}" if r.slowest_due_s else ""),
          flush=True)


async def broker_baseline(devices: int, rates: list[int], duration: float) -> dict:
    """Latch's broker alone on this machine, in this run (bench/broker.py's command round trips: a service
    sends each of `devices` a QoS 1 command, each answers): the speed the platform is measured against."""
    from bench.broker import Cfg, m_rtt, start_broker

    async with start_broker("latch") as b:
        out = await m_rtt(b, Cfg(devices=devices, rtt_rates=rates, rtt_duration=duration))
    for r in out["runs"]:
        r["broker_cpu_ms_per_round_trip"] = (round(r["broker_cpu_share"] * 1000 / r["achieved_per_s"], 3)
                                             if r["achieved_per_s"] else None)
    return out


async def start_profile(bench: Bench, out: Path, duration: float) -> asyncio.subprocess.Process:
    """py-spy (PyPI `py-spy`) on the first API process for `duration` seconds, sampling every thread at 200 Hz
    without stopping it; collapsed stacks ("raw") to `out`."""
    pid = bench.procs["api-1"].proc.pid
    return await asyncio.create_subprocess_exec(
        "py-spy", "record", "-p", str(pid), "-r", "200", "-f", "raw", "--nonblocking", "-d", str(int(duration)),
        "-o", str(out), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rates", default="200", help="comma-separated fixed rates to run, commands/s")
    ap.add_argument("--duration", type=float, default=15, help="seconds per rate")
    ap.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                    help="also search for the highest rate with p99 under --target-p99-ms")
    ap.add_argument("--target-p99-ms", type=float, default=50)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--database-url", help="PostgreSQL URL (default: SQLite in a temporary data dir)")
    ap.add_argument("--replicas", type=int, default=1, help="API processes (more than 1 needs PostgreSQL)")
    ap.add_argument("--broker", choices=("latch", "mosquitto"), default="latch")
    ap.add_argument("--share-group", help="replicas take device answers as $share/GROUP/... (Mosquitto)")
    ap.add_argument("--profile", type=Path, help="py-spy the first API process during the first rate; collapsed "
                    "stacks to this file (bench/profile_summary.py summarises them)")
    ap.add_argument("--baseline-rates", default="1000,3000,6000,10000,15000",
                    help="command round-trip rates for the broker-alone baseline ('' to skip)")
    args = ap.parse_args()

    baseline = None
    if args.baseline_rates:
        print("the broker alone (baseline, same machine, same run):", flush=True)
        baseline = await broker_baseline(min(args.devices, 1000), [int(x) for x in args.baseline_rates.split(",")], 3.0)

    with tempfile.TemporaryDirectory(prefix="latch-bench-") as tmp:
        bench = Bench(args.devices, Path(tmp), database_url=args.database_url, replicas=args.replicas,
                      broker=args.broker, share_group=args.share_group)
        print(f"starting broker, API and {args.devices} simulated locks ...", flush=True)
        t0 = time.monotonic()
        await bench.start()
        print(f"ready in {time.monotonic() - t0:.1f}s", flush=True)
        runs: list[RunResult] = []
        try:
            for i, rate in enumerate(float(x) for x in args.rates.split(",")):
                spy = await start_profile(bench, args.profile, args.duration) if args.profile and i == 0 else None
                runs.append(await bench.run(rate, args.duration))
                show(runs[-1])
                if spy is not None:
                    await asyncio.wait_for(spy.wait(), 60)
                    print(f"profile of api-1: {args.profile}", flush=True)
            best = None
            if args.search:
                print(f"searching the highest rate with p99 < {args.target_p99_ms} ms:", flush=True)
                lo, hi = 0.0, None
                rate = 50.0
                for _ in range(8):  # bounded: doubling, then bisection
                    r = await bench.run(rate, min(args.duration, 10))
                    show(r)
                    runs.append(r)
                    ok = r.errors == 0 and r.p99_ms < args.target_p99_ms
                    if ok:
                        lo, best = rate, r
                    else:
                        hi = rate
                    rate = rate * 2 if hi is None else (lo + hi) / 2
                    if hi is not None and hi - lo <= max(10.0, lo * 0.1):
                        break
        finally:
            await bench.stop()
    result = {"bench": "e2e", "devices": args.devices, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "database": "postgresql" if args.database_url else "sqlite", "replicas": args.replicas,
              "broker": args.broker, "share_group": args.share_group,
              "runs": [asdict(r) for r in runs],
              "highest_rate_p99_under_target": asdict(best) if best else None,
              "target_p99_ms": args.target_p99_ms, "broker_alone": baseline}
    out = args.out or RESULTS / f"e2e-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if best:
        print(f"highest rate with p99 < {args.target_p99_ms} ms: {best.rate:.0f}/s (p99 {best.p99_ms} ms)")
    if baseline:
        top = baseline["best_rate_p99_under_25ms"]
        print(f"the broker alone: {top}/s command round trips at p99 < 25 ms; end to end: "
              f"{best.achieved_per_s if best else 0}/s at p99 < {args.target_p99_ms} ms")
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())

"""Fleet-command benchmark: one rollout to N simulated locks, and riders' unlocks during it.

Starts `latch broker`, `latch api` and `latch sim` as separate processes on loopback (as bench/e2e.py
does), registers N locks in zone "fleet-bench" plus a few more outside it (the riders' bikes), then:

  * POST /v1/fleet/commands {"action": "locate", "target": {"zone": "fleet-bench"}, "rate_per_min": R}
  * meanwhile, individual unlocks and locks to the riders' bikes at a fixed open-loop rate through the
    HTTP API (?wait=), latency from each one's *scheduled* send time to its final response, for as long
    as the rollout is issuing.

Reported: devices, rate asked vs achieved (from the device commands' creation times), time to
complete (fleet created → completed), per-device command latency (its created → final, p50/p99), and
the individual commands' latency (p50/p99) while the rollout ran.

    python -m bench.fleet                              # 10,000 locks at 30,000/min
    python -m bench.fleet --devices 2000 --rate 12000  # a short run
    python -m bench.fleet --database-url postgresql://latch@127.0.0.1:55432/benchdb

Figures are printed and written to bench/results/fleet-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from bench.procs import Proc, cpu_seconds, free_port, pct

RESULTS = Path(__file__).parent / "results"
ZONE = "fleet-bench"
PREFIX = "sim-"


def ms(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp() * 1000


class FleetBench:
    def __init__(self, devices: int, riders: int, data_dir: Path, database_url: str | None) -> None:
        self.devices, self.riders, self.data_dir, self.database_url = devices, riders, data_dir, database_url
        self.token = "bench-token"
        self.env = {"LATCH_ADMIN_TOKEN": self.token, "LATCH_SERVICE_SECRET": "bench-service-secret",
                    "LATCH_JWT_SECRET": "bench-jwt-secret",
                    "LATCH_COMMAND_KEY_SECRET": "bench-command-key-secret", **({"LATCH_DATABASE_URL": database_url}
                                                                 if database_url else {})}
        self.procs: dict[str, Proc] = {}
        self.api_url = ""
        self.ids = [f"{PREFIX}{i:04d}" for i in range(1, devices + riders + 1)]
        self.fleet_ids, self.rider_ids = self.ids[:devices], self.ids[devices:]

    def http(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(self.api_url, headers={"Authorization": f"Bearer {self.token}"},
                                     connector=aiohttp.TCPConnector(limit=1000),
                                     timeout=aiohttp.ClientTimeout(total=120))

    async def start(self) -> None:
        d = str(self.data_dir)
        migrate = await Proc.start("migrate", "db", "upgrade", "--data-dir", d, env=self.env)
        if await migrate.proc.wait() != 0:
            raise RuntimeError("latch db upgrade failed")
        broker = await Proc.start("broker", "broker", "--data-dir", d, "--mqtt-port", "0", "--log-level", "WARNING",
                                  env=self.env)
        self.port = (await broker.expect(r"default 127\.0\.0\.1:(\d+)")).group(1)
        broker.drain()
        self.procs["broker"] = broker
        api = await Proc.start("api", "api", "--data-dir", d, "--mqtt-port", self.port, "--http-port",
                               str(free_port()), "--log-level", "WARNING", env=self.env)
        self.api_url = (await api.expect(r"API:\s+(http\S+)")).group(1)
        api.drain()
        self.procs["api"] = api
        await self.register()
        sim = await Proc.start("sim", "sim", "--devices", str(len(self.ids)), "--prefix", PREFIX,
                               "--broker", f"127.0.0.1:{self.port}", "--api", self.api_url, "--data-dir", d,
                               "--actuation-delay", "0", "--log-level", "WARNING", env=self.env)
        await sim.expect(r"simulated locks online", timeout=900)
        sim.drain()
        self.procs["sim"] = sim
        await self.wait_online()

    async def register(self) -> None:
        """Through the API, 32 at a time, with the zone; credentials cached where `latch sim` reads them."""
        cache: dict[str, dict] = {}
        gate = asyncio.Semaphore(32)
        async with self.http() as http:
            async def one(device_id: str) -> None:
                body = {"id": device_id, "name": f"Simulated {device_id}"}
                if device_id in fleet_set:
                    body["zone"] = ZONE
                async with gate:
                    async with http.post("/v1/devices", json=body) as r:
                        got = await r.json()
                        if r.status != 201:
                            raise RuntimeError(f"registering {device_id}: {r.status} {got}")
                cache[device_id] = {"id": device_id, "mqtt_password": got["mqtt_password"],
                                    "command_key": got["command_key"]}

            fleet_set = set(self.fleet_ids)
            await asyncio.gather(*(one(i) for i in self.ids))
        path = self.data_dir / f"sim-fleet-{PREFIX.strip('-')}.json"
        path.touch(mode=0o600)
        path.write_text(json.dumps(cache))

    async def wait_online(self) -> None:
        async with self.http() as http:
            for _ in range(600):   # bounded: presence is applied asynchronously
                online = 0
                for offset in range(0, len(self.ids), 1000):
                    async with http.get("/v1/devices", params={"limit": 1000, "offset": offset}) as r:
                        online += sum(d["online"] for d in await r.json())
                if online >= len(self.ids):
                    return
                await asyncio.sleep(0.5)
        raise RuntimeError(f"only {online} of {len(self.ids)} locks came online")

    async def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            await p.stop()

    async def run(self, rate_per_min: int, individual_per_s: float, timeout: float) -> dict:
        cpu_before = {name: p.cpu_s for name, p in self.procs.items()}
        own_before = cpu_seconds(os.getpid())
        loop = asyncio.get_running_loop()
        async with self.http() as http:
            t0 = loop.time()
            async with http.post("/v1/fleet/commands", json={
                    "action": "locate", "target": {"zone": ZONE}, "rate_per_min": rate_per_min,
                    "ttl_s": 600}) as r:
                fleet = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"fleet command refused: {r.status} {fleet}")
            create_ms = (loop.time() - t0) * 1000
            fid = fleet["id"]
            issuing = True
            latencies: list[float] = []
            finals: dict[str, int] = {}

            async def individual(i: int, scheduled: float) -> None:
                device = self.rider_ids[i % len(self.rider_ids)]
                action = "unlock" if (i // len(self.rider_ids)) % 2 == 0 else "lock"
                try:
                    async with http.post(f"/v1/devices/{device}/commands", params={"wait": "30"},
                                         json={"action": action}) as r:
                        body = await r.json()
                    status = body.get("status") if r.status in (200, 201) else f"http_{r.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                    status = f"error_{type(e).__name__}"
                finals[status] = finals.get(status, 0) + 1
                if status == "succeeded":
                    latencies.append((loop.time() - scheduled) * 1000)

            async def riders() -> list[asyncio.Task[None]]:
                tasks, i, start = [], 0, loop.time()
                while issuing:
                    scheduled = start + i / individual_per_s
                    delay = scheduled - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(loop.create_task(individual(i, scheduled)))
                    i += 1
                return tasks

            rider_task = loop.create_task(riders())
            body = fleet
            deadline = t0 + timeout
            while loop.time() < deadline:
                async with http.get(f"/v1/fleet/commands/{fid}") as r:
                    body = await r.json()
                if body["issued"] >= body["total"]:
                    issuing = False
                if body["status"] != "running":
                    break
                await asyncio.sleep(0.25)
            issuing = False
            rider_tasks = await rider_task
            await asyncio.wait(rider_tasks, timeout=60)
            elapsed = loop.time() - t0
            rows: list[dict] = []
            for offset in range(0, body["total"] + 1000, 1000):
                async with http.get(f"/v1/fleet/commands/{fid}/devices",
                                    params={"limit": 1000, "offset": offset}) as r:
                    page = await r.json()
                rows += page
                if len(page) < 1000:
                    break
        issued_at = sorted(ms(x["issued_at"]) for x in rows if x["issued_at"])
        per_device = [ms(x["updated_at"]) - ms(x["issued_at"]) for x in rows
                      if x["issued_at"] and x["status"] in ("succeeded", "failed", "rejected", "expired",
                                                            "timed_out", "cancelled")]
        span_s = (issued_at[-1] - issued_at[0]) / 1000 if len(issued_at) > 1 else float("nan")
        achieved = (len(issued_at) - 1) / span_s * 60 if len(issued_at) > 1 and span_s > 0 else float("nan")
        complete_s = ((ms(body["finished_at"]) - ms(body["created_at"])) / 1000
                      if body.get("finished_at") else None)
        per = max(len(issued_at), 1)
        cpu = {name: round((p.cpu_s - cpu_before[name]) * 1000 / per, 2) for name, p in self.procs.items()}
        cpu["load_generator"] = round((cpu_seconds(os.getpid()) - own_before) * 1000 / per, 2)
        return {
            "devices": body["total"], "fleet_status": body["status"], "fleet_reason": body["reason"],
            "counts": {k: v for k, v in body["counts"].items() if v},
            "rate_asked_per_min": rate_per_min, "rate_achieved_per_min": round(achieved, 1),
            "issue_span_s": round(span_s, 2), "create_request_ms": round(create_ms, 1),
            "time_to_complete_s": round(complete_s, 2) if complete_s is not None else None,
            "observed_s": round(elapsed, 2),
            "device_latency_ms": {"p50": round(pct(per_device, 50), 1), "p99": round(pct(per_device, 99), 1),
                                  "max": round(max(per_device, default=float("nan")), 1), "n": len(per_device)},
            "individual": {"rate_per_s": individual_per_s, "sent": sum(finals.values()), "finals": finals,
                           "p50_ms": round(pct(latencies, 50), 1), "p99_ms": round(pct(latencies, 99), 1),
                           "max_ms": round(max(latencies, default=float("nan")), 1)},
            "rss_mib": {name: round(p.rss_kib / 1024, 1) for name, p in self.procs.items()},
            "cpu_ms_per_device": cpu,
        }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000, help="locks in the rollout")
    ap.add_argument("--riders", type=int, default=20, help="locks outside it, for individual unlocks")
    ap.add_argument("--rate", type=int, default=30_000, help="rollout rate asked, devices per minute")
    ap.add_argument("--individual-rate", type=float, default=5.0, help="individual unlocks/locks per second")
    ap.add_argument("--timeout", type=float, default=900, help="give up waiting for completion after this")
    ap.add_argument("--database-url", help="PostgreSQL URL (a database of its own; default SQLite)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # 10,000 locks: a socket each, in two processes
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    with tempfile.TemporaryDirectory(prefix="latch-bench-fleet-") as tmp:
        bench = FleetBench(args.devices, args.riders, Path(tmp), args.database_url)
        print(f"starting broker, API and {args.devices + args.riders} simulated locks ...", flush=True)
        t0 = time.monotonic()
        try:
            await bench.start()
            print(f"ready in {time.monotonic() - t0:.1f}s; rollout to {args.devices} at {args.rate}/min, "
                  f"{args.individual_rate} individual commands/s meanwhile", flush=True)
            result = await bench.run(args.rate, args.individual_rate, args.timeout)
        finally:
            await bench.stop()
    result = {"bench": "fleet", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "database": "postgresql" if args.database_url else "sqlite", **result}
    ind, dev = result["individual"], result["device_latency_ms"]
    print(f"  {result['devices']} devices: {result['fleet_status']} ({result['counts']})\n"
          f"  rate asked {result['rate_asked_per_min']}/min, achieved {result['rate_achieved_per_min']}/min "
          f"(issued over {result['issue_span_s']}s); complete {result['time_to_complete_s']}s after creation\n"
          f"  per-device command created→final: p50 {dev['p50']} ms, p99 {dev['p99']} ms, max {dev['max']} ms\n"
          f"  individual unlocks/locks during the rollout: {ind['sent']} sent {ind['finals']}, "
          f"p50 {ind['p50_ms']} ms, p99 {ind['p99_ms']} ms, max {ind['max_ms']} ms\n"
          f"  RSS MiB {result['rss_mib']} | CPU ms per device {result['cpu_ms_per_device']}", flush=True)
    out = args.out or RESULTS / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())

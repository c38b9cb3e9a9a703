"""The scale run: the end-to-end unlock benchmark against 1, 2 and 3 API replicas sharing one PostgreSQL
database and one external broker (Debian's Mosquitto, configured by `latch broker-config mosquitto`).

    python -m bench.scale --database-url postgresql://USER@127.0.0.1:PORT/postgres   # an admin URL:
                                                                   # a fresh database is made per run
    python -m bench.scale ... --replicas 1,2,3 --rates 20,40,80 --saturate 200
    python -m bench.scale ... --replica-cpu 0.25 --rates 10 --saturate 120   # each replica a quarter core:
                                                                   # does throughput grow with replicas?
    python -m bench.scale ... --nats                               # events on NATS JetStream, not NOTIFY

For each replica count: a new database, `latch db upgrade`, Mosquitto, N `latch api` (taking device
answers as $share/latch-api/... so each answer is applied by one replica), a 1,000-lock simulator; then
open-loop runs at each --rates value and one at --saturate (far above capacity: what is achieved there is
the sustained throughput). Latency runs from each command's scheduled send to its final answer.
Figures are printed and written to bench/results/scale-<time>.json; docs/scaling.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from bench.e2e import RESULTS, Bench, RunResult, show


def _fresh_database(admin_url: str, name: str) -> str:
    admin = make_url(admin_url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin.set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)


def _pg_settings(admin_url: str) -> dict[str, str]:
    admin = make_url(admin_url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False)) as conn:
        return {k: str(conn.execute(f"SHOW {k}").fetchone()[0])   # type: ignore[index]
                for k in ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", required=True, help="admin URL of a PostgreSQL server (databases are made)")
    ap.add_argument("--replicas", default="1,2,3")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rates", default="20,40", help="open-loop rates to run per replica count, commands/s")
    ap.add_argument("--saturate", type=float, default=200, help="a rate far above capacity (0: skip)")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--broker", choices=("mosquitto", "latch"), default="mosquitto")
    ap.add_argument("--replica-cpu", type=float,
                    help="hold each API replica to this many cores (a cgroup quota, bench/cpu_quota.py), so "
                         "that adding replicas, not the machine, sets the pace")
    ap.add_argument("--nats", action="store_true", help="events between the replicas on NATS JetStream "
                                                        "(a nats-server with JetStream is started) instead of "
                                                        "PostgreSQL NOTIFY")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    result: dict = {"bench": "scale", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(),
                    "devices": args.devices, "broker": args.broker, "postgres": _pg_settings(args.database_url),
                    "replica_cpu": args.replica_cpu, "events": "nats" if args.nats else "postgres-notify",
                    "by_replicas": {}}
    for n in [int(x) for x in args.replicas.split(",")]:
        url = _fresh_database(args.database_url, f"latch_scale_{n}")
        with tempfile.TemporaryDirectory(prefix="latch-scale-") as tmp:
            bench = Bench(args.devices, Path(tmp), database_url=url, replicas=n, broker=args.broker,
                          share_group="latch-api" if args.broker == "mosquitto" else None,
                          replica_cpu=args.replica_cpu, nats=args.nats)
            print(f"== {n} API replica(s), PostgreSQL, {args.broker}, {args.devices} locks: starting ...", flush=True)
            t0 = time.monotonic()
            await bench.start()
            print(f"   ready in {time.monotonic() - t0:.1f}s", flush=True)
            runs: list[RunResult] = []
            try:
                rates = [float(x) for x in args.rates.split(",") if x] + ([args.saturate] if args.saturate else [])
                for rate in rates:
                    runs.append(await bench.run(rate, args.duration))
                    show(runs[-1])
            finally:
                await bench.stop()
        sat = runs[-1] if args.saturate else None
        result["by_replicas"][str(n)] = {"runs": [asdict(r) for r in runs],
                                         "sustained_per_s": sat.achieved_per_s if sat else None}
    base = result["by_replicas"].get("1", {}).get("sustained_per_s")
    for n, r in result["by_replicas"].items():
        if base and r["sustained_per_s"]:
            r["speedup_vs_1"] = round(r["sustained_per_s"] / base, 2)
        print(f"{n} replica(s): sustained {r['sustained_per_s']}/s"
              + (f" ({r.get('speedup_vs_1')}x one replica)" if "speedup_vs_1" in r else ""))
    out = args.out or RESULTS / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())

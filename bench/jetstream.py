"""JetStream throughput on this machine, as Latch uses it (api/push/nats_bus.py): events of a realistic size published
with a Nats-Msg-Id and acknowledged (the relay), and read back by an ordered consumer (each replica's feed).

    python -m bench.jetstream                     # 50,000 events of ~300 bytes, 2 feeds
    python -m bench.jetstream --events 200000 --feeds 4

Prints and writes bench/results/jetstream-<time>.json: publish rate (acknowledged events/s), the rate each feed
reads at, and CPU per event of nats-server and of this client (the API's share of relaying and feeding).
docs/scaling.md's capacity plan quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import nats
import orjson
from nats.js import api as js_api

from bench.natsserver import start_nats
from bench.procs import cpu_seconds

RESULTS = Path(__file__).parent / "results"
EVENT = {"command_id": "0" * 32, "device_id": "sim-0001", "action": "unlock", "status": "succeeded",
         "reason": None, "final": True, "owner": "u" * 32, "at": 1796650000000}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--feeds", type=int, default=2, help="ordered consumers reading everything (API replicas)")
    ap.add_argument("--window", type=int, default=500, help="publishes in flight (the relay's batch)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="latch-js-") as tmp:
        url, server = await start_nats(Path(tmp) / "js")
        nc = await nats.connect(url)
        try:
            js = nc.jetstream(timeout=10)
            await js.add_stream(js_api.StreamConfig(name="BENCH", subjects=["latch.BENCH.>"],
                                                    storage=js_api.StorageType.FILE, duplicate_window=600))
            payload = orjson.dumps([1796650000000, "command", None, EVENT])
            me, srv = os.getpid(), server.proc.pid
            cpu_me, cpu_srv, t0 = cpu_seconds(me), cpu_seconds(srv), time.monotonic()
            for start in range(0, args.events, args.window):   # the relay: a batch in flight, then its acks
                futs = [await js.publish_async(f"latch.BENCH.d.sim-{i % 1000:04d}", payload,
                                               headers={"Nats-Msg-Id": f"{i}.1796650000000"})
                        for i in range(start, min(start + args.window, args.events))]
                await asyncio.gather(*futs)
            pub_s = time.monotonic() - t0
            pub_cpu_me, pub_cpu_srv = cpu_seconds(me) - cpu_me, cpu_seconds(srv) - cpu_srv
            # the feeds: each an ordered consumer of the whole stream, all at once
            done = [asyncio.Event() for _ in range(args.feeds)]
            counts = [0] * args.feeds

            def handler(k: int):   # type: ignore[no-untyped-def]
                async def cb(msg) -> None:   # type: ignore[no-untyped-def]
                    orjson.loads(msg.data)
                    counts[k] += 1
                    if counts[k] == args.events:
                        done[k].set()
                return cb

            cpu_me, cpu_srv, t0 = cpu_seconds(me), cpu_seconds(srv), time.monotonic()
            subs = [await js.subscribe("latch.BENCH.>", stream="BENCH", ordered_consumer=True, cb=handler(k))
                    for k in range(args.feeds)]
            await asyncio.wait_for(asyncio.gather(*(d.wait() for d in done)), 600)
            feed_s = time.monotonic() - t0
            feed_cpu_me, feed_cpu_srv = cpu_seconds(me) - cpu_me, cpu_seconds(srv) - cpu_srv
            for sub in subs:
                await sub.unsubscribe()
        finally:
            await nc.close()
            await server.stop()
    n = args.events
    result = {
        "bench": "jetstream", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(),
        "events": n, "payload_bytes": len(payload), "window": args.window, "feeds": args.feeds,
        "publish_per_s": round(n / pub_s), "publish_cpu_us_per_event": {
            "nats_server": round(pub_cpu_srv / n * 1e6, 1), "client": round(pub_cpu_me / n * 1e6, 1)},
        "feed_per_s_each": round(n / feed_s), "feed_cpu_us_per_event_per_feed": {
            "nats_server": round(feed_cpu_srv / n / args.feeds * 1e6, 1),
            "client": round(feed_cpu_me / n / args.feeds * 1e6, 1)},
    }
    print(json.dumps(result, indent=1))
    out = args.out or RESULTS / f"jetstream-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())

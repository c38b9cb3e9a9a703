"""Chaos benchmark: unlocks keep their promises while the broker, the API and the locks' links die.

Starts `latch broker`, `latch api` and `latch sim` as separate processes on loopback (the locks reach the
broker through a TCP relay in this process, so their connections can be cut the way a cellular link
drops). It then offers unlocks at a fixed open-loop rate, each as a phone app would: one Idempotency-Key
per tap, the same key on every retry after an error, a refusal (503, 429) or a timeout, then following the
command (`GET /v1/commands/{id}?wait=`) until it is final. Meanwhile it kills -9 the broker, the API, both
at once, and cuts the locks' connections, on a schedule fixed by --seed.

After the run (every command final, or its deadline long past) it counts, from the locks' own
actuation records (written by `latch sim` into its data dir) and the API's rows (the `command` table):

    lost                   accepted (the API answered 2xx with the command) but never final
    executed_twice         one command id actuated more than once
    executed_after_expiry  actuated after the command's expires_at
    phantom_opens          an actuation of a command the API has no row for (or of another lock / action)
    false_successes        the API says succeeded but the lock did not actuate, or the lock actuated and the
                           API's final status is not succeeded (both directions counted, and named)

An unlock for an offline lock (or while the API has no broker link) ends `failed` at once: that is the
designed behaviour, not a loss. A 503/429/connection error is not an accepted command: the client retries.

    python -m bench.chaos                         # 10,000 unlocks at 25/s, 12 faults, seed 1
    python -m bench.chaos --commands 400 --rate 20 --faults 4 --seed 7

The figures are printed and written to bench/results/chaos-<time>.json (with a 10 s timeline of the API's
own outcomes, where a backlog shows). tests/bench/test_chaos.py runs a short run of the same code in CI.

Decisions, and why:
- The counts come from the locks' records and the API's database, never from what the app was told: the
  app misses answers by design (it is cut off by every API restart).
- Short TTL (10 s): the run drains, and every command is final, soon after the load ends, so "lost" can be
  told from "still running"; the app stops retrying a tap after 8 s, as a rider would.
- Faults in the middle 70% of the run, one per slot, each waiting for the previous one's restart: the
  schedule's kinds, order, times and down times come from --seed; the tail is calm so the backlog drains.
- The relay lives in this process (not in the simulator), so cutting links needs no hook in `latch sim`.
- The rate is the offered rate, not the achieved one; on a shared two-core machine an API that falls
  behind answers late, and a late answer past the API's grace becomes `timed_out` though the lock opened:
  the "lock_actuated_api_not_succeeded" count is how that shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from api.commands.states import FINAL
from bench.procs import Lives, Proc, cpu_seconds, free_port, machine_busy_seconds, machine_steal_seconds, pct
from firmware.controller import ACTUATION

RESULTS = Path(__file__).parent / "results"
FINAL_STATUSES = frozenset(str(s) for s in FINAL)
FAULT_KINDS = ("broker", "api", "both", "locks")
TOKEN = "chaos-admin-token"
ENV = {"LATCH_ADMIN_TOKEN": TOKEN, "LATCH_SERVICE_SECRET": "chaos-service-secret",
       "LATCH_JWT_SECRET": "chaos-jwt-secret"}


@dataclass
class Config:
    commands: int = 10_000
    rate: float = 25.0                # unlocks offered per second (open loop)
    devices: int = 200
    ttl_s: int = 10                   # each unlock's validity; short, so the run drains soon after the load
    settle_grace_s: float = 5.0       # the API's LATCH_SETTLE_GRACE_S for this run
    faults: int = 12                  # how many faults, cycling through FAULT_KINDS in a seeded order
    max_down_s: float = 3.0           # a killed process stays down 0..this long (seeded) before its restart
    drop_share: float = 0.5           # share of the locks' connections a "locks" fault cuts
    seed: int = 1
    retry_for_s: float = 8.0          # a tap keeps retrying its POST this long after it was scheduled
    max_attempts: int = 12            # ... and at most this many times
    max_in_flight: int = 3000         # taps open at once; beyond it a tap is shed (counted), memory stays bounded
    actuation_delay_s: float = 0.05
    database_url: str | None = None   # PostgreSQL; default SQLite in the run's data dir

    @property
    def duration_s(self) -> float:
        return self.commands / self.rate

    @property
    def follow_s(self) -> float:
        """How long after its scheduled time a tap may follow its command: its retries, its validity, the
        API's grace for a late answer, and a margin for a restart in between."""
        return self.retry_for_s + self.ttl_s + self.settle_grace_s + 10


# ---- the fault schedule -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    at_s: float      # seconds after the load started (planned; a fault waits for the previous one's restart)
    kind: str        # broker | api | both | locks
    down_s: float    # how long the killed process(es) (or the locks' network) stay down


def plan_faults(seed: int, duration_s: float, count: int, max_down_s: float,
                kinds: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    """`count` faults cycling through `kinds` (so 4 faults are one of each), in an order and at times fixed
    by `seed`: one per equal slot of the middle of the run (10%..80%), so the tail of the run is calm and
    every command can end before the count."""
    rng = random.Random(seed)
    order = [kinds[i % len(kinds)] for i in range(count)]
    rng.shuffle(order)
    lo, hi = 0.1 * duration_s, 0.8 * duration_s
    slot = (hi - lo) / max(count, 1)
    return [Fault(round(lo + i * slot + rng.uniform(0, slot / 2), 2), kind, round(rng.uniform(0, max_down_s), 2))
            for i, kind in enumerate(order)]


# ---- the locks' network --------------------------------------------------------------------------------


class LockLinkRelay:
    """A TCP relay between the simulated locks and the broker. `cut()` aborts a share of its connections
    (both ends get a reset, as when a lock's cellular link drops) and refuses new ones for a while; the
    locks reconnect on their own. When the broker side ends (broker killed), the lock side is closed too."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.refuse_until = 0.0
        self.accepted = 0
        self.refused = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self.refuse_until:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 5)
        except (OSError, asyncio.TimeoutError):
            self.refused += 1           # broker down: the lock sees its connection fail and retries later
            writer.transport.abort()
            return
        self.accepted += 1
        link = (writer, up_writer)
        self.links.append(link)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()

        ends = [loop.create_task(pipe(reader, up_writer)), loop.create_task(pipe(up_reader, writer))]
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in ends:
                t.cancel()
            for w in link:
                w.transport.abort()
            with contextlib.suppress(ValueError):
                self.links.remove(link)

    def cut(self, share: float, refuse_s: float, rng: random.Random) -> int:
        """Abort `share` of the open connections (chosen by `rng`); refuse new ones for `refuse_s`."""
        chosen = [link for link in self.links if rng.random() < share]
        self.refuse_until = asyncio.get_running_loop().time() + refuse_s
        for link in chosen:
            for w in link:
                w.transport.abort()
        return len(chosen)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            for w in link:
                w.transport.abort()


# ---- processes that die -----------------------------------------------------------------------------


class Service(Lives):
    """One `latch` process the run kills -9 and starts again with the same arguments. Its CPU time is
    summed over every incarnation (read just before each kill)."""

    def __init__(self, name: str, args: list[str], ready: str, env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.ready = ready
        self.env = env
        self.proc: Proc | None = None
        self.starts = 0
        self.kills = 0
        self.unexpected_exits: list[str] = []
        self.failed_starts: list[str] = []   # why a start had to be tried again (the tail of its output)

    async def start(self, timeout: float = 90, tries: int = 3) -> None:
        last: Exception | None = None
        for _ in range(tries):   # bounded: a restart can lose a race for its port with a dying predecessor
            self.proc = await Proc.start(self.name, *self.args, env=self.env)
            try:
                await self.proc.expect(self.ready, timeout)
            except (RuntimeError, TimeoutError) as e:
                last = e
                self.failed_starts.append(str(e)[-600:])
                await self._reap()
                await asyncio.sleep(0.5)
                continue
            self.proc.drain(keep_tail=True)
            self.starts += 1
            return
        raise RuntimeError(f"{self.name} did not start after {tries} tries: {last}")

    async def _reap(self) -> None:
        if self.proc is None:
            return
        self._bank_cpu()
        if self.proc.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.proc.kill()
        await self.proc.proc.wait()

    def check_alive(self) -> None:
        """Record it when the process died without being killed (a crash is a finding, not noise)."""
        if self.proc is not None and self.proc.proc.returncode is not None:
            self.unexpected_exits.append(f"exit {self.proc.proc.returncode}: {self.proc.output[-1500:]}")
            self.proc = None

    async def kill9(self) -> None:
        self.check_alive()
        if self.proc is not None:
            await self._reap()
            self.proc = None
            self.kills += 1


@dataclass
class FaultDone:
    kind: str
    planned_at_s: float
    at_s: float
    down_s: float
    back_after_s: float          # from the kill (or cut) to the restarted process(es) being ready
    locks_cut: int = 0


class Cluster:
    """Broker, API and simulator as processes, the relay in front of the broker for the locks."""

    def __init__(self, cfg: Config, data_dir: Path) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        self.sim_data_dir = data_dir / "sim-data"   # `latch sim --data-dir`: its credentials, ...
        from device_sim.provision import sim_dir
        self.sim_dir = sim_dir(self.sim_data_dir)   # ... and under it the locks' state and actuation records
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.http_port}"
        env = {**ENV, "LATCH_SETTLE_GRACE_S": str(cfg.settle_grace_s)}
        if cfg.database_url:
            env["LATCH_DATABASE_URL"] = cfg.database_url
        self.env = env
        d = str(data_dir)
        self.broker = Service("broker", ["broker", "--data-dir", d, "--mqtt-port", str(self.mqtt_port),
                                         "--log-level", "WARNING"], r"Latch broker listening", env)
        self.api = Service("api", ["api", "--data-dir", d, "--mqtt-port", str(self.mqtt_port),
                                   "--http-port", str(self.http_port), "--log-level", "WARNING"],
                           r"API:\s+http", env)
        self.relay = LockLinkRelay(self.mqtt_port)
        self.sim: Service | None = None

    @property
    def services(self) -> list[Service]:
        return [s for s in (self.broker, self.api, self.sim) if s is not None]

    async def start(self) -> None:
        upgrade = await Proc.start("migrate", "db", "upgrade", "--data-dir", str(self.data_dir), env=self.env)
        out, _ = await asyncio.wait_for(upgrade.proc.communicate(), 120)
        if upgrade.proc.returncode != 0:
            raise RuntimeError(f"latch db upgrade failed:\n{out.decode(errors='replace')}")
        await self.broker.start()
        await self.api.start()
        await self.relay.start()
        self.sim = Service("sim", ["sim", "--devices", str(self.cfg.devices), "--broker",
                                   f"127.0.0.1:{self.relay.port}", "--api", self.api_url, "--token", TOKEN,
                                   "--data-dir", str(self.sim_data_dir),
                                   "--actuation-delay", str(self.cfg.actuation_delay_s), "--log-level", "WARNING"],
                           r"simulated locks online", self.env)
        await self.sim.start(timeout=300)
        await self.wait_online(timeout=120)

    async def wait_online(self, timeout: float) -> int:
        return await wait_online(self.api_url, self.cfg.devices, timeout)

    async def inject(self, fault: Fault, planned_at: float, t0: float, rng: random.Random) -> FaultDone:
        loop = asyncio.get_running_loop()
        at = loop.time()
        cut = 0
        if fault.kind == "locks":
            cut = self.relay.cut(self.cfg.drop_share, fault.down_s, rng)
            await asyncio.sleep(fault.down_s)
        else:
            victims = {"broker": [self.broker], "api": [self.api], "both": [self.broker, self.api]}[fault.kind]
            for s in victims:
                await s.kill9()
            await asyncio.sleep(fault.down_s)
            for s in victims:   # broker first: the API refuses to start without one
                await s.start()
        return FaultDone(fault.kind, planned_at, round(at - t0, 2), fault.down_s, round(loop.time() - at, 2), cut)

    async def stop(self) -> None:
        for s in reversed(self.services):   # the simulator first: its records are complete when it exits
            await s.stop()
        await self.relay.stop()


async def wait_online(api_url: str, devices: int, timeout: float) -> int:
    """Bounded wait until the API shows `devices` locks online (presence is applied asynchronously);
    returns how many it shows."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    online = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        while loop.time() < deadline:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with http.get(f"{api_url}/v1/devices", params={"limit": "1000"},
                                    timeout=aiohttp.ClientTimeout(total=10)) as r:
                    online = sum(d["online"] for d in await r.json())
            if online >= devices:
                break
            await asyncio.sleep(0.2)
    return online


# ---- the phone app ---------------------------------------------------------------------------------


@dataclass
class Tap:
    """One rider's tap on Unlock, and everything the app saw of it."""
    i: int
    device: str
    key: str
    scheduled: float
    attempts: int = 0
    command_id: str | None = None
    status: str | None = None        # the last status the app saw
    done_at: float | None = None     # when the app saw a final status
    refusals: Counter[str] = field(default_factory=Counter)


class App:
    """Taps Unlock: POST with an Idempotency-Key, retried with the same key on errors and timeouts, then
    follows the command until it is final. Every loop is bounded in attempts and in time."""

    def __init__(self, cfg: Config, api_url: str, http: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.api_url = api_url
        self.http = http
        self.wait_s = min(cfg.ttl_s + cfg.settle_grace_s + 1, 60)

    async def tap(self, t: Tap, rng: random.Random) -> None:
        loop = asyncio.get_running_loop()
        url = f"{self.api_url}/v1/devices/{t.device}/commands"
        body = {"action": "unlock", "ttl_s": self.cfg.ttl_s}
        backoff = 0.2
        while t.attempts < self.cfg.max_attempts:
            t.attempts += 1
            retry_after = 0.0
            try:
                async with self.http.post(url, params={"wait": str(self.wait_s)}, json=body,
                                          headers={"Idempotency-Key": t.key},
                                          timeout=aiohttp.ClientTimeout(total=self.wait_s + 5)) as r:
                    if r.status in (200, 201):
                        got = await r.json()
                        t.command_id, t.status = got["id"], got["status"]
                        if got.get("final"):
                            t.done_at = loop.time()
                        break
                    t.refusals[f"http_{r.status}"] += 1
                    if r.status not in (408, 429) and r.status < 500:
                        return                      # a 4xx refusal: retrying the same request cannot help
                    with contextlib.suppress(ValueError):
                        retry_after = float(r.headers.get("Retry-After", "0"))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                t.refusals[f"error_{type(e).__name__}"] += 1
            pause = max(retry_after, backoff * (0.5 + rng.random()))
            if loop.time() + pause > t.scheduled + self.cfg.retry_for_s:
                return                              # the rider gave up: never accepted
            await asyncio.sleep(pause)
            backoff = min(backoff * 2, 2.0)
        if t.command_id is None or t.done_at is not None:
            return
        await self.follow(t)

    async def follow(self, t: Tap) -> None:
        """GET the command until it is final, through restarts (bounded by the tap's follow window)."""
        loop = asyncio.get_running_loop()
        end = t.scheduled + self.cfg.follow_s
        for _ in range(200):
            remaining = end - loop.time()
            if remaining <= 0:
                return
            try:
                async with self.http.get(f"{self.api_url}/v1/commands/{t.command_id}",
                                         params={"wait": str(int(min(self.wait_s, max(remaining, 1))))},
                                         timeout=aiohttp.ClientTimeout(total=self.wait_s + 5)) as r:
                    if r.status == 200:
                        got = await r.json()
                        t.status = got["status"]
                        if got.get("final"):
                            t.done_at = loop.time()
                            return
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.5)


# ---- what happened: the locks' records and the API's rows --------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    device_id: str
    action: str
    status: str
    created_at: int
    expires_at: int
    reason: str | None = None
    updated_at: int = 0


@dataclass(frozen=True)
class Actuation:
    device: str
    command_id: str
    action: str          # unlock | lock | beep (the controller's ACTUATION names)
    at_ms: int           # wall clock (the API's, on one machine) when the lock started the motor
    ok: bool | None      # the motor's result; None when the record has no result line


def read_rows(data_dir: Path, database_url: str | None = None) -> dict[str, Row]:
    """Every command the API holds, from its database (the truth, not what the app was told)."""
    query = "SELECT id, device_id, action, status, created_at, expires_at, reason, updated_at FROM command"
    if database_url:
        import psycopg

        from api.pg_bus import libpq_dsn

        with psycopg.connect(libpq_dsn(database_url)) as conn:
            rows = conn.execute(query).fetchall()
    else:
        conn = sqlite3.connect(f"file:{data_dir / 'latch.db'}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute(query).fetchall()
        finally:
            conn.close()
    return {r[0]: Row(*r) for r in rows}


def read_actuations(sim_dir: Path) -> list[Actuation]:
    """The locks' own actuation records (format: device_sim/actuations.py): one Actuation per "actuate"
    line, with the result of its "result" line when there is one."""
    from device_sim.actuations import read_actuations as read_lines

    lines = read_lines(sim_dir)
    results: dict[tuple[str, str, int], bool] = {}
    for rec in lines:
        if rec.get("event") == "result":
            results[(rec["device"], rec["command_id"], rec.get("pid", 0))] = bool(rec.get("ok"))
    return [Actuation(rec["device"], rec["command_id"], rec["action"], int(rec["at_ms"]),
                      results.get((rec["device"], rec["command_id"], rec.get("pid", 0))))
            for rec in lines if rec.get("event") == "actuate"]


@dataclass
class Audit:
    lost: list[str]
    executed_twice: list[str]
    executed_after_expiry: list[str]
    phantom_opens: list[str]
    api_succeeded_lock_did_not_actuate: list[str]
    lock_actuated_api_not_succeeded: list[str]

    @property
    def false_successes(self) -> int:
        return len(self.api_succeeded_lock_did_not_actuate) + len(self.lock_actuated_api_not_succeeded)

    def counts(self) -> dict[str, int]:
        return {"lost": len(self.lost), "executed_twice": len(self.executed_twice),
                "executed_after_expiry": len(self.executed_after_expiry), "phantom_opens": len(self.phantom_opens),
                "false_successes": self.false_successes}

    def detail(self) -> dict[str, int]:
        return {"api_succeeded_lock_did_not_actuate": len(self.api_succeeded_lock_did_not_actuate),
                "lock_actuated_api_not_succeeded": len(self.lock_actuated_api_not_succeeded)}

    def examples(self, n: int = 10) -> dict[str, list[str]]:
        return {k: v[:n] for k, v in asdict(self).items() if v}

    @property
    def clean(self) -> bool:
        return not any(self.counts().values())


def timeline(rows: dict[str, Row], bucket_s: float = 10.0) -> list[dict]:
    """Per `bucket_s` of creation time: commands created, by final status, and the API's own median time
    from creation to success (updated_at - created_at): where a backlog built up and drained."""
    if not rows:
        return []
    t0 = min(r.created_at for r in rows.values())
    buckets: dict[int, list[Row]] = {}
    for r in rows.values():
        buckets.setdefault(int((r.created_at - t0) / (bucket_s * 1000)), []).append(r)
    out = []
    for k in sorted(buckets):
        rs = buckets[k]
        ok = [r.updated_at - r.created_at for r in rs if r.status == "succeeded"]
        out.append({"from_s": k * bucket_s, "created": len(rs),
                    "by_status": dict(Counter(r.status for r in rs).most_common()),
                    "succeeded_p50_ms": pct(ok, 50) if ok else None})
    return out


def audit(accepted: Iterable[str], rows: dict[str, Row], actuations: list[Actuation]) -> Audit:
    """The five counts, each as the list of command ids it counts (see the module's docstring)."""
    by_id: dict[str, list[Actuation]] = {}
    for a in actuations:
        by_id.setdefault(a.command_id, []).append(a)
    lost = sorted(cid for cid in set(accepted) if cid not in rows or rows[cid].status not in FINAL_STATUSES)
    twice = sorted(cid for cid, acts in by_id.items() if len(acts) > 1)
    late = sorted({a.command_id for a in actuations
                   if a.command_id in rows and a.at_ms > rows[a.command_id].expires_at})
    phantom = sorted({a.command_id for a in actuations
                      if a.command_id not in rows or rows[a.command_id].device_id != a.device
                      or ACTUATION.get(rows[a.command_id].action) != a.action})
    # a motor that ran (or whose result was never written) opened the lock; a jammed one did not
    # (on the lock the command was for: a motor moving elsewhere is a phantom open, not this success)
    moved = {(a.command_id, a.device) for a in actuations if a.ok is not False}
    not_actuated = sorted(cid for cid, r in rows.items()
                          if r.status == "succeeded" and r.action in ACTUATION and (cid, r.device_id) not in moved)
    not_succeeded = sorted(cid for cid, r in rows.items()
                           if (cid, r.device_id) in moved and r.status != "succeeded")
    return Audit(lost, twice, late, phantom, not_actuated, not_succeeded)


# ---- the run ---------------------------------------------------------------------------------------


async def wait_all_final(data_dir: Path, database_url: str | None, deadline_ms: int, poll_s: float = 0.5) -> int:
    """Bounded wait until the API holds no command that is not final; returns how many are not."""
    open_rows = -1
    while True:
        with contextlib.suppress(sqlite3.Error):
            rows = read_rows(data_dir, database_url)
            open_rows = sum(r.status not in FINAL_STATUSES for r in rows.values())
        if open_rows == 0 or time.time() * 1000 > deadline_ms:
            return open_rows
        await asyncio.sleep(poll_s)


async def offer_taps(cfg: Config, app: App, t0: float, rng: random.Random, run_tag: str,
                     say: Callable[[str], None] | None = None) -> tuple[list[Tap], int]:
    """Offer `cfg.commands` unlocks at `cfg.rate` from loop time `t0` (open loop: the i-th at t0 + i/rate,
    whatever the earlier ones are doing), to the locks in turn (sim-0001, sim-0002, ...), each tap with its
    own key `run_tag`-i; then wait (bounded by the follow window) for every tap to end. (taps, shed: taps not
    made because `cfg.max_in_flight` were open.)"""
    loop = asyncio.get_running_loop()
    taps: list[Tap] = []
    shed = 0
    open_taps: set[asyncio.Task[None]] = set()
    for i in range(cfg.commands):
        scheduled = t0 + i / cfg.rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(open_taps) >= cfg.max_in_flight:
            shed += 1
            continue
        t = Tap(i, f"sim-{i % cfg.devices + 1:04d}", f"{run_tag}-{i}", scheduled)
        taps.append(t)
        task = loop.create_task(app.tap(t, random.Random(rng.random())))
        open_taps.add(task)
        task.add_done_callback(open_taps.discard)
        if say is not None and i and i % max(int(cfg.rate * 30), 1) == 0:
            say(f"  {loop.time() - t0:7.1f}s  {i} offered, {len(open_taps)} open")
    if open_taps:
        await asyncio.wait(open_taps, timeout=cfg.follow_s + 30)
    for task in list(open_taps):
        task.cancel()
    return taps, shed


def tally(cfg: Config, taps: list[Tap], shed: int, rows: dict[str, Row], actuations: list[Actuation],
          still_open: int) -> dict:
    """What a run's taps, the API's rows and the locks' records add up to: the commands by outcome, the five
    counts (`audit`), examples of each, and the latency of the succeeded taps as the app saw it."""
    accepted = {t.command_id for t in taps if t.command_id is not None}
    result = audit(accepted, rows, actuations)
    final_by_status = Counter(rows[c].status for c in accepted if c in rows)
    reasons = Counter(f"{rows[c].status}: {rows[c].reason}" for c in accepted
                      if c in rows and rows[c].status != "succeeded")
    latencies = [(t.done_at - t.scheduled) * 1000 for t in taps if t.status == "succeeded" and t.done_at]
    refusals: Counter[str] = Counter()
    for t in taps:
        refusals.update(t.refusals)
    return {
        "commands": {
            "offered": cfg.commands, "shed_by_load_generator": shed, "accepted": len(accepted),
            "never_accepted": sum(t.command_id is None for t in taps),
            "final": sum(final_by_status[s] for s in FINAL_STATUSES),
            "final_by_status": dict(sorted(final_by_status.items())),
            "not_succeeded_by_reason": dict(reasons.most_common()),
            "api_rows": len(rows), "api_rows_not_final": still_open,
            "api_rows_the_app_never_heard_of": len(set(rows) - accepted),   # the app gave up, yet the API made it
            "api_rows_the_app_never_heard_of_by_status": dict(Counter(rows[c].status for c in set(rows) - accepted)),
            "retried_taps": sum(t.attempts > 1 for t in taps), "attempts": sum(t.attempts for t in taps),
            "refusals_and_errors_by_kind": dict(sorted(refusals.items())),
            "app_saw_final": sum(t.done_at is not None for t in taps),
        },
        "counts": result.counts(),
        "false_success_detail": result.detail(),
        "examples": result.examples(),
        "actuations": len(actuations),
        "latency_ms_succeeded": {"n": len(latencies), "p50": round(pct(latencies, 50), 1),
                                 "p99": round(pct(latencies, 99), 1),
                                 "max": round(max(latencies, default=float("nan")), 1)},
    }


async def run(cfg: Config, data_dir: Path, progress: bool = True) -> dict:
    """One chaos run in `data_dir`; returns the result (what main() prints and writes)."""
    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    cluster = Cluster(cfg, data_dir)
    say(f"starting broker, API and {cfg.devices} simulated locks ...")
    try:
        await cluster.start()
    except BaseException:   # a process that did start is not left running
        await cluster.stop()
        raise
    faults = plan_faults(cfg.seed, cfg.duration_s, cfg.faults, cfg.max_down_s)
    say(f"ready; {cfg.commands} unlocks at {cfg.rate}/s, faults: "
        + ", ".join(f"{f.kind}@{f.at_s:.0f}s" for f in faults))
    rng = random.Random(cfg.seed)
    fault_rng = random.Random(rng.random())
    done_faults: list[FaultDone] = []
    taps: list[Tap] = []
    shed = 0
    loop = asyncio.get_running_loop()
    cpu_before = {s.name: s.cpu_s for s in cluster.services}
    own_before = cpu_seconds(os.getpid())
    busy_before, steal_before, wall_before = machine_busy_seconds(), machine_steal_seconds(), time.monotonic()
    chaos_task: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000),
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            app = App(cfg, cluster.api_url, http)
            t0 = loop.time() + 0.5
            run_tag = f"chaos-{cfg.seed}-{int(time.time())}"

            async def chaos() -> None:
                for f in faults:
                    delay = t0 + f.at_s - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    for s in cluster.services:
                        s.check_alive()
                    done = await cluster.inject(f, f.at_s, t0, fault_rng)
                    done_faults.append(done)
                    say(f"  {done.at_s:7.1f}s  {f.kind:<6} down {f.down_s:.2f}s, back after {done.back_after_s:.2f}s"
                        + (f", {done.locks_cut} lock connections cut" if f.kind == "locks" else ""))

            chaos_task = loop.create_task(chaos())
            taps, shed = await offer_taps(cfg, app, t0, rng, run_tag, say if progress else None)
            await asyncio.wait_for(chaos_task, cfg.duration_s + 60 * max(cfg.faults, 1))
        load_s = loop.time() - t0
        # every command the API holds is final, or its deadline (and a margin for a restart) is past
        horizon_ms = int(time.time() * 1000) + int((cfg.ttl_s + cfg.settle_grace_s + 15) * 1000)
        still_open = await wait_all_final(data_dir, cfg.database_url, horizon_ms)
        for s in cluster.services:
            s.check_alive()
        cpu = {s.name: round(s.cpu_s - cpu_before.get(s.name, 0.0), 2) for s in cluster.services}
        cpu["load_generator"] = round(cpu_seconds(os.getpid()) - own_before, 2)
        wall = max(time.monotonic() - wall_before, 1e-9)
        busy = (machine_busy_seconds() - busy_before) / wall
        steal = (machine_steal_seconds() - steal_before) / wall
        crashes = {s.name: s.unexpected_exits for s in cluster.services if s.unexpected_exits}
    finally:
        if chaos_task is not None and not chaos_task.done():   # an error mid-run: no restart after the stop
            chaos_task.cancel()
            await asyncio.gather(chaos_task, return_exceptions=True)
        await cluster.stop()

    rows = read_rows(data_dir, cfg.database_url)
    actuations = read_actuations(cluster.sim_dir)
    tallied = tally(cfg, taps, shed, rows, actuations, still_open)
    succeeded = tallied["commands"]["final_by_status"].get("succeeded", 0)
    kills = {"broker": cluster.broker.kills, "api": cluster.api.kills,
             "lock_link_cuts": sum(f.kind == "locks" for f in done_faults),
             "lock_connections_cut": sum(f.locks_cut for f in done_faults)}
    return {
        "bench": "chaos", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "database": "postgresql" if cfg.database_url else "sqlite",
        "config": {k: v for k, v in asdict(cfg).items() if k != "database_url"},
        **tallied,
        "kills": kills,
        "faults": [asdict(f) for f in done_faults],
        "unexpected_exits": crashes,
        "failed_starts": {s.name: s.failed_starts for s in cluster.services if s.failed_starts},
        "timeline_10s": timeline(rows),
        "load_s": round(load_s, 1),
        "cpu_s": cpu,
        "cpu_ms_per_succeeded": {k: round(v * 1000 / max(succeeded, 1), 2) for k, v in cpu.items()},
        "machine_busy_cores": round(busy, 2), "machine_steal_cores": round(steal, 2),
    }


def show(result: dict) -> None:
    """A summary table (rich when installed, else plain text)."""
    c, n, lat = result["counts"], result["commands"], result["latency_ms_succeeded"]
    lines = [
        ("offered / accepted / final", f"{n['offered']} / {n['accepted']} / {n['final']}"),
        ("final by status", ", ".join(f"{k} {v}" for k, v in n["final_by_status"].items())),
        ("never accepted (rider gave up)", str(n["never_accepted"])),
        ("refusals and errors seen", ", ".join(f"{k} {v}" for k, v in n["refusals_and_errors_by_kind"].items()) or "-"),
        ("kills", ", ".join(f"{k} {v}" for k, v in result["kills"].items())),
        ("succeeded unlock latency", f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms"),
        ("CPU s", ", ".join(f"{k} {v}" for k, v in result["cpu_s"].items())),
        ("lost", str(c["lost"])),
        ("executed twice", str(c["executed_twice"])),
        ("executed after expiry", str(c["executed_after_expiry"])),
        ("phantom opens", str(c["phantom_opens"])),
        ("false successes", f"{c['false_successes']} ("
         + ", ".join(f"{k} {v}" for k, v in result["false_success_detail"].items()) + ")"),
    ]
    if result["unexpected_exits"]:
        lines.append(("unexpected exits", ", ".join(f"{k} {len(v)}" for k, v in result["unexpected_exits"].items())))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for k, v in lines:
            print(f"  {k:<32} {v}")
        return
    table = Table(title=f"chaos, seed {result['config']['seed']}")
    table.add_column("")
    table.add_column("")
    for k, v in lines:
        table.add_row(k, v)
    Console().print(table)


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    ap.add_argument("--commands", type=int, default=d.commands)
    ap.add_argument("--rate", type=float, default=d.rate, help="unlocks offered per second")
    ap.add_argument("--devices", type=int, default=d.devices)
    ap.add_argument("--ttl", type=int, default=d.ttl_s, dest="ttl_s", help="each unlock's validity, seconds")
    ap.add_argument("--faults", type=int, default=d.faults, help="faults, cycling broker, api, both, locks")
    ap.add_argument("--max-down", type=float, default=d.max_down_s, dest="max_down_s")
    ap.add_argument("--drop-share", type=float, default=d.drop_share, help="share of lock connections a cut drops")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--database-url", help="PostgreSQL URL (default: SQLite in a temporary data dir)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep-data", type=Path, help="run in this data dir and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    cfg = Config(commands=args.commands, rate=args.rate, devices=args.devices, ttl_s=args.ttl_s,
                 faults=args.faults, max_down_s=args.max_down_s, drop_share=args.drop_share, seed=args.seed,
                 database_url=args.database_url)
    return cfg, args


async def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if args.keep_data:
        args.keep_data.mkdir(parents=True, exist_ok=True)
        result = await run(cfg, args.keep_data)
    else:
        with tempfile.TemporaryDirectory(prefix="latch-chaos-") as tmp:
            result = await run(cfg, Path(tmp))
    show(result)
    out = args.out or RESULTS / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")
    return 0 if not any(result["counts"].values()) and not result["unexpected_exits"] else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

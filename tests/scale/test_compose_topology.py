"""docker-compose.yml's `scale` profile started without containers: the same commands, environment and
start-up order, as real processes on loopback (no Docker engine runs here).

Every service's command and environment are read from the compose file itself; only what a container
network provides is translated, explicitly (TRANSLATION below): service hostnames become 127.0.0.1 with
ephemeral ports, container paths become this test's directories, PostgreSQL is the test run's throwaway
cluster. If the compose file's wiring drifts (a wrong flag, a missing variable, a listener nobody opens),
this test fails the way `docker compose --profile scale up` would.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import httpx

from tests.conformance.brokers import free_port, wait_port_open
from tests.dbs import empty_postgres_url
from tests.latch.test_compose import LATCH_MOSQUITTO_DIR, _env, _mosquitto_conf, _services
from tests.natsserver import NatsServer
from tests.procs import LATCH, drain, read_until, run_to_end
from tests.support import eventually, require, stop_process

SIM_DEVICES = 20   # the profile runs 100; fewer keep the test short (the count is the only change)


class Topology:
    def __init__(self, tmp: Path, database_url: str) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.mqtt_port, self.service_port = free_port(), free_port()
        self.config_dir = tmp / "mosquitto-config"      # the volume mosquitto-config
        self.pid_file = tmp / "mosquitto.pid"
        self.api_urls: dict[str, str] = {}
        self.procs: list[asyncio.subprocess.Process] = []
        self.nats_server = NatsServer(tmp / "nats-data")   # the volume nats-data

    # ---- TRANSLATION: what the container network and volumes provide, on loopback -----------------
    def arg(self, value: str) -> str:
        return (value.replace("mqtt://mosquitto:1884", f"mqtt://127.0.0.1:{self.service_port}")
                .replace("nats://nats:4222", self.nats_server.url)
                .replace("mosquitto:1883", f"127.0.0.1:{self.mqtt_port}")
                .replace(LATCH_MOSQUITTO_DIR, str(self.config_dir))
                .replace("/mosquitto/data/", f"{self.tmp / 'mosquitto-data'}/"))

    def command(self, service: str) -> list[str]:
        args = [self.arg(a) for a in _services()[service]["command"]]
        out = []
        it = iter(args)
        for a in it:
            if a == "--database-url":
                out += [a, self.database_url]
                next(it)
            elif a == "--http-port":
                out += [a, "0"]
                next(it)
            elif a == "--devices":
                out += [a, str(SIM_DEVICES)]
                next(it)
            elif a == "--api":
                out += [a, self.api_urls[next(it).split("//")[1].split(":")[0]]]
            else:
                out.append(a)
        if service == "broker-config":   # latch.conf's listeners on loopback, ephemeral ports
            out += ["--port", str(self.mqtt_port), "--service-port", str(self.service_port),
                    "--bind", "127.0.0.1", "--service-bind", "127.0.0.1"]
        return out

    def env(self, service: str) -> dict[str, str]:
        env = {k: self.arg(v) for k, v in _env(_services()[service]).items()}
        if "LATCH_DATABASE_URL" in env:
            env["LATCH_DATABASE_URL"] = self.database_url
        # what the image sets (Dockerfile): a data dir of the container's own, and the address to listen on
        env.update(LATCH_DATA_DIR=str(self.tmp / service / "data"), LATCH_HOST="127.0.0.1")
        if "LATCH_MOSQUITTO_CONFIG_DIR" in env:
            # outside containers the API can signal Mosquitto itself; the sidecar runs here as well
            env["LATCH_MOSQUITTO_PID_FILE"] = str(self.pid_file)
        return env

    # ---- the services, in the profile's start-up order --------------------------------------------
    async def one_shot(self, service: str) -> str:
        code, out = await run_to_end(*self.command(service), env=self.env(service))
        assert code == 0, f"{service} failed:\n{out}"
        return out

    async def start(self, *argv: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                                                    env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    async def mosquitto(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        (self.tmp / "mosquitto-data").mkdir()
        conf = self.tmp / "mosquitto.conf"
        test_only = (["user root"] if os.geteuid() == 0 else []) + [f"pid_file {self.pid_file}"]
        conf.write_text("\n".join(test_only) + "\n" + self.arg(_mosquitto_conf()))
        assert _services()["mosquitto"]["command"][:2] == ["mosquitto", "-c"]
        proc = await self.start(binary, "-c", str(conf))
        drain(proc)
        loop = asyncio.get_running_loop()
        for port in (self.mqtt_port, self.service_port):     # the profile's health check: both listeners open
            await wait_port_open("127.0.0.1", port, loop.time() + 20, proc)

    async def nats(self) -> None:
        """nats-server with JetStream (the profile's image runs the same binary; its health check: JetStream up)."""
        assert "--jetstream" in _services()["nats"]["command"]
        await self.nats_server.start()

    async def reload_sidecar(self) -> None:
        script = self.arg(_services()["mosquitto-reload"]["command"][0])
        assert "$(pidof mosquitto)" in script
        script = script.replace("$(pidof mosquitto)", f"$(cat {self.pid_file})")   # our Mosquitto, not any
        drain(await self.start("sh", "-c", script))

    async def api(self, service: str) -> None:
        proc = await self.start(*LATCH, *self.command(service), env=self.env(service))
        m, _ = await read_until(proc, r"API:\s+(http\S+)")
        drain(proc)
        self.api_urls[service] = m.group(1)

    async def sim(self) -> asyncio.subprocess.Process:
        """The profile restarts it on failure (a lock registered a moment before Mosquitto's reload is
        refused once); so does this, a bounded number of times."""
        for attempt in range(5):
            proc = await self.start(*LATCH, *self.command("sim"), env=self.env("sim"))
            try:
                await read_until(proc, rf"{SIM_DEVICES} simulated locks online", timeout=60)
                drain(proc)
                return proc
            except AssertionError as e:
                if proc.returncode is None or attempt == 4:
                    raise
                last = str(e)
        raise AssertionError(last)

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            await stop_process(proc)
        await self.nats_server.stop()


async def test_the_scale_profile_runs_as_processes_and_unlocks_through_both_replicas(tmp_path: Path) -> None:
    require(shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists(), "mosquitto")
    services = _services()
    assert services["postgres"]["image"].startswith("postgres:")
    topo = Topology(tmp_path, empty_postgres_url())   # postgres: a new, empty database
    try:
        out = await topo.one_shot("migrate")
        assert "upgraded empty -> " in out
        out = await topo.one_shot("broker-config")
        assert "Mosquitto configuration for 0 device(s)" in out
        await topo.mosquitto()
        await topo.nats()
        await topo.reload_sidecar()
        for name in ("api-1", "api-2"):
            await topo.api(name)
        await topo.sim()
        admin = _env(services["api-1"])["LATCH_ADMIN_TOKEN"]
        clients = [httpx.AsyncClient(base_url=topo.api_urls[n], timeout=30,
                                     headers={"Authorization": f"Bearer {admin}"}) for n in ("api-1", "api-2")]
        try:
            for http in clients:
                health = (await http.get("/healthz")).json()
                assert health == {**health, "status": "ok", "broker_connected": True, "nats_connected": True}

            async def fleet_online() -> bool:
                devices = (await clients[1].get("/v1/devices", params={"limit": 1000})).json()
                return len(devices) == SIM_DEVICES and all(d["online"] for d in devices)
            await eventually(fleet_online, timeout=30, interval=0.2, what="the simulated fleet online")
            for i, http in enumerate(clients, start=1):   # an unlock through each replica
                r = await http.post(f"/v1/devices/sim-{i:04d}/commands", params={"wait": 10},
                                    json={"action": "unlock"})
                assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
            metrics = [(await http.get("/v1/metrics")).json() for http in clients]
            assert {m["client_id"] for m in metrics} == {"latch-api-1", "latch-api-2"}
            assert sum(m["singleton_lease"] for m in metrics) == 1
            # the events went through NATS JetStream: relayed by the replica that made them, seen by both
            assert all(m["counts"].get("nats_relayed", 0) > 0 for m in metrics)
            assert metrics[0]["event_head"] > 0 and metrics[1]["event_head"] > 0
        finally:
            for http in clients:
                await http.aclose()
    finally:
        await topo.stop()

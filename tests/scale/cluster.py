"""Several `latch api` processes behind one broker and one PostgreSQL database, as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from device_sim.lock import Behaviour, Credentials, SimulatedLock
from tests.procs import drain, read_until, running
from tests.support import eventually

ADMIN = "replica-admin-token"


@dataclass
class Replica:
    name: str
    url: str
    proc: asyncio.subprocess.Process
    http: httpx.AsyncClient

    async def metrics(self) -> dict:
        return (await self.http.get("/v1/metrics")).json()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)


@dataclass
class Cluster:
    database_url: str
    mqtt_host: str
    mqtt_port: int
    replicas: list[Replica]
    locks: list[SimulatedLock] = field(default_factory=list)

    async def lock(self, device_id: str, behaviour: Behaviour | None = None) -> SimulatedLock:
        r = await self.replicas[0].http.post("/v1/devices", json={"id": device_id})
        assert r.status_code == 201, r.text
        lock = SimulatedLock(Credentials.from_registration(r.json()), behaviour or Behaviour(actuation_delay_s=0.01))
        self.locks.append(lock)
        await lock.start(self.mqtt_host, self.mqtt_port)

        async def online_everywhere() -> bool:
            for rep in self.replicas:
                if (rep.proc.returncode is None
                        and not (await rep.http.get(f"/v1/devices/{device_id}")).json()["online"]):
                    return False
            return True
        await eventually(online_everywhere, timeout=10, what=f"{device_id} online")
        return lock

    async def holder(self) -> Replica:
        """The replica holding the singleton lease (sweeper)."""
        async def find() -> Replica | None:
            for rep in self.replicas:
                if rep.proc.returncode is None and (await rep.metrics())["singleton_lease"]:
                    return rep
            return None
        return await eventually(find, timeout=10, what="a replica holding the lease")


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, database_url: str, n: int, *, ingest: list[bool] | None = None,
                  extra_env: dict[str, str] | None = None) -> AsyncIterator[Cluster]:
    """`latch broker` + n × `latch api` on loopback, sharing `database_url` (already migrated) and secrets."""
    env = {"LATCH_DATABASE_URL": database_url, "LATCH_ADMIN_TOKEN": ADMIN,
           "LATCH_SERVICE_SECRET": "replica-service-secret", "LATCH_JWT_SECRET": "replica-jwt-secret",
           "LATCH_COMMAND_KEY_SECRET": "replica-command-key-secret",
           "LATCH_SETTLE_GRACE_S": "0.5", **(extra_env or {})}
    ingest = ingest or [True] * n
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(
            running("broker", "--data-dir", str(tmp_path / "broker"), "--mqtt-port", "0", env=env))
        m, _ = await read_until(broker, r"default 127\.0\.0\.1:(\d+)")
        port = int(m.group(1))
        drain(broker)
        replicas: list[Replica] = []
        for i in range(n):
            args = ["api", "--data-dir", str(tmp_path / f"api-{i + 1}"), "--mqtt-port", str(port),
                    "--http-port", "0", "--api-client-id", f"latch-api-{i + 1}"]
            if not ingest[i]:
                args.append("--no-ingest")
            proc = await stack.enter_async_context(running(*args, env=env))
            m, _ = await read_until(proc, r"API:\s+(http\S+)")
            drain(proc)
            http = await stack.enter_async_context(httpx.AsyncClient(
                base_url=m.group(1), timeout=30, headers={"Authorization": f"Bearer {ADMIN}"}))
            replicas.append(Replica(f"api-{i + 1}", m.group(1), proc, http))
        c = Cluster(database_url, "127.0.0.1", port, replicas)
        try:
            yield c
        finally:
            await asyncio.gather(*(lock.stop() for lock in c.locks), return_exceptions=True)


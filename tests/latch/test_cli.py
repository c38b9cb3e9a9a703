"""The `latch` command as a user runs it: real processes, real ports, curl-like requests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from tests.support import stop_process

LATCH = [sys.executable, "-m", "latch.cli"]


@asynccontextmanager
async def running(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(*LATCH, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT,
                                                env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        await stop_process(proc)


async def read_until(proc: asyncio.subprocess.Process, pattern: str, timeout: float = 30) -> tuple[re.Match, str]:
    seen = ""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    assert proc.stdout is not None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"no {pattern!r} within {timeout}s; output so far:\n{seen}")
        line = await asyncio.wait_for(proc.stdout.readline(), remaining)
        if not line:
            raise AssertionError(f"process exited ({await proc.wait()}) before {pattern!r}:\n{seen}")
        seen += line.decode()
        if m := re.search(pattern, seen):
            return m, seen


async def test_serve_with_demo_fleet_unlocks_a_bike(tmp_path: Path) -> None:
    async with running("serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", "0",
                       "--demo-fleet", "3") as proc:
        m, out = await read_until(proc, r"Try:")
        api = re.search(r"API:\s+(http\S+)", out).group(1)          # type: ignore[union-attr]
        token = re.search(r"Operator token:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
        assert token == (tmp_path / "admin.token").read_text().strip()
        async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"}) as http:
            devices = (await http.get("/v1/devices")).json()
            assert [d["id"] for d in devices] == ["bike-0001", "bike-0002", "bike-0003"]
            r = await http.post("/v1/devices/bike-0002/commands", params={"wait": 5}, json={"action": "unlock"})
            assert r.json()["status"] == "succeeded"
            assert (await http.get("/v1/devices/bike-0002")).json()["reported"]["locked"] is False
            assert (await http.get("/docs")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_broker_api_and_sim_as_separate_processes(tmp_path: Path) -> None:
    env = {"LATCH_ADMIN_TOKEN": "split-token"}
    async with running("broker", "--data-dir", str(tmp_path), "--mqtt-port", "0", env=env) as broker:
        m, _ = await read_until(broker, r"default 127\.0\.0\.1:(\d+)")
        mqtt_port = m.group(1)
        async with running("api", "--data-dir", str(tmp_path), "--mqtt-port", mqtt_port, "--http-port", "0",
                           env=env) as api:
            m, _ = await read_until(api, r"API:\s+(http\S+)")
            api_url = m.group(1)
            async with running("sim", "--devices", "2", "--broker", f"127.0.0.1:{mqtt_port}", "--api", api_url,
                               "--data-dir", str(tmp_path), env=env) as sim:
                await read_until(sim, r"2 simulated locks online")
                async with httpx.AsyncClient(base_url=api_url,
                                             headers={"Authorization": "Bearer split-token"}) as http:
                    for _ in range(100):  # presence is processed asynchronously: bounded poll
                        if (await http.get("/v1/devices/sim-0002")).json()["online"]:
                            break
                        await asyncio.sleep(0.05)
                    r = await http.post("/v1/devices/sim-0002/commands", params={"wait": 5},
                                        json={"action": "unlock"})
                    assert r.json()["status"] == "succeeded"


async def test_bad_options_give_a_clear_error(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(*LATCH, "serve", "--broker", "nonsense", "--data-dir", str(tmp_path),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert b"mqtt://HOST:PORT" in out

"""`latch sim` as a user runs it: a progress bar (no httpx line per lock), and its locks revoked again
(`--ephemeral` when it stops, `--cleanup` afterwards), all through a real `latch serve`."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import httpx

from tests.procs import read_until, run_to_end, running

TOKEN = "sim-cleanup-token"


async def _ids(api: str) -> set[str]:
    """The devices in service (a revoked one keeps its record and history, and is refused at the broker)."""
    async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        return {d["id"] for d in (await http.get("/v1/devices", params={"limit": 500})).json() if not d["revoked"]}


async def test_sim_ephemeral_and_cleanup_remove_what_it_registered(tmp_path: Path) -> None:
    env = {"LATCH_ADMIN_TOKEN": TOKEN}
    async with running("serve", "--data-dir", str(tmp_path / "serve"), "--http-port", "0", "--mqtt-port", "0",
                       "--demo-fleet", "1", env=env) as serve:
        _, banner = await read_until(serve, r"Ctrl-C stops it\.", timeout=60)
        api = re.search(r"API:\s+(http\S+)", banner).group(1)                     # type: ignore[union-attr]
        broker = re.search(r"mqtt://(127\.0\.0\.1:\d+)", banner).group(1)          # type: ignore[union-attr]
        sim_dir = str(tmp_path / "sim")
        common = ["--broker", broker, "--api", api, "--data-dir", sim_dir]

        # --ephemeral: registered while it runs, gone when it stops
        async with running("sim", "--devices", "5", "--prefix", "eph-", "--ephemeral", *common, env=env) as sim:
            _, out = await read_until(sim, r"5 simulated locks online", timeout=60)
            assert {f"eph-{i:04d}" for i in range(1, 6)} <= await _ids(api)
            sim.send_signal(signal.SIGINT)
            rest, _ = await asyncio.wait_for(sim.communicate(), 30)
            out += rest.decode()
        assert sim.returncode == 0, out
        assert "revoked 5 simulated locks (eph-*)" in out and "latch sim stopped" in out, out
        assert "httpx" not in out and "HTTP Request" not in out and "Traceback" not in out, out
        assert "registering locks" in out, out    # rich's progress (its final state, off a terminal)
        assert not any(d.startswith("eph-") for d in await _ids(api))

        # a plain run leaves its locks registered (a restart reuses them) until --cleanup
        async with running("sim", "--devices", "3", "--prefix", "keep-", *common, env=env) as sim:
            await read_until(sim, r"3 simulated locks online", timeout=60)
            sim.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(sim.wait(), 30) == 0
        assert {"keep-0001", "keep-0002", "keep-0003"} <= await _ids(api)
        code, out = await run_to_end("sim", "--cleanup", "--prefix", "keep-", *common, env=env)
        assert code == 0 and "revoked 3 simulated locks (keep-*)" in out, out
        left = await _ids(api)
        assert not any(d.startswith("keep-") for d in left) and "bike-0001" in left   # only its own
        code, out = await run_to_end("sim", "--cleanup", "--prefix", "keep-", *common, env=env)
        assert code == 0 and "revoked 0 simulated locks" in out, out
        # and the same prefix again: new credentials, in service again
        async with running("sim", "--devices", "1", "--prefix", "keep-", *common, env=env) as sim:
            await read_until(sim, r"1 simulated locks online", timeout=60)
        assert "keep-0001" in await _ids(api)

"""Browser tests: `latch serve` with a simulated fleet as a subprocess, Debian's Chromium driven by Playwright.

Playwright's own browser download does not work here: the tests launch /usr/bin/chromium (Debian's
`chromium` package). Screenshots go to test-artifacts/pages/ (or $LATCH_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import eventually, require, stop_process

CHROMIUM = os.environ.get("LATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("LATCH_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")) / "pages"
ADMIN_TOKEN = "pages-admin-token"


@dataclass
class Served:
    url: str
    admin_token: str
    mqtt: str = ""                 # host:port of the embedded broker
    data_dir: Path | None = None


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """`latch serve --demo-fleet 5` on ephemeral loopback ports."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "latch.cli", "serve", "--demo-fleet", "5", "--http-port", "0", "--mqtt-port", "0",
        "--data-dir", str(tmp_path / "data"), "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "LATCH_ADMIN_TOKEN": ADMIN_TOKEN})
    assert proc.stdout is not None
    output = ""
    try:
        for _ in range(200):   # bounded: start-up prints a few lines
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError(f"latch serve exited:\n{output}")
            output += line.decode(errors="replace")
            if m := re.search(r"Demo fleet:", output):
                break
        m = re.search(r"API:\s+(http\S+)", output)
        assert m, output
        mqtt = re.search(r"MQTT broker:\s+mqtt://(\S+)", output)

        async def drain() -> None:
            while await proc.stdout.readline():   # type: ignore[union-attr]
                pass

        _drainer = asyncio.ensure_future(drain())
        yield Served(m.group(1), ADMIN_TOKEN, mqtt.group(1) if mqtt else "", tmp_path / "data")
    finally:
        await stop_process(proc, 20)


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        async_playwright = None
    require(async_playwright is not None, "the playwright Python package (pip install playwright)")
    require(Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is not None,
            f"Chromium at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as p:   # type: ignore[misc]
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


class TcpProxy:
    """A loopback TCP proxy in front of the API whose connections the test can cut: a real dropped connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.refusing = False   # the server "down": every connection is cut at once

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()
                self.writers.discard(w)

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def drop(self) -> None:
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.drop()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxied(served: Served) -> AsyncIterator[tuple[Served, TcpProxy]]:
    host, port = served.url.split("://", 1)[1].rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    url = await proxy.start()
    try:
        yield Served(url, served.admin_token, served.mqtt, served.data_dir), proxy
    finally:
        await proxy.stop()


@asynccontextmanager
async def sim_locks(served: Served, prefix: str, n: int, *, jam_rate: float = 0.0,
                    drop_rate: float = 0.0, ack_delay: float = 0.0) -> AsyncIterator[list[str]]:
    """`latch sim` as a subprocess: `n` locks PREFIX0001.. with fault knobs, online before this yields."""
    assert served.data_dir is not None and served.mqtt
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "latch.cli", "sim", "--devices", str(n), "--prefix", prefix,
        "--broker", served.mqtt, "--api", served.url, "--token", served.admin_token,
        "--data-dir", str(served.data_dir.parent / f"sim-{prefix}"), "--jam-rate", str(jam_rate),
        "--drop-rate", str(drop_rate), "--ack-delay", str(ack_delay), "--log-level", "WARNING",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    ids = [f"{prefix}{i:04d}" for i in range(1, n + 1)]
    try:
        async with httpx.AsyncClient(base_url=served.url,
                                     headers={"Authorization": f"Bearer {served.admin_token}"}) as h:
            async def online() -> bool:
                r = await h.get("/v1/devices", params={"limit": 1000})
                up = {d["id"] for d in r.json() if d["online"]}
                return set(ids) <= up
            await eventually(online, timeout=30, what=f"simulated locks {prefix}* online")
        yield ids
    finally:
        await stop_process(proc, 20)


def place_bikes(served: Served) -> dict[str, list[float]]:
    """Write each bike's position, as its simulated lock reports it (device_sim/position.py), into the
    device record, and return them. The API's ingest keeps only `locked` and `battery` of a reported
    state for now; this stands in for `pos` passing through, with the very values the locks send."""
    from device_sim.position import position_of

    assert served.data_dir is not None
    db = sqlite3.connect(served.data_dir / "latch.db", timeout=10)
    try:
        ids = [r[0] for r in db.execute("SELECT id FROM device")]
        where = {i: position_of(i) for i in ids}
        for i, pos in where.items():
            db.execute("UPDATE device SET reported = json_set(reported, '$.pos', json(?)) WHERE id = ?",
                       (json.dumps(pos), i))
        db.commit()
    finally:
        db.close()
    return where

"""Browser tests: `latch serve` with a simulated fleet as a subprocess, Debian's Chromium driven by Playwright.

Playwright's own browser download does not work here: the tests launch /usr/bin/chromium (Debian's
`chromium` package). Screenshots go to test-artifacts/pages/ (or $LATCH_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import require, stop_process

CHROMIUM = os.environ.get("LATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("LATCH_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")) / "pages"
ADMIN_TOKEN = "pages-admin-token"


@dataclass
class Served:
    url: str
    admin_token: str


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

        async def drain() -> None:
            while await proc.stdout.readline():   # type: ignore[union-attr]
                pass

        drainer = asyncio.ensure_future(drain())
        yield Served(m.group(1), ADMIN_TOKEN)
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

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        yield Served(url, served.admin_token), proxy
    finally:
        await proxy.stop()

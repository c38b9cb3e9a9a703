"""Debian's Mosquitto as the external broker of a benchmark, configured by `latch broker-config mosquitto`."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from bench.procs import Proc, free_port


async def start_mosquitto(directory: Path, env: dict[str, str]) -> tuple[int, int, Proc]:
    """(devices' port, API replicas' port, the running broker). The registry's files are written first
    (the service user must be in them); the API keeps them current (LATCH_MOSQUITTO_CONFIG_DIR)."""
    port, service_port = free_port(), free_port()
    latch_dir = directory / "latch"
    latch_dir.mkdir(parents=True, exist_ok=True)
    cfg = await Proc.start("broker-config", "broker-config", "mosquitto", "--out", str(latch_dir),
                           "--data-dir", str(directory), "--port", str(port), "--service-port", str(service_port),
                           env=env)
    if await cfg.proc.wait() != 0:
        out = await cfg.proc.stdout.read() if cfg.proc.stdout else b""
        raise RuntimeError(f"latch broker-config failed:\n{out.decode()}")
    conf = directory / "mosquitto.conf"
    conf.write_text("\n".join([
        *(["user root"] if os.geteuid() == 0 else []),
        f"pid_file {directory / 'mosquitto.pid'}", "persistence false", "per_listener_settings false",
        "set_tcp_nodelay true", "log_dest none", "max_queued_messages 10000", f"include_dir {latch_dir}", ""]))
    return port, service_port, await launch_mosquitto(conf, port)


async def launch_mosquitto(conf: Path, port: int) -> Proc:
    """Run Mosquitto with `conf` (what start_mosquitto wrote: again after a kill, the same ports) until it
    accepts connections on `port`."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = await asyncio.create_subprocess_exec(binary, "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    broker = Proc("broker", proc)
    for _ in range(200):   # bounded: until it accepts connections
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            if proc.returncode is not None:
                raise RuntimeError(f"mosquitto exited with {proc.returncode}")
            await asyncio.sleep(0.05)
    broker.drain()
    return broker

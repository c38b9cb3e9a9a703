"""Debian's Mosquitto (2.0.11 at /usr/sbin/mosquitto) as an external broker for Latch, on ephemeral loopback
ports, configured with the files `latch broker-config mosquitto` writes.

Mosquitto's log goes to a pipe that a task reads line by line, so tests await log lines ("running",
"Reloading config.", "Client x disconnected") instead of sleeping or polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from api.registry import mosquitto_config
from tests.conformance.brokers import free_port, mosquitto_binary
from tests.support import require, stop_process

HOST = "127.0.0.1"
START_TIMEOUT = 10.0


def require_mosquitto() -> str:
    binary = mosquitto_binary()
    require(binary is not None, "Debian's mosquitto broker (apt-get install mosquitto; /usr/sbin/mosquitto)")
    assert binary is not None
    return binary


@dataclass
class Tls:
    cert: Path
    key: Path


class Mosquitto:
    """A running Mosquitto and its log."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, tls_port: int | None, pid_file: Path,
                 service_port: int | None = None) -> None:
        self.proc = proc
        self.port = port
        self.service_port = service_port   # the API replicas' listener (their own client ids)
        self.tls_port = tls_port
        self.pid_file = pid_file
        self.lines: list[str] = []
        self._grew = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def service_url(self) -> str:
        return f"mqtt://{HOST}:{self.service_port}"

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._grew.set()
        self._grew.set()

    def mark(self) -> int:
        """The number of log lines read so far: pass it as `after` to wait for a line logged later."""
        return len(self.lines)

    def find(self, pattern: str, after: int = 0) -> int | None:
        rx = re.compile(pattern)
        for i in range(after, len(self.lines)):
            if rx.search(self.lines[i]):
                return i
        return None

    async def wait_log(self, pattern: str, after: int = 0, timeout: float = 10.0) -> int:
        """The index of the first log line at or after `after` matching `pattern` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            self._grew.clear()       # the reader appends only while we await: check, then wait for more
            found = self.find(pattern, after)
            if found is not None:
                return found
            if self._reader.done():
                raise AssertionError(f"Mosquitto exited before logging {pattern!r}:\n{self.log()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"Mosquitto did not log {pattern!r} within {timeout}s:\n{self.log()}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._grew.wait(), remaining)

    def log(self) -> str:
        return "\n".join(self.lines[-80:])

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        await stop_process(self.proc, deadline=5)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._reader, 5)


def main_conf(config_dir: Path, pid_file: Path, tls: Tls | None, tls_port: int | None) -> str:
    """The broker's own configuration: what a host's /etc/mosquitto/mosquitto.conf holds, plus
    `include_dir` of the directory Latch writes (which loads its latch.conf)."""
    lines = []
    if os.geteuid() == 0:
        # as root Mosquitto drops to the user 'mosquitto', which cannot read this test's private tmp dir;
        # on a host, Latch's files are made readable to that user instead (docs/external-brokers.md)
        lines.append("user root")
    lines += [f"pid_file {pid_file}", "persistence false", "per_listener_settings false",
              "log_dest stderr", "log_type error", "log_type warning", "log_type notice", "log_type information",
              "connection_messages true"]
    if tls is not None:
        lines += [f"listener {tls_port} {HOST}", f"certfile {tls.cert}", f"keyfile {tls.key}",
                  "use_username_as_clientid true"]
    lines.append(f"include_dir {config_dir}")
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def running_mosquitto(config_dir: Path, *, tls: Tls | None = None) -> AsyncIterator[Mosquitto]:
    """Mosquitto with Latch's password/ACL files from `config_dir` (already written); its latch.conf is
    (re)written here with a free port. Yields once Mosquitto logged that it is running."""
    binary = require_mosquitto()
    last = ""
    for _attempt in range(3):            # free_port() is racy: another process may take the port first
        port, service_port = free_port(), free_port()
        tls_port = free_port() if tls is not None else None
        (config_dir / mosquitto_config.CONF_FILE).write_text(
            mosquitto_config.conf_text(config_dir, port, HOST, service_port, HOST))
        pid_file = config_dir.parent / "mosquitto.pid"
        conf = config_dir.parent / "mosquitto-main.conf"
        conf.write_text(main_conf(config_dir, pid_file, tls, tls_port))
        proc = await asyncio.create_subprocess_exec(binary, "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        broker = Mosquitto(proc, port, tls_port, pid_file, service_port)
        try:
            await broker.wait_log(r"mosquitto version \S+ running", timeout=START_TIMEOUT)
        except AssertionError as e:
            last = str(e)
            await broker.stop()
            continue
        try:
            yield broker
        finally:
            await broker.stop()
        return
    raise RuntimeError(f"could not start Mosquitto: {last}")

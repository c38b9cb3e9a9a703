"""Start Latch's processes for a benchmark and read their memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

from bench.ports import free_port  # noqa: F401  (re-exported: the benchmarks' one way to a server port)


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _stat_cpu_seconds(raw: str) -> float:
    """User + system CPU seconds from the text of a /proc/PID/stat file."""
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sys_cpu_seconds(pid: int) -> float:
    """System (kernel) CPU seconds a process has used so far (Linux): its socket writes on loopback."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux)."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def cpu_seconds_named(comm: str) -> float:
    """User + system CPU time used so far by every live process called `comm` (e.g. the PostgreSQL
    server's backends, "postgres"). A backend that exits in between takes its time with it."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:   # gone meanwhile
            continue
        if raw[raw.find("(") + 1:raw.rfind(")")] == comm:
            total += _stat_cpu_seconds(raw)
    return total


def _proc_stat_cpu() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent not idle, summed over its cores (Linux /proc/stat)."""
    fields = _proc_stat_cpu()
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields[:7]) - idle) / os.sysconf("SC_CLK_TCK")


def machine_steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this virtual machine wanted it (/proc/stat steal): a
    run with much of it measured a crowded host, and its CPU-per-command figures run high."""
    fields = _proc_stat_cpu()
    return (fields[7] if len(fields) > 7 else 0) / os.sysconf("SC_CLK_TCK")


class Proc:
    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.output = ""

    @classmethod
    async def start(cls, name: str, *args: str, env: dict[str, str] | None = None) -> "Proc":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "latch.cli", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})})
        return cls(name, proc)

    async def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert self.proc.stdout is not None
        while True:
            if (m := re.search(pattern, self.output)) is not None:
                return m
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no {pattern!r} within {timeout}s:\n{self.output[-2000:]}")
            line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            if not line:
                raise RuntimeError(f"{self.name} exited with {await self.proc.wait()}:\n{self.output[-2000:]}")
            self.output += line.decode(errors="replace")

    def drain(self, keep_tail: bool = False) -> None:
        """Keep reading output in the background so the process never blocks on a full pipe; with
        `keep_tail`, the last few KiB stay in `output` (to show why a process died)."""
        async def pump() -> None:
            assert self.proc.stdout is not None
            while line := await self.proc.stdout.readline():
                if keep_tail:
                    self.output = (self.output + line.decode(errors="replace"))[-8192:]
        asyncio.get_running_loop().create_task(pump())

    @property
    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    @property
    def cpu_s(self) -> float:
        return cpu_seconds(self.proc.pid)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Lives:
    """A process a run kills and starts again: `proc`, the one alive now (or None), and its CPU time summed over
    every incarnation (each read just before it goes)."""

    proc: Proc | None = None
    cpu_of_dead_s: float = 0.0

    def _bank_cpu(self) -> None:
        """Add the current incarnation's CPU time to the dead ones' (call just before it is killed or stopped)."""
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.cpu_of_dead_s += cpu_seconds(self.proc.proc.pid)

    @property
    def cpu_s(self) -> float:
        live = 0.0
        if self.proc is not None and self.proc.proc.returncode is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                live = cpu_seconds(self.proc.proc.pid)
        return self.cpu_of_dead_s + live

    async def stop(self) -> None:
        if self.proc is not None:
            self._bank_cpu()
            await self.proc.stop()
            self.proc = None

"""Latch commands as real processes: start one, read its output until it says something, stop it.

The deadlines are generous (a process starting on a machine whose two cores other tests share can take
ten times what it takes alone); they bound a failing test, they do not measure anything."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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


async def read_until(proc: asyncio.subprocess.Process, pattern: str, timeout: float = 90) -> tuple[re.Match, str]:
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


async def run_to_end(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run a `latch` command to completion: (exit code, output)."""
    proc = await asyncio.create_subprocess_exec(*LATCH, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT,
                                                env={**os.environ, **(env or {})})
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await stop_process(proc)
    return proc.returncode or 0, out.decode()


def drain(proc: asyncio.subprocess.Process) -> asyncio.Task[None]:
    """Keep reading a process's output so it never blocks on a full pipe."""
    async def loop() -> None:
        assert proc.stdout is not None
        while await proc.stdout.read(65536):
            pass
    return asyncio.get_running_loop().create_task(loop())

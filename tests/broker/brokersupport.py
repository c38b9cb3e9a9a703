"""Helpers for the broker's own tests: Latch's broker in a subprocess, raw MQTT clients.

The raw client and the subprocess runner are the conformance harness's
(tests/conformance/rawmqtt.py, brokers.py), reused as they are.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

CONFORMANCE = Path(__file__).resolve().parents[1] / "conformance"
if str(CONFORMANCE) not in sys.path:
    sys.path.insert(0, str(CONFORMANCE))

import brokers  # noqa: E402
import rawmqtt  # noqa: E402
import scenarios  # noqa: E402

LATCH_SERVER = CONFORMANCE / "latch_server.py"

__all__ = ["brokers", "rawmqtt", "scenarios", "latch_broker"]


@contextlib.asynccontextmanager
async def latch_broker(*limits: str, data_dir: Path | None = None, port: int = 0) -> AsyncIterator[tuple[str, int]]:
    """Latch's broker in its own process; `limits` are Limits overrides like "max_packet_size=4096"."""
    argv = [sys.executable, str(LATCH_SERVER), "--port", str(port)]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    for item in limits:
        argv += ["--limit", item]
    async with brokers.python_broker_subprocess(argv) as addr:
        yield addr

"""Ctrl-C on `latch serve` with a demo fleet: stopped in order (locks, API, broker), quietly, said once.

Also the first start's broker-link line: a neutral INFO, not the old "broker has no session" that read
as an error (api/link.py)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.procs import read_until, running


async def test_ctrl_c_stops_in_order_quietly_and_says_so(tmp_path: Path) -> None:
    async with running("serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", "0",
                       "--demo-fleet", "30", "--log-format", "text") as proc:
        _, out = await read_until(proc, r"Ctrl-C stops it\.", timeout=60)
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out + rest.decode()
    out += rest.decode()
    assert "gmqtt" not in out and "CLOSED SOCKET" not in out and "Traceback" not in out, out
    assert out.count("Latch stopped.") == 1 and out.rstrip().endswith("Latch stopped."), out
    order = [out.index(s) for s in ("stopping 30 simulated locks", "stopping the API", "stopping the broker",
                                    "Latch stopped.")]
    assert order == sorted(order), out
    assert "INFO latch.link: subscribing to device topics" in out, out
    assert "no session" not in out and "WARNING" not in out, out


async def test_ctrl_c_during_start_up_is_no_traceback(tmp_path: Path) -> None:
    async with running("serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", "0",
                       "--demo-fleet", "50", "--log-format", "text") as proc:
        _, out = await read_until(proc, r"MQTT broker listening", timeout=60)   # the API and locks still to come
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    out += rest.decode()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "gmqtt" not in out and "KeyboardInterrupt" not in out, out

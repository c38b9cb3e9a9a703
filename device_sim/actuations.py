"""The simulator's actuation record: what each lock's motor did, in a file a benchmark reads afterwards.

One JSONL file per simulator process and data dir: `<data dir>/actuations-<pid>-<start ms>.jsonl`
(a restarted `latch sim` writes a new file next to the old ones: read them all,
`actuations-*.jsonl`). One JSON object per line, appended with one write(2) on an O_APPEND
descriptor and so handed to the kernel before the motor moves: a `kill -9` of the simulator loses
no line of an actuation that started (nothing is fsynced: the record survives the process, not a
power cut of the machine). Fields:

    {"v": 1, "event": "actuate", "device": "bike-0001", "command_id": "<32 hex>",
     "action": "unlock" | "lock" | "beep", "at_ms": <wall clock, ms since the epoch>,
     "expires_at": <the command's expires_at, ms>, "before_expiry": <at_ms <= expires_at>,
     "pid": <simulator pid>}
    {"v": 1, "event": "result", "device": ..., "command_id": ..., "action": ...,
     "at_ms": ..., "ok": true | false, "reason": null | "jammed" | ..., "locked": <sensor>, "pid": ...}

An "actuate" line is written before the motor runs: counting them counts executions (a second
"actuate" line for one command id is a double execution; `before_expiry: false` an execution
after expiry; an "actuate" for a command the API did not record as succeeded, a phantom open).
A "result" line follows when the motor stopped (it is missing when the process died mid-run).
`at_ms` and `expires_at` are both on the wall clock of the simulator's host, which is the API's
clock when they share a machine (the controller's own clock is synchronised to the API's).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from device_sim.store import io_pool

_logs: dict[Path, "ActuationLog"] = {}
_logs_lock = threading.Lock()


class ActuationLog:
    """The per-process actuation record in one data dir (shared by every lock of the process there)."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / f"actuations-{os.getpid()}-{time.time_ns() // 1_000_000}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    @classmethod
    def for_dir(cls, data_dir: Path) -> "ActuationLog":
        key = data_dir.resolve()
        with _logs_lock:
            log = _logs.get(key)
            if log is None:
                log = _logs[key] = cls(key)
            return log

    async def append(self, entry: dict[str, Any]) -> None:
        """Append one line; returns when the kernel has it (the write runs on the I/O pool)."""
        line = (json.dumps({"v": 1, **entry, "pid": os.getpid()}, separators=(",", ":")) + "\n").encode()
        await asyncio.get_running_loop().run_in_executor(io_pool(), os.write, self._fd, line)


def read_actuations(data_dir: Path) -> list[dict[str, Any]]:
    """Every line of every actuation record in `data_dir`, file by file (for tests and benchmarks)."""
    out: list[dict[str, Any]] = []
    for path in sorted(data_dir.glob("actuations-*.jsonl")):
        for line in path.read_text().splitlines():
            if line:
                out.append(json.loads(line))
    return out

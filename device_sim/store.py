"""A simulated lock's persisted state: the firmware's own Store, made durable off the event loop.

What is persisted is exactly what the firmware persists: the controller's `persist` record
(`{"executed": [[command id, expires_at, result, reason], ...]}` today — whatever
firmware/controller.py puts in it), in the firmware's file format (firmware/store.py: a
`{"seq": n, "data": ...}` line and its sha256, written to a temp file and renamed over the real
one), one file per lock: `<data dir>/<device id>.state.json`. A restarted simulator loads it
with the firmware's loader and hands it to the controller, as firmware/app.py does at boot, so a
replayed command is answered from the record and never actuated twice.

Decisions:
- The write runs on a small shared thread pool (`io_pool`), never on the event loop: a fleet
  of 1,000 locks in one process persists twice per actuating command.
- It is durable when `durable()` returns: the firmware's Store fsyncs the file before the rename;
  `DurableStore` adds an fsync of the directory after it, which POSIX needs for the rename itself
  to survive a power cut (MicroPython's VFS commits on close, so the firmware has no such call).
- Group commit per lock: a save writes the newest record offered so far (records only grow in
  what they know, so the newest supersedes every older one), and every caller whose record is
  covered by a finished save returns without writing again. Records are numbered when the
  controller produced them (`offer`), not when their effect runs, so effects of two messages
  that interleave at an await can never put an older record over a newer one.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from firmware.store import Store

IO_THREADS = 8   # fsync waits on the disk, not the CPU: a few in flight at once keep the disk's queue busy

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def io_pool() -> ThreadPoolExecutor:
    """The process's thread pool for the simulator's file writes (state and actuation record)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="latch-sim-io")
        return _pool


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableStore(Store):
    """firmware/store.py's Store, plus the directory fsync POSIX needs to make the rename durable."""

    def save(self, data: Any) -> None:
        super().save(data)
        fsync_dir(os.path.dirname(self.path) or ".")


def state_path(data_dir: Path, device_id: str) -> Path:
    return data_dir / f"{device_id}.state.json"


class LockState:
    """One lock's persisted record: loaded once at start, saved durably (off the loop) on demand."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.store = DurableStore(str(path))
        self._offered = 0          # number of the newest record offered
        self._saved = 0            # number of the newest record known durable
        self._latest: Any = None
        self._lock = asyncio.Lock()
        self.saves = 0             # files written (fewer than records offered when saves coalesce)

    def load(self) -> Any:
        """The last record saved completely (or None), recovering a leftover temp file: the firmware's loader.

        Blocking; called once per lock when it is made, like the firmware at boot."""
        record = self.store.load()
        self._offered = self._saved = 0
        return record

    def offer(self, record: Any) -> int:
        """Note `record` as the newest; returns its number for `durable`. Call in the order the
        controller produced the records (synchronously after the controller call)."""
        self._offered += 1
        self._latest = record
        return self._offered

    async def durable(self, number: int) -> None:
        """Return once record `number` (or a newer one) is on disk; writes it if nobody has."""
        if self._saved >= number:
            return
        async with self._lock:
            if self._saved >= number:
                return
            n, record = self._offered, self._latest
            await asyncio.get_running_loop().run_in_executor(io_pool(), self.store.save, record)
            self.saves += 1
            self._saved = max(self._saved, n)

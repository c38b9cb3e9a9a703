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
  of 1,000 locks in one process persists twice per actuating command. The bytes are built on the
  loop with the firmware's own `encode` (one call), so the thread only makes system calls.
- It is durable when `durable()` returns: the temp file is fsynced before the rename, as the
  firmware's Store does; `DurableStore` adds an fsync of the directory after it, which POSIX needs
  for the rename itself to survive a power cut (MicroPython's VFS commits on close, so the
  firmware has no such call), shared by the saves that finish together (DirSync).
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from firmware.store import Store, encode

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


class DirSync:
    """fsync of one directory, shared: one fsync that starts after a caller's rename covers it, so
    locks saving at the same time (on the I/O threads) wait for one directory fsync, not one each."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None   # kept open: two system calls (and GIL hand-backs) fewer per save
        self._cv = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False
        self.fsyncs = 0

    def sync(self) -> None:
        with self._cv:
            self._requested += 1
            mine = self._requested
            while self._done < mine:
                if self._running:
                    self._cv.wait()
                    continue
                self._running, target = True, self._requested
                self._cv.release()
                ok = False
                try:
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY)
                    os.fsync(self._fd)
                    ok = True
                finally:   # a failed fsync covers nobody: the waiters try again, this caller raises
                    self._cv.acquire()
                    self._running = False
                    if ok:
                        self._done = max(self._done, target)
                        self.fsyncs += 1
                    self._cv.notify_all()


_dirs: dict[str, DirSync] = {}


def dir_sync(path: str) -> DirSync:
    with _pool_lock:
        d = _dirs.get(path)
        if d is None:
            d = _dirs[path] = DirSync(path)
        return d


class DurableStore(Store):
    """firmware/store.py's Store (its file format, its loader, its temp-file-and-rename save), split so
    that the bytes are built by the caller and only system calls run on an I/O thread.

    Why not Store.save on the thread: it streams json.dump through a hashing writer, dozens of small
    Python calls, and a thread running Python competes for the GIL with a busy event loop (at 1,000
    locks a save took ~30 ms of wall time that way); firmware.store.encode builds the same bytes in
    one call (~0.1 ms) and the thread then only makes system calls, which release the GIL. Also: the
    file is created 0600, and the directory is fsynced after the rename (see DirSync)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.dir = dir_sync(os.path.abspath(os.path.dirname(path) or "."))

    def encode_next(self, data: Any) -> bytes:
        """The bytes of the next save of `data` (firmware/store.py's format, sequence number included)."""
        return encode(self.seq + 1, data)

    def write(self, blob: bytes) -> None:
        """Store.save's steps for `blob` from encode_next: temp file written and fsynced, renamed over
        the real file, the directory fsynced. Blocking: run it on an I/O thread, one at a time per file."""
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self.dir.sync()
        self.seq += 1

    def save(self, data: Any) -> None:
        self.write(self.encode_next(data))


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
        # figures (device_sim/__init__.py): files written (fewer than records offered when saves
        # coalesce), seconds spent writing them (on the I/O threads), seconds effects waited for them
        self.saves = 0
        self.save_s = 0.0
        self.wait_s = 0.0

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
        started = time.perf_counter()
        try:
            async with self._lock:
                if self._saved >= number:
                    return
                n, blob = self._offered, self.store.encode_next(self._latest)
                self.save_s += await asyncio.get_running_loop().run_in_executor(io_pool(), self._write, blob)
                self.saves += 1
                self._saved = max(self._saved, n)
        finally:
            self.wait_s += time.perf_counter() - started

    def _write(self, blob: bytes) -> float:
        started = time.perf_counter()
        self.store.write(blob)
        return time.perf_counter() - started

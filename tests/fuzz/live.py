"""The live stack for synchronous fuzzers: the real Stack on its own event loop in a thread.

Hypothesis and schemathesis drive requests synchronously (schemathesis through `requests`), so the
server cannot share their thread's event loop: `ThreadedStack` runs the very Stack the other tests use
(tests/support.py: uvicorn on an ephemeral loopback port, the embedded broker, simulated locks) on a loop
of its own, and the fuzzers call it over real HTTP. `ServerLog` keeps what the server logged at ERROR
(uvicorn's "Exception in ASGI application" with its traceback), so a 500 can be reported with its cause.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from device_sim.lock import SimulatedLock
from latch.stack import Stack
from protocol import messages
from tests.support import LiveStack, make_settings

T = TypeVar("T")

START_TIMEOUT_S = 60.0   # a busy 2-core machine: migrations + broker + uvicorn start
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerError:
    """One ERROR record the server logged: where, what, and the exception's last frames."""
    logger: str
    message: str
    exception: str        # "TypeName: message", "" when the record carried none
    where: str            # the innermost frame of the app's own code (api/, protocol/, latch/), else the last one

    def summary(self) -> str:
        return f"{self.exception or self.message} (at {self.where})" if self.where else (self.exception or self.message)


class ServerLog(logging.Handler):
    """Collects the ERROR records of uvicorn and Latch's loggers, thread-safely, in order."""

    LOGGERS = ("uvicorn", "latch")   # uvicorn.error propagates to uvicorn

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self._records: list[ServerError] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        exc, where = "", ""
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            exc = f"{type(e).__name__}: {str(e)[:300]}"
            frames = traceback.extract_tb(e.__traceback__)
            ours = [f for f in frames if any(p in f.filename for p in ("/api/", "/protocol/", "/latch/", "/broker/"))
                    and "site-packages" not in f.filename]
            f = (ours or frames)[-1] if frames else None
            if f is not None:
                where = f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
        with self._cond:
            self._records.append(ServerError(record.name, record.getMessage()[:300], exc, where))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self._records)

    def since(self, mark: int, wait_for_one_s: float = 0.0) -> list[ServerError]:
        """Records after `mark`; with `wait_for_one_s`, wait up to that long for the first one (uvicorn logs a
        500's exception after the response went out, so the client may see the 500 first)."""
        deadline = time.monotonic() + wait_for_one_s
        with self._cond:
            while len(self._records) <= mark:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self._records[mark:])

    def attach(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


class RecordingLock(SimulatedLock):
    """A simulated lock that also keeps every command message it received, decoded, as the device got it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.received: dict[str, dict] = {}
        self.arrived = threading.Condition()

    async def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        try:
            msg = messages.decode_downlink(payload)
        except messages.ProtocolError:
            msg = None
        if msg is not None and msg.get("type") == "cmd":
            with self.arrived:
                self.received[msg["id"]] = msg
                self.arrived.notify_all()
        await super()._on_message(topic, payload, qos, retain)

    def wait_received(self, command_id: str, timeout: float) -> dict | None:
        """The command message `command_id` as the lock received it, waiting up to `timeout` (any thread)."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while command_id not in self.received:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.arrived.wait(left)
            return self.received[command_id]


class ThreadedStack:
    """`with ThreadedStack(tmp_path) as ts:` a started LiveStack (`ts.live`) whose loop runs in a thread."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.settings = make_settings(tmp_path, **overrides)
        self.log = ServerLog()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="latch-live-stack", daemon=True)
        self.live: LiveStack | None = None

    @property
    def url(self) -> str:
        assert self.live is not None
        return self.live.api_url

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        """Run `coro` on the stack's loop and return its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> LiveStack:
        stack = Stack(self.settings)
        await stack.start()
        http = httpx.AsyncClient(base_url=stack.api_url, timeout=CALL_TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {stack.settings.admin_token}"})
        return LiveStack(stack, http)

    async def _stop(self) -> None:
        live = self.live
        if live is None:
            return
        await asyncio.gather(*(lock.stop() for lock in live.locks), return_exceptions=True)
        await live.http.aclose()
        await live.stack.stop()

    def add_lock(self, device_id: str) -> RecordingLock:
        """Register `device_id` and run a RecordingLock for it; returns once the API sees it online."""
        live = self.live
        assert live is not None

        async def go() -> RecordingLock:
            from device_sim.lock import Behaviour, Credentials

            creds = Credentials.from_registration(await live.register(device_id))
            lock = RecordingLock(creds, Behaviour(actuation_delay_s=0.01))
            live.locks.append(lock)
            await live.start_lock(lock)
            return lock

        return self.run(go())

    def __enter__(self) -> "ThreadedStack":
        self._thread.start()
        try:
            self.live = self.run(self._start(), START_TIMEOUT_S)
        except BaseException:
            self._shutdown_loop()
            raise
        self.log.attach()   # after uvicorn configured its loggers
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.detach()
        try:
            self.run(self._stop(), START_TIMEOUT_S)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

"""Broker factories for the differential conformance harness.

Each factory is an async context manager that starts one broker on an
ephemeral loopback port, yields ``(host, port)`` once the port accepts TCP
connections, and tears the broker down on exit.  Every test gets a fresh
broker, so no state (retained messages, persistent sessions, a wedged event
loop) leaks between scenarios.

Registered: ``nats`` (nats-server's MQTT listener, issue 18), ``mosquitto`` (the reference),
``amqtt_plain``/``amqtt_auth`` (amqtt 0.12.1 as shipped, kept as
references for docs/amqtt-defects.md) and ``latch`` (Latch's own broker, broker/, with its durable
store; it has no known defect here). Adding a broker is one decorated function::

    @register_broker("latch", available=_amqtt_available)
    @contextlib.asynccontextmanager
    async def latch() -> AsyncIterator[tuple[str, int]]:
        async with python_broker_subprocess([sys.executable, str(HERE / "latch_server.py")]) as addr:
            yield addr

where ``latch_server.py`` (like ``amqtt_server.py``) starts the broker on
127.0.0.1:0 and prints ``PORT <n>``.  Run brokers under test out of process,
so that a wedged broker cannot hang the test's event loop, and an
``asyncio.wait_for`` deadline can always fire.  Every scenario CONNECTs with
username ``rawmqtt.DEFAULT_USERNAME`` and no password, and uses free-form
topics (``basic/0``, ``barrier/<client>``, ``$test/x``...).  So a broker with
real authentication or a topic ACL needs a test-only credential store and
ACL that accept them.

``available`` returns ``None`` when the broker can run here, or a string
saying why not.  The test is then skipped, or it FAILS when
``LATCH_REQUIRE_ALL`` is set.  Known defects are declared on the tests
(``known.defect``), not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncContextManager

from bench.ports import free_port

HOST = "127.0.0.1"
START_DEADLINE = 10.0
STOP_DEADLINE = 5.0
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BrokerSpec:
    name: str
    factory: Callable[[], AsyncContextManager[tuple[str, int]]]
    available: Callable[[], str | None]


BROKERS: dict[str, BrokerSpec] = {}


def register_broker(name: str, *, available: Callable[[], str | None] = lambda: None):
    """Decorator: register an async-context-manager factory under ``name``."""

    def deco(factory: Callable[[], AsyncContextManager[tuple[str, int]]]):
        if name in BROKERS:
            raise ValueError(f"broker {name!r} registered twice")
        BROKERS[name] = BrokerSpec(name, factory, available)
        return factory

    return deco


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


async def wait_port_open(host: str, port: int, deadline: float, proc: asyncio.subprocess.Process | None = None) -> None:
    """Poll (bounded) until ``host:port`` accepts a TCP connection."""
    delay = 0.01
    for _ in range(1000):
        if proc is not None and proc.returncode is not None:
            raise RuntimeError(f"broker exited early with status {proc.returncode}")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not accepting connections before deadline") from None
            await asyncio.sleep(delay)  # polling an external process with a deadline; no event to await
            delay = min(delay * 2, 0.2)
            continue
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        return
    raise TimeoutError(f"{host}:{port} not accepting connections")


async def stop_process(proc: asyncio.subprocess.Process, deadline: float = STOP_DEADLINE) -> None:
    """SIGTERM, wait with a deadline, then SIGKILL.  Only ever touches ``proc``."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), deadline)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait_for(proc.wait(), deadline)


@contextlib.asynccontextmanager
async def python_broker_subprocess(argv: list[str], *, cwd: str | None = None) -> AsyncIterator[tuple[str, int]]:
    """Start a broker script that prints ``PORT <n>`` on stdout when bound.

    The child's stdin is a pipe we hold open; closing it (or SIGTERM) stops
    the child, so it cannot outlive the test run.  stderr goes to a temp file
    that is echoed if startup fails.
    """
    with tempfile.TemporaryFile() as errf:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=errf,
            cwd=cwd,
        )
        try:
            port = None
            deadline = time.monotonic() + START_DEADLINE
            for _ in range(100):  # a few lines of noise at most before PORT
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), remaining)
                except asyncio.TimeoutError:
                    break
                if not line:
                    break
                if line.startswith(b"PORT "):
                    port = int(line.split()[1])
                    break
            if port is None:
                errf.seek(0)
                raise RuntimeError(f"broker {argv!r} did not report a port: {errf.read()[-2000:]!r}")
            await wait_port_open(HOST, port, deadline, proc)
            yield HOST, port
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            await stop_process(proc)


# ---------------------------------------------------------------------------
# mosquitto
# ---------------------------------------------------------------------------


def mosquitto_binary() -> str | None:
    """``$LATCH_MOSQUITTO`` if set (must be executable), else ``mosquitto`` on PATH or in /usr/sbin."""
    override = os.environ.get("LATCH_MOSQUITTO")
    if override is not None:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def _mosquitto_available() -> str | None:
    return None if mosquitto_binary() else "mosquitto binary not installed (apt-get install mosquitto)"


MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
persistence false
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
"""


@register_broker("mosquitto", available=_mosquitto_available)
@contextlib.asynccontextmanager
async def mosquitto() -> AsyncIterator[tuple[str, int]]:
    """Reference broker: Debian's mosquitto (2.0.x), MQTT 3.1.1 defaults."""
    binary = mosquitto_binary()
    assert binary, "mosquitto not installed"
    last_error: Exception | None = None
    for _attempt in range(3):  # free_port() is racy: retry on a lost race
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="mosq-") as tmp:
            conf = Path(tmp, "mosquitto.conf")
            conf.write_text(MOSQUITTO_CONF.format(port=port, host=HOST))
            with open(Path(tmp, "stderr.log"), "wb") as errf:
                proc = await asyncio.create_subprocess_exec(
                    binary, "-c", str(conf), stdin=asyncio.subprocess.DEVNULL, stdout=errf, stderr=errf
                )
                try:
                    try:
                        await wait_port_open(HOST, port, time.monotonic() + START_DEADLINE, proc)
                    except (RuntimeError, TimeoutError) as exc:
                        last_error = RuntimeError(f"{exc}: {Path(tmp, 'stderr.log').read_text()[-2000:]}")
                        continue
                    yield HOST, port
                    return
                finally:
                    await stop_process(proc)
    raise RuntimeError(f"could not start mosquitto: {last_error}")


# ---------------------------------------------------------------------------
# amqtt (as shipped, plain config, out of process)
# ---------------------------------------------------------------------------


def _amqtt_available() -> str | None:
    try:
        import amqtt  # noqa: F401
    except ImportError:
        return "amqtt not installed in this interpreter"
    return None


@register_broker("amqtt_plain", available=_amqtt_available)
@contextlib.asynccontextmanager
async def amqtt_plain() -> AsyncIterator[tuple[str, int]]:
    """amqtt 0.12.1 Broker, tcp listener, allow_anonymous, no other plugins; own process."""
    async with python_broker_subprocess([sys.executable, str(HERE / "amqtt_server.py")]) as addr:
        yield addr


@register_broker("amqtt_auth", available=_amqtt_available)
@contextlib.asynccontextmanager
async def amqtt_auth() -> AsyncIterator[tuple[str, int]]:
    """amqtt 0.12.1 with allow_anonymous=False: username required (any password).

    Not part of the original brief; it exists because amqtt marks every session
    "anonymous" when allow_anonymous is on, which hides the offline-queue and
    redelivery code paths (claims 4, 5) behind claim 2.
    """
    async with python_broker_subprocess([sys.executable, str(HERE / "amqtt_server.py"), "--require-username"]) as addr:
        yield addr


# ---------------------------------------------------------------------------
# Latch's own broker (broker/), out of process, with its durable SQLite store
# ---------------------------------------------------------------------------


def _latch_available() -> str | None:
    try:
        import broker.core  # noqa: F401
    except ImportError as e:
        return f"Latch's broker cannot be imported: {e}"
    return None


@register_broker("latch", available=_latch_available)
@contextlib.asynccontextmanager
async def latch() -> AsyncIterator[tuple[str, int]]:
    """Latch's broker (broker.server.EmbeddedBroker) with its SQLite store in a temp dir, in its own
    process. Any username is accepted as an anonymous-role identity (see latch_server.py), so the
    scenarios' free-form topics pass the fence while Latch's own topics stay off limits."""
    async with python_broker_subprocess([sys.executable, str(HERE / "latch_server.py")]) as addr:
        yield addr


# ---------------------------------------------------------------------------
# nats-server's MQTT listener (one node, JetStream), the broker of Latch's NATS tier (issue 18)
# ---------------------------------------------------------------------------


def _nats_available() -> str | None:
    from tests.natsserver import nats_server_binary

    try:
        nats_server_binary()
    except AssertionError as e:
        return str(e)
    return None


@register_broker("nats", available=_nats_available)
@contextlib.asynccontextmanager
async def nats() -> AsyncIterator[tuple[str, int]]:
    """nats-server 2.15 with JetStream and its MQTT listener, no authorization (like the other brokers here):
    the MQTT 3.1.1 that Latch's NATS tier runs on. Its deviations are known defects (known.NATS)."""
    from tests.natsserver import NatsServer

    with tempfile.TemporaryDirectory(prefix="latch-nats-") as tmp:
        server = await NatsServer(Path(tmp) / "nats", mqtt=True).start()
        try:
            yield HOST, server.mqtt_port
        finally:
            await server.stop()

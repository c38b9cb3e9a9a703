"""Run Latch's broker on a loopback port for the conformance harness and the crash tests.

Usage: ``python latch_server.py [--data-dir D] [--port P] [--memory] [--limit NAME=VALUE ...]``

Prints ``PORT <n>`` once the listener is bound, then serves until stdin
reaches EOF or SIGTERM/SIGINT arrives. The conformance scenarios CONNECT with
username ``conformance`` (and ``alice``) without a password, so the
credential store here accepts any username as an *anonymous-role* identity
named after it: the real gatekeeper, fence (Latch's topics are off limits to
it) and session-ownership rules still run. A CONNECT without username is
accepted too (``allow_anonymous``). Without ``--data-dir`` the durable store
lives in a temporary directory removed at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker.core import Limits  # noqa: E402
from broker.identity import Identity, Role  # noqa: E402
from broker.server import BrokerOptions, EmbeddedBroker, run  # noqa: E402


class AnyUsername:
    """Test-only credential store: every username is an anonymous-role identity of that name."""

    async def check(self, username: str | None, password: str | None) -> Identity | None:
        return Identity(Role.ANONYMOUS, username) if username else None


def parse_limits(items: list[str]) -> Limits:
    types = {f.name: f.type for f in fields(Limits)}
    values = {}
    for item in items:
        name, _, value = item.partition("=")
        kind = types[name]
        values[name] = value if kind == "str" else (float(value) if kind == "float" else int(value))
    return Limits(**values)


async def main(args: argparse.Namespace, data_dir: Path | None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    options = BrokerOptions(host="127.0.0.1", port=args.port, allow_anonymous=True, data_dir=data_dir,
                            limits=parse_limits(args.limit))
    broker = EmbeddedBroker(options, AnyUsername())
    await broker.start()
    print(f"PORT {broker.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    try:
        loop.add_reader(sys.stdin.fileno(), on_stdin)
    except (OSError, ValueError):   # not a pipe (e.g. /dev/null): signals only
        pass
    await stop.wait()
    await asyncio.wait_for(broker.stop(), 10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--memory", action="store_true", help="no store at all")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE")
    ns = parser.parse_args()
    if ns.memory:
        run(lambda: main(ns, None))
    elif ns.data_dir is not None:
        run(lambda: main(ns, ns.data_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="latch-broker-") as tmp:
            run(lambda: main(ns, Path(tmp)))

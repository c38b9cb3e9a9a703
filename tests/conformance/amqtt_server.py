"""Run an amqtt broker on an ephemeral loopback port (used by brokers.amqtt_plain).

Usage: ``python amqtt_server.py [--require-username]``

Prints ``PORT <n>`` on stdout once the listener is bound, then serves until
stdin reaches EOF or SIGTERM/SIGINT arrives, and shuts the broker down.

amqtt does not expose the bound port publicly; it is only reachable through
the asyncio server object at ``broker._servers[<listener>].instance.sockets``
(checked against amqtt 0.12.1, broker.py ``_start_listeners`` /
``Server.instance``).  Port ``0`` in ``bind`` is passed straight to
``asyncio.start_server`` by ``Broker._split_bindaddr_port``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from amqtt.broker import Broker

LISTENER = "default"



def make_config(allow_anonymous: bool) -> dict:
    """Only the AnonymousAuthPlugin: no $SYS, persistence or logging plugins.

    allow_anonymous=True  -> "amqtt_plain": everyone is accepted, and amqtt
                             flags *every* session as anonymous.
    allow_anonymous=False -> "amqtt_auth": a CONNECT must carry a username
                             (any password); sessions are not anonymous.
    """
    return {
        "listeners": {LISTENER: {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": allow_anonymous}},
    }


def bound_port(broker: Broker, listener: str = LISTENER) -> int:
    server = broker._servers[listener].instance  # noqa: SLF001 - only way to learn the bound port
    return server.sockets[0].getsockname()[1]


async def main() -> None:
    logging.basicConfig(level=logging.CRITICAL, stream=sys.stderr)
    broker = Broker(make_config(allow_anonymous="--require-username" not in sys.argv[1:]))
    await broker.start()
    print(f"PORT {bound_port(broker)}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # stdin EOF (parent gone) also stops us, so an orphaned broker cannot linger.
    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)

    await stop.wait()
    try:
        await asyncio.wait_for(broker.shutdown(), 10)
    except Exception:  # noqa: BLE001 - best effort, we are exiting anyway
        pass


if __name__ == "__main__":
    asyncio.run(main())

"""Loopback ports for servers that tests and benchmarks start as separate processes (one place for it).

A server that is not ours (nats-server, mosquitto, `latch api` on a fixed `--port`, a firmware's broker) must be
told its port before it binds it, so "bind to 0 and read it" cannot be used directly. The usual trick (bind to 0,
close, pass the number on) loses a race on a busy machine: the port comes from the kernel's *ephemeral* range,
and between the close and the server's bind any outgoing connection of any process may be given the same port.
CI saw exactly that (nats-server: "bind: address already in use" while five test processes ran at once), and
a test that kills a server and starts it again on the same port is open to it for the whole test.

So a port is taken from *below* the ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``), where the
kernel never hands out ports for outgoing connections, and reserved for this user across processes by creating a
file named after it with O_EXCL in one directory: two tests running at once never get the same port, and a port
stays reserved for RESERVE_S (long enough for the longest test that restarts a server on it). A reservation
older than that is taken over. Where the range below is too small (a machine whose ephemeral range starts low),
the old bind-to-0 is used.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
from pathlib import Path

RESERVE_S = 1800.0   # how long a port stays ours once handed out (a test that restarts a server reuses it)
LOW = 20000          # the lowest port handed out (below: ports other software on a developer's machine uses)
ATTEMPTS = 200       # bounded: picks tried before falling back to the kernel's choice


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _reservations() -> Path:
    d = Path(tempfile.gettempdir()) / f"latch-ports-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _reserve(directory: Path, port: int) -> bool:
    """Claim `port` for this process (True), unless someone claimed it less than RESERVE_S ago."""
    path = directory / str(port)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        pass
    try:
        if time.time() - path.stat().st_mtime < RESERVE_S:
            return False
        # Stale: take it over by renaming a fresh claim of ours onto it (atomic; the loser of two takers sees
        # the winner's fresh mtime on its next pick and moves on).
        mine = directory / f".{port}.{os.getpid()}"
        mine.touch(mode=0o600)
        os.replace(mine, path)
        return True
    except OSError:
        return False


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers bind (TIME_WAIT is no owner)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` (loopback) that nothing holds now, that no outgoing connection will be given, and
    that no other caller of this function gets for RESERVE_S: pass it to a server that binds it soon."""
    high = _ephemeral_low()
    if high - LOW < 1000:
        return _kernel_port(host)
    directory = _reservations()
    rng = random.Random()
    for _ in range(ATTEMPTS):
        port = rng.randrange(LOW, high)
        if _bindable(host, port) and _reserve(directory, port):
            return port
    return _kernel_port(host)

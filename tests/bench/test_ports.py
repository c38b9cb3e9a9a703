"""bench/ports.py: ports for servers started as separate processes never collide, here or in another process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import ports
from bench.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def test_ports_come_from_below_the_ephemeral_range_and_are_bindable() -> None:
    low = ports._ephemeral_low()
    got = [free_port() for _ in range(20)]
    assert len(set(got)) == 20
    for port in got:
        assert ports.LOW <= port < low, f"{port} is where the kernel hands out ports for outgoing connections"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_processes_taking_ports_at_once_never_get_the_same_one() -> None:
    code = "from bench.ports import free_port\nprint(' '.join(str(free_port()) for _ in range(25)))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    taken: list[int] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        taken += [int(x) for x in out.split()]
    assert len(taken) == 100
    assert len(set(taken)) == 100, "two processes were given the same port"


def test_a_reservation_is_kept_until_it_is_stale_then_taken_over(tmp_path: Path) -> None:
    assert ports._reserve(tmp_path, 23456)
    assert not ports._reserve(tmp_path, 23456)
    old = time.time() - ports.RESERVE_S - 1
    os.utime(tmp_path / "23456", (old, old))
    assert ports._reserve(tmp_path, 23456)
    assert not ports._reserve(tmp_path, 23456)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["23456"]


def test_a_port_a_server_listens_on_is_not_handed_out() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not ports._bindable("127.0.0.1", s.getsockname()[1])

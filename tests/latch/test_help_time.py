"""`latch --help` answers in under 0.3 s (issue 17: it took 1.1-2.4 s when the parser imported the database layer).

Measured as the process's CPU time (user + system, from wait4), the best of a few runs: that is what the
command costs, and unlike wall time it does not grow when other tests share the machine's two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

LIMIT_S = 0.3


def _cpu_and_wall(argv: list[str]) -> tuple[float, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()   # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0 and b"usage: latch" in out, out.decode(errors="replace")
    return usage.ru_utime + usage.ru_stime, wall


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]])
def test_help_takes_under_0_3_s(argv: list[str]) -> None:
    # the console script `latch` as installed (in the venv beside this interpreter), else `python -m latch.cli`
    script = os.path.join(os.path.dirname(sys.executable), "latch")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "latch.cli"]
    runs = [_cpu_and_wall(cmd + argv) for _ in range(5)]
    cpu = min(c for c, _ in runs)
    print(f"\nlatch {' '.join(argv)}: CPU {[round(c, 3) for c, _ in runs]} s, wall {[round(w, 3) for _, w in runs]} s")
    assert cpu < LIMIT_S, runs

"""ruff (lint and import order, [tool.ruff] in pyproject.toml) finds nothing in the source, tests and benchmarks:
`./run test` and CI keep it so (issue 16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, ("ruff check found these (fix them; `ruff check --fix` mends the fixable):\n"
                              f"{r.stdout}{r.stderr}")

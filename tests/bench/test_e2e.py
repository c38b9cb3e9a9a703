"""`./run bench` (bench/e2e.py) on a fresh data directory: broker, API and simulated locks as processes, the
broker-alone baseline beside them, JSON written, and each command's time split by phase from its history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.e2e import PHASES, phases_of, slowest_due
from tests.dbs import run_database_url

REPO = Path(__file__).resolve().parents[2]


def test_a_commands_time_is_split_at_the_points_its_history_records() -> None:
    history = [{"event": "created", "at": "2026-12-07T22:00:00.010000Z", "applied": True},
               {"event": "dispatch", "at": "2026-12-07T22:00:00.012000Z", "applied": True},
               {"event": "device_received", "at": "2026-12-07T22:00:00.020000Z", "applied": True},
               {"event": "device_received", "at": "2026-12-07T22:00:00.900000Z", "applied": False},   # a duplicate
               {"event": "device_succeeded", "at": "2026-12-07T22:00:00.050000Z", "applied": True}]
    t0 = 1796680800.0   # 2026-12-07T22:00:00Z
    split = phases_of(history, t0, t0 + 0.002, t0 + 0.060)
    assert split is not None
    assert {k: round(v, 3) for k, v in split.items()} == {
        "generator": 2.0, "intake": 8.0, "dispatch": 2.0, "to_lock": 8.0, "actuate": 30.0, "answer": 10.0}
    assert [name for name, _, _ in PHASES] == list(split)
    assert phases_of(history[:2], t0, t0, t0 + 1) is None   # never reached the lock: no split


def test_the_slowest_hundredth_is_binned_by_when_it_was_due() -> None:
    due = [(10.0, i / 100) for i in range(400)] + [(900.0, 1.04), (800.0, 1.01), (700.0, 3.0), (600.0, 3.02)]
    assert slowest_due(due) == {"1.0": 2, "3.0": 2}
    assert slowest_due([]) is None


@pytest.mark.timeout(300)
def test_run_bench_measures_a_small_fleet_beside_the_broker_alone(tmp_path: Path) -> None:
    """On this run's database: SQLite, or on the PostgreSQL pass a PostgreSQL database (issue 13, goal 5)."""
    out = tmp_path / "e2e.json"
    url = run_database_url()
    # LATCH_ADMIT_MAX_QUEUE_MS, as tests/support.py make_settings says: on a machine shared by the test passes the
    # database queue may stand past the production 100 ms, and admission would answer 503 (by design); here the
    # run must measure commands, not refusals (tests/api/test_admission.py tests those)
    env = {**os.environ, "LATCH_ADMIT_MAX_QUEUE_MS": "5000"}
    proc = subprocess.run([sys.executable, "-m", "bench.e2e", "--devices", "50", "--rates", "20", "--duration", "2",
                           "--no-search", "--baseline-rates", "200", "--out", str(out),
                           *(["--database-url", url] if url else [])],
                          cwd=REPO, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["database"] == ("postgresql" if url else "sqlite")
    run = result["runs"][0]
    assert run["sent"] == 40 and run["succeeded"] == 40 and run["errors"] == 0, run
    assert set(run["phase_ms"]) == {name for name, _, _ in PHASES}
    assert all(v["p50"] >= 0 and v["p99"] >= v["p50"] for v in run["phase_ms"].values()), run["phase_ms"]
    assert sum(run["slowest_due_s"].values()) == 1   # 1 % of 40, at least one
    assert run["api_to_broker_cpu"] is not None and run["cpu_ms_per_command"]["broker"] > 0
    assert "p50/p99 ms by phase" in proc.stdout and "the broker alone" in proc.stdout

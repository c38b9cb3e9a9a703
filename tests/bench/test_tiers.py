"""The broker tiers benchmark (bench/tiers.py): its failure window is measured from the taps' outcomes, and a
small run of all three tiers (a 3-node NATS cluster losing a node, Mosquitto and Latch's broker killed -9 and
started again) loses nothing, runs nothing twice or after its expiry, and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.chaos import Row, Tap
from bench.tiers import longest_failure_window, main, phase_figures
from tests.conformance.brokers import mosquitto_binary
from tests.support import require

T0 = 100.0                 # the load's clock starts here (loop time)
WALL = 1_000_000_000_000   # wall clock ms at T0


def tap(i: int, at_s: float, status: str | None, done_after_s: float = 0.1) -> tuple[Tap, Row | None]:
    t = Tap(i, "sim-0001", f"k{i}", T0 + at_s, command_id=None if status is None else f"c{i}",
            status=status, done_at=T0 + at_s + done_after_s if status else None)
    row = None if status is None else Row(f"c{i}", "sim-0001", "unlock", status, int(WALL + at_s * 1000),
                                          int(WALL + at_s * 1000 + 10_000),
                                          updated_at=int(WALL + (at_s + done_after_s) * 1000))
    return t, row


def history(spec: list[tuple[float, str | None]]) -> tuple[list[Tap], dict[str, Row]]:
    taps, rows = [], {}
    for i, (at, status) in enumerate(spec):
        t, r = tap(i, at, status)
        taps.append(t)
        if r is not None:
            rows[r.id] = r
    return taps, rows


def test_the_longest_failure_window_runs_from_the_first_failed_tap_to_the_next_success() -> None:
    taps, rows = history([(0.0, "succeeded"), (1.0, "failed"), (2.0, None), (3.0, "succeeded"),
                          (4.0, "timed_out"), (4.5, "succeeded"), (5.0, "failed")])
    assert longest_failure_window(taps, rows, T0, end=10.0) == {"s": 5.0, "from_s": 5.0, "taps": 1}   # to the end
    assert longest_failure_window(taps, rows, T0, end=6.0) == {"s": 2.0, "from_s": 1.0, "taps": 2}
    ok, ok_rows = history([(0.0, "succeeded"), (1.0, "succeeded")])
    assert longest_failure_window(ok, ok_rows, T0, end=2.0)["s"] == 0.0


def test_phase_figures_count_the_taps_made_in_the_phase_and_the_unlocks_completed_in_it() -> None:
    taps, rows = history([(0.0, "succeeded"), (0.5, "succeeded"), (1.0, "failed"), (1.5, "succeeded"),
                          (1.95, "succeeded")])
    f = phase_figures(taps, rows, T0, 1.0, 2.0, WALL)
    assert (f["taps"], f["succeeded"]) == (3, 2)
    assert f["completed_per_s"] == 1.0        # 1.5 + 0.1 done inside, 1.95 + 0.1 done after the phase
    assert f["p99_ms"] == pytest.approx(100, abs=1)


@pytest.mark.timeout(240)
async def test_a_small_run_of_the_three_tiers_keeps_every_promise(tmp_path: Path) -> None:
    """100 locks, 40 unlocks per tier at 10/s, one kill -9 per tier at 1.5 s, the node back at 3 s."""
    require(mosquitto_binary() is not None, "Debian's mosquitto broker (apt-get install mosquitto)")
    out = tmp_path / "tiers.json"
    await main(["--devices", "100", "--rate", "10", "--duration", "4", "--kill-at", "1.5", "--restart-at", "3",
                "--ttl", "5", "--out", str(out), "--keep-data", str(tmp_path / "data")])
    result = json.loads(out.read_text())
    assert [t["tier"] for t in result["tiers"]] == ["nats", "mosquitto", "latch"]
    assert result["config"]["nats_auth"] == "callout"   # the cluster `latch broker-config nats` configures
    for t in result["tiers"]:
        summary = {k: t[k] for k in ("tier", "counts", "commands", "fault", "examples", "unexpected_exits",
                                     "longest_failure_window")}
        assert t["counts"]["lost"] == 0, summary
        assert t["counts"]["executed_twice"] == 0, summary
        assert t["counts"]["executed_after_expiry"] == 0, summary
        assert t["commands"]["offered"] == 40 and t["commands"]["api_rows_not_final"] == 0, summary
        assert "killed" in t["fault"] and "back_at_s" in t["fault"], summary   # the kill and the restart happened
        assert not t["unexpected_exits"], summary
        # the unlocks before the kill went through: the tier was carrying the fleet when it lost its node
        before = t["phases"]["before_kill"]
        assert 15 <= before["taps"] <= 16 and before["succeeded"] >= 10, summary

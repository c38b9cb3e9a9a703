"""Atomic state store: CPython behaviour, and power cuts on littlefs/FAT under MicroPython."""
import pytest

from firmware.store import Store, encode
from tests.firmware.fwsupport import MP_DIR, run_mp


def test_store_roundtrip_and_tmp_recovery(tmp_path):
    path = str(tmp_path / "state.json")
    st = Store(path)
    assert st.load() is None and st.recovered == "none"
    st.save({"executed": [["a" * 32, 1, "succeeded", None]]})
    st.save({"executed": [["b" * 32, 2, "succeeded", None]]})
    assert Store(path).load() == {"executed": [["b" * 32, 2, "succeeded", None]]}
    # a complete temp file left by a cut between "write temp" and "rename" wins when newer
    (tmp_path / "state.json.tmp").write_bytes(encode(3, {"executed": [["c" * 32, 3, "failed", "jammed"]]}))
    st2 = Store(path)
    assert st2.load() == {"executed": [["c" * 32, 3, "failed", "jammed"]]} and st2.recovered == "tmp"
    assert not (tmp_path / "state.json.tmp").exists()
    # a torn temp file is ignored and removed
    raw = encode(4, {"executed": []})
    (tmp_path / "state.json.tmp").write_bytes(raw[: len(raw) // 2])
    assert Store(path).load()["executed"][0][0] == "c" * 32
    assert not (tmp_path / "state.json.tmp").exists()
    # a torn real file with no temp: nothing to believe
    (tmp_path / "state.json").write_bytes(raw[:-3])
    assert Store(path).load() is None
    # only the temp survives (FAT removes the destination before renaming)
    (tmp_path / "state.json").unlink()
    (tmp_path / "state.json.tmp").write_bytes(raw)
    assert Store(path).load() == {"executed": []}


@pytest.mark.parametrize("fs,torn", [("lfs2", False), ("fat", False), ("lfs2", True), ("fat", True)])
def test_power_cut_every_k(micropython, fs, torn):
    args = [fs] + (["torn"] if torn else [])
    r = run_mp(micropython, MP_DIR / "powercut.py", *args, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().startswith("OK %s" % fs), r.stdout
    assert "tmp:" in r.stdout  # the cut did land between temp write and rename

"""`latch firmware build`: every firmware file (and protocol/) compiled by mpy-cross."""
import argparse
import subprocess

import pytest

from firmware.tools import add_parser
from firmware.tools.build import BuildError, build, sources
from tests.firmware.fwsupport import REPO, mp_env


def cli(*argv):
    parser = argparse.ArgumentParser(prog="latch")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_build_compiles_every_file(mpy_cross, tmp_path, capsys):
    out = tmp_path / "fw"
    assert cli("firmware", "build", "--out", str(out), "--mpy-cross", mpy_cross) == 0
    printed = capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    want = sorted([s.with_suffix(".mpy").as_posix() for s in sources()] + ["main.py"])
    assert files == want
    assert "firmware/tools" not in printed and "built %d files" % len(want) in printed
    for name in ("firmware/controller.mpy", "firmware/mqtt.mpy", "firmware/hal_esp32.mpy",
                 "firmware/store.mpy", "protocol/messages.mpy", "protocol/signing.mpy"):
        data = (out / name).read_bytes()
        assert data[:1] == b"M" and data[1] == 6, name  # .mpy version 6 (MicroPython 1.2x)


def test_build_refuses_what_micropython_cannot_compile(mpy_cross, tmp_path, monkeypatch):
    import firmware.tools.build as b
    bad = tmp_path / "repo"
    (bad / "firmware").mkdir(parents=True)
    (bad / "protocol").mkdir()
    (bad / "firmware" / "board_main.py").write_text("")
    (bad / "firmware" / "ok.py").write_text("x = 1\n")
    (bad / "firmware" / "bad.py").write_text("def f(:\n    pass\n")
    monkeypatch.setattr(b, "REPO", bad)
    monkeypatch.setattr(b, "BOARD_MAIN", bad / "firmware" / "board_main.py")
    with pytest.raises(BuildError, match="bad.py"):
        build(tmp_path / "out", mpy_cross=mpy_cross, log=lambda *a: None)


def test_built_firmware_runs_the_controller_cases(micropython, mpy_cross, tmp_path):
    """The device's copy of protocol/ (server-only functions left out) behaves the same."""
    out = tmp_path / "fw"
    build(out, mpy_cross=mpy_cross, log=lambda *a: None)
    # only the built folder on the path: nothing from the repository's sources
    env = dict(mp_env(), MICROPYPATH=":".join([str(out), ".frozen"]))
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from firmware.controller import LockController\n"
        "from protocol import messages as m, signing\n"
        "import json\n"
        "key = bytes(range(32))\n"
        "c = LockController('bike-0001', key)\n"
        "c.on_connected(1000)\n"
        "text = 'latch-time-v1\\nbike-0001\\n%d\\n1700000000000' % c.sync_nonce\n"
        "reply = {'v': 1, 'type': 'time', 'device': 'bike-0001', 't0': c.sync_nonce, 'server_ms': 1700000000000,\n"
        "         'sig': signing.hexdigest(key, text.encode())}\n"
        "c.on_message(c.cmd_topic, json.dumps(reply).encode(), 1010)\n"
        "cmd = {'v': 1, 'type': 'cmd', 'id': 'a' * 32, 'device': 'bike-0001', 'action': 'unlock', 'params': {},\n"
        "       'issued_at': 1, 'expires_at': 1700000030000, 'sig': ''}\n"
        "cmd['sig'] = signing.hexdigest(key, m.command_signing_text(cmd).encode())\n"
        "eff = c.on_message(c.cmd_topic, json.dumps(cmd).encode(), 1020)\n"
        "print([e[0] for e in eff])\n"
        "print(hasattr(m, 'make_command'), hasattr(m, 'decode_ack'), hasattr(m, 'decode_downlink'))\n")
    r = subprocess.run([micropython, "-X", "heapsize=64k", str(probe)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["['persist', 'publish', 'actuate']", "False False True"], r.stdout


def test_latch_cli_firmware_build(mpy_cross, tmp_path):
    """Through the real `latch` command line (latch.cli wires firmware.tools.add_parser)."""
    import sys
    out = tmp_path / "fw"
    r = subprocess.run([sys.executable, "-m", "latch.cli", "firmware", "build", "--out", str(out),
                        "--mpy-cross", mpy_cross], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "built" in r.stdout and (out / "main.py").exists() and (out / "firmware" / "app.mpy").exists()

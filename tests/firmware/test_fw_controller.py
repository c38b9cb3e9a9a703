"""The lock controller and the protocol, under CPython and under MicroPython."""
import hashlib
import hmac
import json
import random
import subprocess

import clock_cases  # noqa: E402  (tests/firmware/mp, put on sys.path by fwsupport)
import controller_cases  # noqa: E402
import pytest

from protocol import canonical, signing
from protocol import messages as m
from tests.firmware.fwsupport import MP_DIR, REPO, mp_env, run_mp

MODULES = [controller_cases, clock_cases]


@pytest.mark.parametrize("case", [c for mod in MODULES for c in mod.CASES], ids=lambda c: c.__name__)
def test_controller_cpython(case):
    case()


@pytest.mark.parametrize("mod", MODULES, ids=lambda mod: mod.__name__)
def test_controller_micropython(micropython, mod):
    r = run_mp(micropython, MP_DIR / "run_cases.py", mod.__name__, heap="64k")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "DONE %d passed, 0 failed" % len(mod.CASES) in lines, r.stdout + r.stderr


def test_hmac_matches_cpython(micropython):
    rnd = random.Random(7)
    vectors = []
    for klen in (0, 1, 31, 32, 33, 63, 64, 65, 100, 128, 200):
        for mlen in (0, 1, 55, 56, 63, 64, 65, 200, 1000):
            vectors.append((rnd.randbytes(klen), rnd.randbytes(mlen)))
    stdin = "".join("%s %s\n" % (k.hex(), msg.hex()) for k, msg in vectors)
    r = subprocess.run([micropython, str(MP_DIR / "hmac_vectors.py")], input=stdin, env=mp_env(),
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = r.stdout.split()
    want = [hmac.new(k, msg, hashlib.sha256).hexdigest() for k, msg in vectors]
    assert got == want
    # and the CPython side of the same code agrees with hmac
    assert [signing.hexdigest(k, msg) for k, msg in vectors] == want


SIGN_SCRIPT = r'''
import sys, json
from protocol import messages as m, canonical
key = bytes(range(32))
for params in json.loads(sys.stdin.read()):
    cmd = m.make_command("%032x" % 1, "bike-0001", "locate", params, 1, 1700000000000, key)
    print(canonical.dumps(params))
    print(cmd["sig"])
'''


def test_canonical_and_signature_match_cpython(micropython, tmp_path):
    params_list = [{}, {"a": 1, "b": [True, False, None]}, {"z": "ünïcødé ✓", "a": "q\"uote\\back\nnl\ttab\x01"},
                   {"nested": {"y": {"x": [1, {"k": -5}]}}, "big": 2 ** 40}]
    script = tmp_path / "sign.py"
    script.write_text(SIGN_SCRIPT)
    r = subprocess.run([micropython, str(script)], input=json.dumps(params_list), env=mp_env(),
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    want = []
    for params in params_list:
        cmd = m.make_command("%032x" % 1, "bike-0001", "locate", params, 1, 1700000000000, bytes(range(32)))
        want += [canonical.dumps(params), cmd["sig"]]
    assert r.stdout.splitlines() == want

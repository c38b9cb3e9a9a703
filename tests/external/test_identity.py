"""Device secrets are stored in Mosquitto 2.0's own password-file format (`$7$`, PBKDF2-SHA512), checked
against mosquitto_passwd; hashes of earlier Latch versions (SHA-256 hex) still verify."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from api.registry.mosquitto_config import DeviceRow, password_file_text
from broker.identity import PBKDF2_ITERATIONS, hash_secret, is_mosquitto_hash, new_secret, secret_matches
from tests.support import require

MOSQUITTO_PBKDF2 = re.compile(r"^\$7\$(\d+)\$([A-Za-z0-9+/]+=*)\$([A-Za-z0-9+/]+=*)$")


def _layout(stored: str) -> tuple[int, int, int]:
    m = MOSQUITTO_PBKDF2.match(stored)
    assert m, stored
    return int(m.group(1)), len(base64.b64decode(m.group(2))), len(base64.b64decode(m.group(3)))


def test_hash_secret_writes_mosquittos_pbkdf2_format() -> None:
    secret = new_secret()
    stored = hash_secret(secret)
    assert _layout(stored) == (101, 12, 64) and PBKDF2_ITERATIONS == 101
    assert secret_matches(secret, stored) and not secret_matches(secret + "x", stored)
    assert hash_secret(secret) != stored                         # a new salt every time
    iterations, salt_b64, key_b64 = stored.split("$")[2:]
    expected = hashlib.pbkdf2_hmac("sha512", secret.encode(), base64.b64decode(salt_b64), int(iterations))
    assert base64.b64decode(key_b64) == expected


def test_a_mosquitto_passwd_line_verifies_and_has_the_same_layout(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    require(tool is not None, "mosquitto_passwd (Debian's mosquitto package)")
    assert tool is not None
    pwfile = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(pwfile), "bike-0001", "s3cret-from-mosquitto"], check=True, timeout=30)
    user, _, stored = pwfile.read_text().strip().partition(":")
    assert user == "bike-0001"
    assert _layout(stored) == _layout(hash_secret("anything"))   # $7$101$<12-byte salt>$<64-byte key>
    assert is_mosquitto_hash(stored)
    assert secret_matches("s3cret-from-mosquitto", stored)
    assert not secret_matches("s3cret-from-mosquittO", stored)


def test_legacy_sha256_hashes_still_verify_and_garbage_never_does() -> None:
    legacy = hashlib.sha256(b"old-secret").hexdigest()
    assert secret_matches("old-secret", legacy) and not secret_matches("other", legacy)
    assert not is_mosquitto_hash(legacy)
    good = hash_secret("x")
    for bad in ("", "$7$", "$7$101$abc", "$7$x$AAAA$AAAA", "$7$0$" + good.split("$", 3)[3], "$6$salt$hash",
                good[:-4], "$7$999999999$" + good.split("$", 3)[3], legacy.upper(), legacy[:-1]):
        assert not secret_matches("x", bad), bad


def test_a_device_with_a_legacy_hash_is_left_out_of_mosquittos_file_with_the_reason() -> None:
    devices = [DeviceRow("bike-new", hash_secret("a"), False),
               DeviceRow("bike-old", hashlib.sha256(b"b").hexdigest(), False),
               DeviceRow("bike-revoked", hash_secret("c"), True), DeviceRow("latch-service", hash_secret("d"), False)]
    text, count, skipped = password_file_text(hash_secret("service"), devices)
    assert [line.split(":")[0] for line in text.splitlines()] == ["latch-service", "bike-new"] and count == 1
    assert len(skipped) == 2
    assert "bike-old" in skipped[0] and "POST /v1/devices/bike-old/credentials" in skipped[0]
    assert "'latch-service'" in skipped[1]

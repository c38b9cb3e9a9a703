import hashlib
import hmac
import json
import random

import pytest

from protocol import canonical, signing
from protocol import messages as m

KEY = bytes(range(32))


@pytest.mark.parametrize("seed", range(30))
def test_hmac_matches_the_standard_library(seed: int) -> None:
    rng = random.Random(seed)
    key = rng.randbytes(rng.choice([0, 1, 31, 32, 63, 64, 65, 200]))
    msg = rng.randbytes(rng.randint(0, 300))
    assert signing.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


def test_signed_command_verifies_and_any_change_breaks_it() -> None:
    cmd = m.make_command("c" * 32, "bike-1", "unlock", {"note": "Grüße \"x\"\n", "n": 3}, 1000, 31000, KEY)
    assert m.command_signature_ok(cmd, KEY)
    for field, value in [("id", "d" * 32), ("device", "bike-2"), ("action", "lock"),
                         ("params", {"n": 4}), ("expires_at", 99999)]:
        forged = dict(cmd, **{field: value})
        assert not m.command_signature_ok(forged, KEY), field
    assert not m.command_signature_ok(cmd, b"another key")


def test_command_survives_the_wire() -> None:
    cmd = m.make_command("c" * 32, "bike-1", "unlock", {"b": [1, True, None], "a": "é"}, 1, 2, KEY)
    decoded = m.decode_downlink(m.encode_command(cmd))
    assert decoded == cmd and m.command_signature_ok(decoded, KEY)


def test_canonical_text_is_key_order_independent_and_refuses_floats() -> None:
    assert canonical.dumps({"b": 1, "a": [True, None]}) == '{"a":[true,null],"b":1}'
    with pytest.raises(ValueError, match="cannot be signed"):
        canonical.dumps({"x": 1.5})
    with pytest.raises(ValueError):
        m.make_command("c", "d", "unlock", {"x": 0.1}, 0, 1, KEY)


@pytest.mark.parametrize("payload,error", [
    (b"", "not UTF-8 JSON"),
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"[1,2]", "must be a JSON object"),
    (b'{"v": 2, "id": "x", "result": "received"}', "unsupported message version"),
    (b'{"v": 1, "result": "received"}', "'id'"),
    (b'{"v": 1, "id": "x", "result": "opened"}', "'result'"),
    (b'{"v": 1, "id": "x", "result": "failed", "reason": 5}', "'reason'"),
    (b'{"v": 1, "id": "x", "result": "failed", "state": {"battery": 101}}', "battery"),
    (b'{"v": 1, "id": "x", "result": "failed", "state": {"locked": "yes"}}', "locked"),
    (b"{" + b" " * m.MAX_PAYLOAD + b"}", "exceeds"),
])
def test_bad_acks_are_refused_with_a_reason(payload: bytes, error: str) -> None:
    with pytest.raises(m.ProtocolError, match=error):
        m.decode_ack(payload)


def test_ack_state_and_presence_round_trip() -> None:
    ack = m.decode_ack(m.encode_ack("id1", m.SUCCEEDED, 5, None, {"locked": False, "battery": 50}))
    assert ack["state"] == {"locked": False, "battery": 50}
    assert m.decode_state(m.encode_state({"locked": True}, 7))["locked"] is True
    assert m.decode_presence(b"online") == "online"
    with pytest.raises(m.ProtocolError):
        m.decode_presence(b"maybe")
    assert json.loads(m.encode_sync(12))["t0"] == 12


def test_time_reply_is_signed_for_the_device_and_nonce() -> None:
    reply = m.make_time_reply("bike-1", 42, 1_000_000, KEY)
    assert m.time_signature_ok(reply, KEY)
    assert not m.time_signature_ok(dict(reply, t0=43), KEY)
    assert not m.time_signature_ok(dict(reply, server_ms=1), KEY)

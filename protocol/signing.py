"""HMAC-SHA256 over a canonical text, in code both CPython and MicroPython run.

MicroPython has hashlib.sha256 but no hmac module, so HMAC (RFC 2104) is
written out here; tests check it against CPython's hmac for many inputs.
"""

import binascii
import hashlib

_BLOCK = 64


def hmac_sha256(key, msg):
    """The raw 32-byte HMAC-SHA256 of `msg` (bytes) under `key` (bytes)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key + b"\x00" * (_BLOCK - len(key))
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    inner.update(msg)
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    outer.update(inner.digest())
    return outer.digest()


def hexdigest(key, msg):
    return binascii.hexlify(hmac_sha256(key, msg)).decode()


def equal(a, b):
    """Compare two strings in time independent of where they differ."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    # compared as bytes: on MicroPython, indexing a str is O(n) and interns each
    # 1-character result as a permanent string (RAM the board never gets back)
    a = a.encode()
    b = b.encode()
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0


def decode_key(key_hex):
    """A device's command key travels as hex; returns its bytes."""
    return binascii.unhexlify(key_hex)

"""Device command keys at rest: sealed with a master key kept outside the database.

A device's command key (the HMAC key its commands are signed with) must be readable by the API, so it
cannot be hashed; stored in plain hex, anyone who reads the database (a backup, a PostgreSQL replica, a
world-readable latch.db) could sign unlocks. Decision: encrypt at rest, not derive. Deriving each key
as HMAC(master, device_id || version) would store nothing secret at all, but existing locks hold random
keys that no derivation reproduces: every lock in the field would have to be re-provisioned, and so
would the whole fleet whenever the master key changed. Sealing keeps every provisioned key working
(existing rows are sealed in place, DeviceRegistry.seal_plain_keys) and lets the master key be replaced
by re-sealing rows, without touching a lock.

Construction (stdlib only; `cryptography` is not a runtime dependency): encrypt-then-MAC with HMAC-SHA256
as the PRF, keys split from the master by HMAC with distinct labels:

    stream = HMAC(K_enc, nonce || device_id)            (32 bytes: the key is 32 bytes)
    ct     = key XOR stream
    tag    = HMAC(K_mac, "k1" || key_id || nonce || device_id || ct)[:16]
    stored = "k1:" key_id ":" base64url(nonce(16) || ct || tag)

A fresh 16-byte random nonce per seal; the device id is bound into both, so a sealed key copied onto
another device's row does not open; `key_id` names the master key, so a replica given the wrong one
says so instead of signing with garbage. The master key: LATCH_COMMAND_KEY_SECRET, else
DATA_DIR/command-keys.secret (0600, generated on first start). Every API replica must hold the same.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from foundation.settings import command_key_secret_for

PREFIX = "k1"
NONCE_BYTES = 16
TAG_BYTES = 16
KEY_BYTES = 32


class SealError(Exception):
    """A stored key that does not open: wrong master key, altered, or on another device's row."""


def _prf(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\x00".join(parts), hashlib.sha256).digest()


def is_plain(stored: str) -> bool:
    """A key stored by an earlier Latch, in plain hex."""
    return len(stored) == 2 * KEY_BYTES and all(c in "0123456789abcdef" for c in stored.lower())


class KeySeal:
    def __init__(self, master: str) -> None:
        m = master.encode()
        self._enc = _prf(m, b"latch command keys: encryption")
        self._mac = _prf(m, b"latch command keys: authentication")
        self.key_id = _prf(m, b"latch command keys: key id")[:4].hex()

    def seal(self, device_id: str, key_hex: str) -> str:
        key = bytes.fromhex(key_hex)
        if len(key) != KEY_BYTES:
            raise ValueError(f"a command key is {KEY_BYTES} bytes")
        nonce = os.urandom(NONCE_BYTES)
        ct = bytes(a ^ b for a, b in zip(key, _prf(self._enc, nonce, device_id.encode())))
        tag = _prf(self._mac, PREFIX.encode(), self.key_id.encode(), nonce, device_id.encode(), ct)[:TAG_BYTES]
        return f"{PREFIX}:{self.key_id}:{base64.urlsafe_b64encode(nonce + ct + tag).decode()}"

    def open(self, device_id: str, stored: str) -> str:
        """The key in hex; a plain-hex key (an earlier Latch's) is returned as it is."""
        if is_plain(stored):
            return stored.lower()
        prefix, _, rest = stored.partition(":")
        key_id, _, body = rest.partition(":")
        if prefix != PREFIX:
            raise SealError(f"device {device_id}: unknown command key format")
        if key_id != self.key_id:
            raise SealError(f"device {device_id}: its command key was sealed with another master key (id {key_id}, "
                            f"this one is {self.key_id}): give every API replica the same LATCH_COMMAND_KEY_SECRET")
        try:
            raw = base64.urlsafe_b64decode(body)
        except ValueError as e:
            raise SealError(f"device {device_id}: malformed sealed command key") from e
        nonce, ct, tag = raw[:NONCE_BYTES], raw[NONCE_BYTES:-TAG_BYTES], raw[-TAG_BYTES:]
        want = _prf(self._mac, PREFIX.encode(), self.key_id.encode(), nonce, device_id.encode(), ct)[:TAG_BYTES]
        if len(ct) != KEY_BYTES or not hmac.compare_digest(tag, want):
            raise SealError(f"device {device_id}: sealed command key does not authenticate (altered, or another row's)")
        return bytes(a ^ b for a, b in zip(ct, _prf(self._enc, nonce, device_id.encode()))).hex()


_BY_MASTER: dict[str, KeySeal] = {}   # one seal per master secret (deriving its keys costs a few hashes)


def for_url(database_url: str) -> KeySeal:
    """The seal for the database at `database_url`: made from the master secret Settings.ensure_secrets() found
    for that database in this process (foundation/settings.py), once per secret."""
    master = command_key_secret_for(database_url)
    if master is None:
        raise RuntimeError(f"no command-key master key for {database_url.split('@')[-1]}: "
                           "call Settings.ensure_secrets() before building the registry")
    seal = _BY_MASTER.get(master)
    if seal is None:
        seal = _BY_MASTER[master] = KeySeal(master)
    return seal

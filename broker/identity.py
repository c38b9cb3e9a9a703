"""Who is on the other end of an MQTT connection, and how their secret is checked.

Only a hash of a device's secret is stored (the secret is shown once, at
registration), in the format Mosquitto 2.0 reads from its ``password_file``,
so `latch broker-config mosquitto` can hand the registry to an external
broker unchanged::

    $7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(secret, salt, iterations)>

(``mosquitto_passwd``'s default "sha512-pbkdf2": a 12-byte salt, 101 iterations, 64-byte
key, standard base64 with padding). Device and service secrets are 32 random bytes, so there
is no dictionary to attack and a slow KDF would only cap the connect rate: Mosquitto's 101
iterations cost ~0.1 ms per login. Hashes stored by earlier versions (SHA-256 hex, no salt)
are still accepted; rotating the device's credentials moves it to the new format (Mosquitto
cannot verify the old one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum

SERVICE_USERNAME = "latch-service"

PBKDF2_PREFIX = "$7$"          # Mosquitto's tag for PBKDF2-HMAC-SHA512
PBKDF2_ITERATIONS = 101        # mosquitto_passwd's default
PBKDF2_SALT_BYTES = 12         # mosquitto_passwd's salt length
_MAX_ITERATIONS = 1_000_000    # a stored hash asking for more is refused, not computed


class Role(StrEnum):
    DEVICE = "device"
    SERVICE = "service"
    USER = "user"          # a rider's (or operator's) app: reads its own events topic, publishes nothing
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Identity:
    role: Role
    name: str


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """The stored form of `secret`: Mosquitto 2.0's ``$7$`` PBKDF2-SHA512 (a new random salt each call)."""
    salt = os.urandom(PBKDF2_SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"{PBKDF2_PREFIX}{iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def is_mosquitto_hash(stored_hash: str) -> bool:
    """True when Mosquitto 2.0 can verify `stored_hash` (the ``$7$`` format); False for legacy SHA-256 hex."""
    return _parse_pbkdf2(stored_hash) is not None


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Does `secret` match `stored_hash` (``$7$`` PBKDF2-SHA512, or a legacy SHA-256 hex digest)?"""
    parsed = _parse_pbkdf2(stored_hash)
    if parsed is not None:
        iterations, salt, key = parsed
        candidate = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
        return hmac.compare_digest(candidate, key)
    if len(stored_hash) == 64 and all(c in "0123456789abcdef" for c in stored_hash):
        return hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), stored_hash)
    return False


def _parse_pbkdf2(stored_hash: str) -> tuple[int, bytes, bytes] | None:
    if not stored_hash.startswith(PBKDF2_PREFIX):
        return None
    parts = stored_hash[len(PBKDF2_PREFIX):].split("$")
    if len(parts) != 3 or not parts[0].isdigit():
        return None
    iterations = int(parts[0])
    if not 0 < iterations <= _MAX_ITERATIONS:
        return None
    try:
        salt = base64.b64decode(parts[1], validate=True)
        key = base64.b64decode(parts[2], validate=True)
    except (binascii.Error, ValueError):
        return None
    if not salt or len(key) != hashlib.sha512().digest_size:
        return None
    return iterations, salt, key

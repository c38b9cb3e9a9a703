"""Who is on the other end of an MQTT connection, and how their secret is checked.

Device secrets are 32 random bytes, so a single SHA-256 is a sound verifier
(no dictionary to attack; a slow KDF would only cap the connect rate). Only
the hash is stored; the secret is shown once, at registration.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

SERVICE_USERNAME = "latch-service"


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


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)

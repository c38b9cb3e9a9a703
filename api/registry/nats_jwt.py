"""NATS JWTs, the little of them Latch needs for nats-server's auth callout: read the server's signed
authorization request, and write the signed authorization response carrying a user JWT.

A NATS JWT is ``base64url(header).base64url(claims).base64url(signature)`` (no padding), the header
``{"typ": "JWT", "alg": "ed25519-nkey"}`` and the signature Ed25519 over the first two parts, by an nkey
(PyPI ``nkeys``, the NATS authors' own Python package). The claims are those of the Go package
``github.com/nats-io/jwt/v2`` (``authorization_claims.go``, ``user_claims.go``): ``jti`` (base32 of
SHA-512/256 over the claims with ``jti`` empty), ``iat``, ``iss`` (the signer's public nkey), ``sub``,
``aud``, optional ``exp`` and ``name``, and the type-specific part under ``nats``.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys
import orjson

from foundation.settings import new_nats_account_seed

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}

AUTH_REQUEST = "authorization_request"
AUTH_RESPONSE = "authorization_response"
USER = "user"


class JwtError(Exception):
    """A JWT that is malformed, of the wrong type, or not signed by the key it names; str(e) says which."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_account_seed() -> bytes:
    """A fresh account nkey seed (``SA...``): the auth callout's issuer (made where the data dir's secrets are)."""
    return new_nats_account_seed()


def public_key(seed: bytes) -> str:
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


def encode(claims: dict[str, Any], seed: bytes) -> str:
    """`claims` signed by the nkey `seed` (its public key set as ``iss``; ``iat`` and ``jti`` filled in)."""
    kp = nkeys.from_seed(bytearray(seed))
    body = dict(claims, iss=kp.public_key.decode(), iat=int(time.time()), jti="")
    body["jti"] = base64.b32encode(hashlib.new("sha512_256", orjson.dumps(body)).digest()).rstrip(b"=").decode()
    signing_input = _b64(orjson.dumps(HEADER)) + "." + _b64(orjson.dumps(body))
    return signing_input + "." + _b64(kp.sign(signing_input.encode()))


def decode(token: str, claim_type: str, issuer_prefix: str = "N") -> dict[str, Any]:
    """The claims of `token`, checked: well formed, of `claim_type`, signed by the key in its ``iss``, which
    is of the kind `issuer_prefix` names (``N``: a server, ``A``: an account), not expired."""
    try:
        header_part, claims_part, sig_part = token.split(".")
        header, claims = orjson.loads(_unb64(header_part)), orjson.loads(_unb64(claims_part))
        signature = _unb64(sig_part)
    except (ValueError, orjson.JSONDecodeError) as e:
        raise JwtError(f"not a JWT: {e}") from None
    if not isinstance(header, dict) or header.get("alg") != HEADER["alg"] or not isinstance(claims, dict):
        raise JwtError("not a NATS JWT (alg must be ed25519-nkey)")
    nats = claims.get("nats")
    if not isinstance(nats, dict) or nats.get("type") != claim_type:
        raise JwtError(f"not a {claim_type} JWT")
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer.startswith(issuer_prefix):
        raise JwtError(f"issuer {issuer!r} is not the kind of key expected ({issuer_prefix}...)")
    try:
        verify_key(issuer).verify((header_part + "." + claims_part).encode(), signature)
    except (nacl.exceptions.BadSignatureError, ValueError) as e:
        raise JwtError(f"bad signature: {e!r}") from None
    expires = claims.get("exp")
    if isinstance(expires, int) and expires < time.time():
        raise JwtError("expired")
    return claims


def verify_key(public: str) -> nacl.signing.VerifyKey:
    """The Ed25519 verify key inside a public nkey (``N...``, ``A...``, ``U...``): base32 of a prefix byte, the
    32-byte key and a CRC16."""
    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    if len(raw) != 35 or nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        raise ValueError("not a public nkey")
    return nacl.signing.VerifyKey(raw[1:33])


def user_jwt(seed: bytes, user_nkey: str, account: str, name: str, publish: list[str], subscribe: list[str],
             expires_at: int | None = None, connection_types: list[str] | None = None) -> str:
    """A user JWT for nats-server's config mode: `user_nkey` placed in `account` (``aud``), with exactly
    these publish and subscribe subjects allowed (nothing else), signed by the callout issuer `seed`;
    `connection_types` (e.g. ``["MQTT"]``) limits how it may connect."""
    claims: dict[str, Any] = {
        "sub": user_nkey, "aud": account, "name": name,
        "nats": {"pub": {"allow": publish} if publish else {"deny": [">"]},
                 "sub": {"allow": subscribe} if subscribe else {"deny": [">"]},
                 "subs": -1, "data": -1, "payload": -1, "type": USER, "version": 2},
    }
    if expires_at is not None:
        claims["exp"] = expires_at
    if connection_types:
        claims["nats"]["allowed_connection_types"] = connection_types
    return encode(claims, seed)


def auth_response(seed: bytes, user_nkey: str, server_id: str, *, user: str = "", error: str = "") -> str:
    """The answer to one authorization request: the user JWT, or the reason for refusing."""
    nats: dict[str, Any] = {"type": AUTH_RESPONSE, "version": 2}
    if user:
        nats["jwt"] = user
    else:
        nats["error"] = error or "not authorized"
    return encode({"sub": user_nkey, "aud": server_id, "nats": nats}, seed)

"""Bearer tokens for users: HS256 JWTs signed with the key from settings (DATA_DIR/jwt.secret).

    access  Authorization: Bearer <token> on every endpoint, and the MQTT password of a rider's app
    stream  short-lived, for ?token= where a client cannot send headers (EventSource, WebSocket in a browser)

Verification needs only the key, not the database, so the broker checks a rider's MQTT login the
same way the API does. A token stays valid until it expires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

ACCESS = "access"
STREAM = "stream"
ISSUER = "latch"
ALGORITHM = "HS256"


class TokenError(Exception):
    """The token is expired, forged or malformed; str(e) says which, for the 401."""


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: str
    role: str
    kind: str
    expires_at: int   # seconds since the epoch


def issue(secret: str, user_id: str, role: str, kind: str, ttl_s: int, now: float | None = None) -> tuple[str, int]:
    """(token, expiry in epoch seconds)."""
    iat = int(now if now is not None else time.time())
    exp = iat + int(ttl_s)
    token = jwt.encode({"iss": ISSUER, "sub": user_id, "role": role, "typ": kind, "iat": iat, "exp": exp},
                       secret, algorithm=ALGORITHM)
    return token, exp


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def verify(secret: str, token: str, kinds: tuple[str, ...] = (ACCESS,)) -> Claims:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], issuer=ISSUER,
                            options={"require": ["exp", "iat", "sub", "typ", "iss"]})
    except jwt.ExpiredSignatureError as e:
        raise TokenError("token expired: log in again") from e
    except jwt.InvalidTokenError as e:
        raise TokenError(f"invalid token: {e}") from e
    kind = claims.get("typ")
    if kind not in kinds:
        raise TokenError(f"a {kind} token is not accepted here (use: {', '.join(kinds)})")
    role = claims.get("role")
    if role not in ("rider", "operator") or not isinstance(claims["sub"], str):
        raise TokenError("invalid token: bad claims")
    return Claims(claims["sub"], role, kind, int(claims["exp"]))

"""Bearer tokens for users: HS256 JWTs signed with the key from settings (DATA_DIR/jwt.secret).

    access  Authorization: Bearer <token> on every endpoint, and the MQTT password of a rider's app
    stream  short-lived, for ?token= where a client cannot send headers (EventSource, WebSocket in a browser)

A valid signature is necessary, not sufficient: every user token names its session (`sid`, a row of
`user_session`), and the API (api/riders/users.py Sessions) and the broker (api/registry/credentials.py) accept it
only while that session is not revoked and its user not deleted; the role is then the database's, never
the token's (`role` in the token is informational). A stream token minted by the admin token carries
`sub: "admin"` and `adm`, a fingerprint of the admin token it was minted with (admin_mark): that, and only
that, makes a JWT the operator without a user account.
"""

from __future__ import annotations

import hashlib
import hmac
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
    expires_at: int                  # seconds since the epoch
    session_id: str | None = None    # `sid`: the user_session row; None only in tokens older than sessions
    admin_mark: str | None = None    # `adm`: on stream tokens the admin token minted


def admin_mark(secret: str, admin_token: str) -> str:
    """What an admin-minted stream token carries: it names the admin token without revealing it, so a
    new admin token (LATCH_ADMIN_TOKEN changed) invalidates the stream tokens the old one minted."""
    return hmac.new(secret.encode(), b"latch admin stream\x00" + admin_token.encode(), hashlib.sha256).hexdigest()[:32]


def issue(secret: str, user_id: str, role: str, kind: str, ttl_s: int, now: float | None = None,
          session_id: str | None = None, mark: str | None = None) -> tuple[str, int]:
    """(token, expiry in epoch seconds)."""
    iat = int(now if now is not None else time.time())
    exp = iat + int(ttl_s)
    claims: dict[str, object] = {"iss": ISSUER, "sub": user_id, "role": role, "typ": kind, "iat": iat, "exp": exp}
    if session_id is not None:
        claims["sid"] = session_id
    if mark is not None:
        claims["adm"] = mark
    return jwt.encode(claims, secret, algorithm=ALGORITHM), exp


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def verify(secret: str, token: str, kinds: tuple[str, ...] = (ACCESS,)) -> Claims:
    """The claims of a token signed with `secret`, of one of `kinds`; TokenError otherwise. Signature and
    expiry only: whether its session still stands is api/riders/users.py Sessions' (and the broker's) question."""
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
    role, sid, adm = claims.get("role"), claims.get("sid"), claims.get("adm")
    if role not in ("rider", "operator") or not isinstance(claims["sub"], str) \
            or not isinstance(sid, (str, type(None))) or not isinstance(adm, (str, type(None))):
        raise TokenError("invalid token: bad claims")
    return Claims(claims["sub"], role, kind, int(claims["exp"]), sid, adm)

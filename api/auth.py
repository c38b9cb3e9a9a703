"""Who is calling the API: the bootstrap operator (admin) token, or a user's bearer token (JWT).

Roles: "operator" sees and commands everything; "rider" commands only a bike it holds and sees only
its own rides, commands and events (api/rights.py). The admin token is an operator with no user account.

Two steps, so the signature check stays free of I/O: `resolve` checks a token's signature, expiry and
kind and says whose it claims to be; `api/riders/users.py Sessions.confirm` then checks, against the database
(briefly cached), that its session stands and its user exists, and takes the role from the user's row.
`authenticate` (the HTTP dependencies) does both. A JWT names the operator without an account
(`sub == "admin"`) only as a stream token carrying the mark of the current admin token (tokens.admin_mark).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Protocol

from fastapi import HTTPException, Request, status

from api import tokens

ADMIN_NAME = "admin"
OPERATOR = "operator"
RIDER = "rider"
ROLES = (RIDER, OPERATOR)


@dataclass(frozen=True, slots=True)
class Principal:
    name: str                     # recorded as the owner of what this caller creates: "admin" or a user id
    role: str                     # "operator" or "rider"
    user_id: str | None = None    # None for the admin token
    session_id: str | None = None  # the token's `sid` (user_session row); None for the admin token

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR

    def sees(self, audience: str | None) -> bool:
        """May this caller see an event (or command, ride) addressed to `audience`?"""
        return self.is_operator or (audience is not None and audience == self.user_id)


class AuthError(Exception):
    """No usable credentials; str(e) is the reason given with the 401."""


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def resolve(token: str | None, admin_token: str, jwt_secret: str | None,
            kinds: tuple[str, ...] = (tokens.ACCESS,)) -> Principal:
    """The principal a token stands for; AuthError when there is none."""
    if not token:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
    if tokens.ACCESS in kinds and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(ADMIN_NAME, OPERATOR)
    if jwt_secret is None or not tokens.looks_like_jwt(token):
        raise AuthError("invalid token")
    try:
        claims = tokens.verify(jwt_secret, token, kinds)
    except tokens.TokenError as e:
        raise AuthError(str(e)) from e
    if claims.user_id == ADMIN_NAME:
        # only a stream token the current admin token minted (POST /v1/auth/stream-token with it)
        if claims.kind == tokens.STREAM and claims.admin_mark is not None and hmac.compare_digest(
                claims.admin_mark, tokens.admin_mark(jwt_secret, admin_token)):
            return Principal(ADMIN_NAME, OPERATOR)
        raise AuthError("invalid token")
    if claims.session_id is None:
        raise AuthError("this token predates revocable sessions: log in again")
    # the role is provisional until Sessions.confirm reads the user's row
    return Principal(claims.user_id, claims.role, claims.user_id, claims.session_id)


class Confirmer(Protocol):
    async def confirm(self, who: Principal) -> Principal: ...


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, reason, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(request: Request, admin_token: str, jwt_secret: str | None, sessions: Confirmer,
                       query_token: bool = False) -> Principal:
    """From the Authorization header; with `query_token`, also a stream token in `?token=`
    (EventSource and browser WebSockets cannot send headers). 401 unless the session stands."""
    token = bearer_token(request)
    kinds: tuple[str, ...] = (tokens.ACCESS,)
    if token is None and query_token and request.query_params.get("token"):
        token, kinds = request.query_params["token"], (tokens.STREAM,)
    try:
        return await sessions.confirm(resolve(token, admin_token, jwt_secret, kinds))
    except AuthError as e:
        raise unauthorized(str(e)) from e

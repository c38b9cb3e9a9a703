"""Who is calling the API: the bootstrap operator (admin) token, or a user's bearer token (JWT).

Roles: "operator" sees and commands everything; "rider" commands only a bike it holds and sees only
its own rides, commands and events (api/rights.py). The admin token is an operator with no user account.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

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
    if claims.user_id == ADMIN_NAME:   # a stream token minted for the admin token
        return Principal(ADMIN_NAME, OPERATOR)
    return Principal(claims.user_id, claims.role, claims.user_id)


def authenticate(request: Request, admin_token: str, jwt_secret: str | None = None,
                 query_token: bool = False) -> Principal:
    """From the Authorization header; with `query_token`, also a stream token in `?token=`
    (EventSource and browser WebSockets cannot send headers)."""
    token = bearer_token(request)
    kinds: tuple[str, ...] = (tokens.ACCESS,)
    if token is None and query_token and request.query_params.get("token"):
        token, kinds = request.query_params["token"], (tokens.STREAM,)
    try:
        return resolve(token, admin_token, jwt_secret, kinds)
    except AuthError as e:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(e), headers={"WWW-Authenticate": "Bearer"}) from e

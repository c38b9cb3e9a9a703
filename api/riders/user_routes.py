"""Accounts and sessions: sign-up, login, logout, password change, stream tokens, operators' user admin.

Login and sign-up are rate limited before any password is hashed: per client address
(api/ratelimit.py client_address) and, for login, per account (the email as typed, whether or not it
has an account, so the limit tells nothing about which exist). Over a limit: 429 with Retry-After.
Past the limits, the argon2 pool (api/hashing.py) is the ceiling: when it is full, 503 with Retry-After.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from api.deps import CallerDep, OperatorDep, RuntimeDep
from api.errors import Conflict, NotFound
from api.hashing import PoolBusy
from api.paging import OffsetQuery
from api.ratelimit import RateLimiter, client_address, too_many
from api.riders.models import Login, PasswordChange, SignUp, StreamTokenPublic, TokenPublic, UserCreate, UserPublic
from api.riders.users import EmailTaken, admin_public, public
from api.runtime import Runtime

router = APIRouter(tags=["users"])

_LIMITED = {429: {"description": "too many attempts from this address or for this account (Retry-After)"},
            503: {"description": "too many logins in progress on this server (Retry-After)"}}


class AuthLimits:
    """The login and sign-up token buckets of one API process (kept on the app's state)."""

    def __init__(self, rt: Runtime) -> None:
        s = rt.settings
        self.trust_forwarded_for = s.trust_forwarded_for
        self.login_address = RateLimiter(s.login_rate_per_address_per_s, s.login_burst_per_address)
        self.login_account = RateLimiter(s.login_rate_per_account_per_s, s.login_burst_per_account)
        self.signup_address = RateLimiter(s.signup_rate_per_address_per_s, s.signup_burst_per_address)

    def check_address(self, request: Request, limiter: RateLimiter, what: str) -> None:
        wait = limiter.take(client_address(request, self.trust_forwarded_for))
        if wait:
            raise too_many(f"too many {what} attempts from your address", wait)

    def check_account(self, account: str) -> None:
        wait = self.login_account.take(account.strip().lower())
        if wait:
            raise too_many("too many login attempts for this account", wait)


def _limits(request: Request) -> AuthLimits:
    state = request.app.state
    limits = getattr(state, "auth_limits", None)
    if limits is None:
        limits = state.auth_limits = AuthLimits(state.runtime)
    return limits


def _busy(e: PoolBusy) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e), headers={"Retry-After": "1"})


@router.post("/v1/auth/signup", status_code=status.HTTP_201_CREATED, response_model=TokenPublic,
             responses={409: {"description": "the email is taken"}, **_LIMITED})
async def sign_up(body: SignUp, request: Request, rt: RuntimeDep) -> TokenPublic:
    """A new rider account, logged in: the access token goes in `Authorization: Bearer`."""
    _limits(request).check_address(request, _limits(request).signup_address, "sign-up")
    try:
        user = await rt.users.create(body, "rider")
    except EmailTaken:
        raise Conflict(f"{body.email} already has an account: log in instead")
    except PoolBusy as e:
        raise _busy(e) from e
    return await rt.users.token_for(user)


@router.post("/v1/auth/login", response_model=TokenPublic,
             responses={401: {"description": "wrong credentials"}, **_LIMITED})
async def log_in(body: Login, request: Request, rt: RuntimeDep) -> TokenPublic:
    """A new session: the access token goes in `Authorization: Bearer` (and is a rider app's MQTT password)."""
    limits = _limits(request)
    limits.check_address(request, limits.login_address, "login")
    limits.check_account(body.email)
    try:
        user = await rt.users.check_password(body.email, body.password)
    except PoolBusy as e:
        raise _busy(e) from e
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong email or password",
                            headers={"WWW-Authenticate": "Bearer"})
    return await rt.users.token_for(user)


@router.post("/v1/auth/logout", status_code=status.HTTP_204_NO_CONTENT,
             responses={400: {"description": "the admin token has no session to end"}})
async def log_out(rt: RuntimeDep, who: CallerDep) -> Response:
    """End this token's session: it, and the stream tokens minted from it, are refused from now on (by this
    API at once, by other replicas within `session_cache_s`, by the broker at the next MQTT login)."""
    if who.session_id is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the admin token has no session: to revoke it, change "
                                                         "LATCH_ADMIN_TOKEN (or DATA_DIR/admin.token) and restart")
    await rt.users.sessions.revoke(who.session_id)
    rt.events.end_sessions(who.user_id or "", only=who.session_id)   # its open streams end now
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/v1/auth/password", status_code=status.HTTP_204_NO_CONTENT,
             responses={401: {"description": "the current password is wrong"}, **_LIMITED})
async def change_password(body: PasswordChange, request: Request, rt: RuntimeDep, who: CallerDep) -> Response:
    """Set a new password; every other session of the account is revoked (this one stays logged in)."""
    if who.user_id is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the admin token has no password")
    _limits(request).check_account(f"user:{who.user_id}")
    try:
        ok = await rt.users.change_password(who.user_id, body.current_password, body.new_password, who.session_id)
    except PoolBusy as e:
        raise _busy(e) from e
    if not ok:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "the current password is wrong")
    rt.events.end_sessions(who.user_id, keep=who.session_id)   # the other sessions' open streams end now
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/v1/auth/stream-token", response_model=StreamTokenPublic)
async def stream_token(rt: RuntimeDep, who: CallerDep) -> StreamTokenPublic:
    """A short-lived token for `?token=` on /v1/events/stream and /v1/ws, where browsers cannot send headers."""
    return rt.users.stream_token(who)


@router.get("/v1/users/me", response_model=UserPublic)
async def me(rt: RuntimeDep, who: CallerDep) -> UserPublic:
    if who.user_id is None:
        return admin_public()
    user = await rt.users.get(who.user_id)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this token's user no longer exists",
                            headers={"WWW-Authenticate": "Bearer"})
    return public(user)


@router.post("/v1/users", status_code=status.HTTP_201_CREATED, response_model=UserPublic)
async def create_user(body: UserCreate, rt: RuntimeDep, _: OperatorDep) -> UserPublic:
    """Operators create riders and other operators."""
    try:
        return public(await rt.users.create(body, body.role))
    except EmailTaken:
        raise Conflict(f"{body.email} already has an account")
    except PoolBusy as e:
        raise _busy(e) from e


@router.get("/v1/users", response_model=list[UserPublic])
async def list_users(rt: RuntimeDep, _: OperatorDep, limit: int = Query(100, ge=1, le=1000),
                     offset: OffsetQuery = 0) -> list[UserPublic]:
    return [public(u) for u in await rt.users.list(limit, offset)]


@router.delete("/v1/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "no such user"}})
async def delete_user(user_id: str, rt: RuntimeDep, _: OperatorDep) -> Response:
    """Delete an account: its tokens are refused everywhere at once (MQTT logins too), its email is free for a
    new account; its rides and commands stay in the history under its id."""
    if not await rt.users.delete(user_id):
        raise NotFound(f"no user {user_id[:64]!r}")
    rt.events.end_sessions(user_id)   # every open stream of the account ends now
    return Response(status_code=status.HTTP_204_NO_CONTENT)

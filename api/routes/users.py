from fastapi import APIRouter, HTTPException, Query, status

from api.deps import CallerDep, OperatorDep, RuntimeDep
from api.rider_models import Login, SignUp, StreamTokenPublic, TokenPublic, UserCreate, UserPublic
from api.users import EmailTaken, admin_public, public

router = APIRouter(tags=["users"])


@router.post("/v1/auth/signup", status_code=status.HTTP_201_CREATED, response_model=TokenPublic,
             responses={409: {"description": "the email is taken"}})
async def sign_up(body: SignUp, rt: RuntimeDep) -> TokenPublic:
    """A new rider account, logged in: the access token goes in `Authorization: Bearer`."""
    try:
        user = await rt.users.create(body, "rider")
    except EmailTaken:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{body.email} already has an account: log in instead")
    return rt.users.token_for(user)


@router.post("/v1/auth/login", response_model=TokenPublic, responses={401: {"description": "wrong credentials"}})
async def log_in(body: Login, rt: RuntimeDep) -> TokenPublic:
    user = await rt.users.check_password(body.email, body.password)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong email or password",
                            headers={"WWW-Authenticate": "Bearer"})
    return rt.users.token_for(user)


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
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this token's user no longer exists")
    return public(user)


@router.post("/v1/users", status_code=status.HTTP_201_CREATED, response_model=UserPublic)
async def create_user(body: UserCreate, rt: RuntimeDep, _: OperatorDep) -> UserPublic:
    """Operators create riders and other operators."""
    try:
        return public(await rt.users.create(body, body.role))
    except EmailTaken:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{body.email} already has an account")


@router.get("/v1/users", response_model=list[UserPublic])
async def list_users(rt: RuntimeDep, _: OperatorDep, limit: int = Query(100, ge=1, le=1000),
                     offset: int = Query(0, ge=0)) -> list[UserPublic]:
    return [public(u) for u in await rt.users.list(limit, offset)]

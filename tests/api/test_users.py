"""Accounts and tokens: sign-up, login, roles, expired and forged tokens."""

from __future__ import annotations

import jwt

from api import tokens
from tests.support import LiveStack


async def test_sign_up_log_in_and_me(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider = await users(email="Ada@Example.org")
    assert rider.role == "rider"
    me = (await rider.http.get("/v1/users/me")).json()
    assert me == {**me, "id": rider.id, "email": "ada@example.org", "role": "rider"}
    r = await stack.http.post("/v1/auth/signup", json={"email": "ada@example.org", "password": "another one"})
    assert r.status_code == 409 and "already has an account" in r.json()["detail"]
    r = await stack.http.post("/v1/auth/login", json={"email": "ada@example.org", "password": "wrong password"})
    assert r.status_code == 401 and r.json()["detail"] == "wrong email or password"
    r = await stack.http.post("/v1/auth/login", json={"email": "nobody@example.org", "password": "whatever1"})
    assert r.status_code == 401 and r.json()["detail"] == "wrong email or password"
    r = await stack.http.post("/v1/auth/signup", json={"email": "not-an-email", "password": "long enough"})
    assert r.status_code == 422
    r = await stack.http.post("/v1/auth/signup", json={"email": "short@example.org", "password": "short"})
    assert r.status_code == 422
    # the stored hash is argon2, never the password
    row = await stack.runtime.users.get(rider.id)
    assert row.password_hash.startswith("$argon2id$") and "correct horse" not in row.password_hash


async def test_admin_token_is_an_operator_and_operators_are_made_by_operators(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    assert (await stack.http.get("/v1/users/me")).json()["role"] == "operator"
    op = await users("operator")
    assert (await op.http.get("/v1/devices")).status_code == 200
    rider = await users()
    r = await rider.http.post("/v1/users", json={"email": "evil@example.org", "password": "12345678",
                                                 "role": "operator"})
    assert r.status_code == 403 and "operators only" in r.json()["detail"]
    for path in ("/v1/devices", "/v1/metrics", "/v1/users"):
        r = await rider.http.get(path)
        assert r.status_code == 403, path


async def test_expired_and_forged_tokens_are_401(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider = await users()
    secret = stack.settings.jwt_secret
    expired, _ = tokens.issue(secret, rider.id, "rider", tokens.ACCESS, ttl_s=10, now=1_000_000)
    forged, _ = tokens.issue("not the key, but long enough for HS256", rider.id, "operator", tokens.ACCESS, ttl_s=600)
    unsigned = jwt.encode({"iss": "latch", "sub": rider.id, "role": "operator", "typ": "access", "iat": 1,
                           "exp": 4_000_000_000}, key=None, algorithm="none")
    stream, _ = tokens.issue(secret, rider.id, "rider", tokens.STREAM, ttl_s=60)
    cases = {expired: "token expired", forged: "invalid token", unsigned: "invalid token",
             "garbage.garbage.garbage": "invalid token", "x": "invalid token",
             stream: "not accepted here"}
    for token, why in cases.items():
        r = await stack.http.get("/v1/users/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and why in r.json()["detail"], (token, r.text)
        assert r.headers["www-authenticate"] == "Bearer"

"""Revocable sessions (issue 12, defect 7): logout, password change, deleted users, the role from the
database, the admin special case, and MQTT logins with a revoked token. Real stack, real HTTP, real MQTT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
from amqtt.client import ClientError, ConnectError, MQTTClient

from latch.stack import Stack
from tests.api.push_support import User, sign_up
from tests.support import LiveStack, make_settings

RIDER_PATHS = ("/v1/users/me", "/v1/bikes", "/v1/rides", "/v1/events?after=0")


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _login(stack: LiveStack, email: str, password: str = "correct horse") -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        return await anon.post("/v1/auth/login", json={"email": email, "password": password})


async def _stream_status(stack: LiveStack, token: str) -> int:
    """The status /v1/events/stream answers a stream token with (the stream is closed at once)."""
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as anon:
        async with anon.stream("GET", "/v1/events/stream", params={"token": token}) as resp:
            return resp.status_code


async def _refused_everywhere(stack: LiveStack, token: str) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=_bearer(token)) as http:
        for path in RIDER_PATHS:
            r = await http.get(path)
            assert r.status_code == 401, (path, r.text)
        r = await http.post("/v1/auth/stream-token")
        assert r.status_code == 401, r.text


async def test_logout_revokes_that_token_and_only_that_one(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider: User = await users()
    other = (await _login(stack, rider.email)).json()["access_token"]     # a second session (another phone)
    stream = (await rider.http.post("/v1/auth/stream-token")).json()["token"]
    r = await rider.http.post("/v1/auth/logout")
    assert r.status_code == 204, r.text
    await _refused_everywhere(stack, rider.token)
    r = await rider.http.get("/v1/users/me")
    assert "revoked" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert await _stream_status(stack, stream) == 401             # its stream tokens went with it
    async with httpx.AsyncClient(base_url=stack.api_url, headers=_bearer(other)) as http:
        assert (await http.get("/v1/users/me")).status_code == 200     # the other session is untouched
    assert (await _login(stack, rider.email)).status_code == 200


async def test_password_change_revokes_every_other_session(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider: User = await users()
    other = (await _login(stack, rider.email)).json()["access_token"]
    r = await rider.http.post("/v1/auth/password", json={"current_password": "wrong one!", "new_password": "n3w horse"})
    assert r.status_code == 401 and "current password" in r.json()["detail"]
    r = await rider.http.post("/v1/auth/password", json={"current_password": "correct horse",
                                                         "new_password": "battery staple"})
    assert r.status_code == 204, r.text
    assert (await rider.http.get("/v1/users/me")).status_code == 200   # the session that changed it stays
    await _refused_everywhere(stack, other)
    assert (await _login(stack, rider.email)).status_code == 401
    assert (await _login(stack, rider.email, "battery staple")).status_code == 200


async def test_a_deleted_user_is_refused_everywhere(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider: User = await users()
    stream = (await rider.http.post("/v1/auth/stream-token")).json()["token"]
    r = await rider.http.delete(f"/v1/users/{rider.id}")
    assert r.status_code == 403                               # riders do not delete accounts
    r = await stack.http.delete(f"/v1/users/{rider.id}")
    assert r.status_code == 204, r.text
    assert (await stack.http.delete(f"/v1/users/{rider.id}")).status_code == 404
    assert (await stack.http.delete("/v1/users/nobody")).status_code == 404
    await _refused_everywhere(stack, rider.token)
    assert await _stream_status(stack, stream) == 401
    assert (await _login(stack, rider.email)).status_code == 401
    listed = (await stack.http.get("/v1/users")).json()
    assert rider.id not in [u["id"] for u in listed]
    # the address is free again: the same person may sign up anew, as a new account
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        r = await anon.post("/v1/auth/signup", json={"email": rider.email, "password": "correct horse"})
    assert r.status_code == 201 and r.json()["user"]["id"] != rider.id


async def test_the_role_comes_from_the_database_not_the_token(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider: User = await users()
    claims = _claims(rider.token)
    # the same session, re-signed with the real key but claiming "operator" (a key leak, an old token
    # from before a demotion): the database says rider, so it is a rider
    promoted = jwt.encode({**claims, "role": "operator"}, stack.settings.jwt_secret, algorithm="HS256")
    async with httpx.AsyncClient(base_url=stack.api_url, headers=_bearer(promoted)) as http:
        assert (await http.get("/v1/devices")).status_code == 403
        assert (await http.get("/v1/users/me")).json()["role"] == "rider"


async def test_sub_admin_is_the_operator_only_in_a_stream_token_the_admin_token_minted(stack: LiveStack) -> None:
    secret = stack.settings.jwt_secret
    now = int(time.time())
    base = {"iss": "latch", "sub": "admin", "iat": now, "exp": now + 600}
    forged = {"access rider": {**base, "typ": "access", "role": "rider"},
              "access operator": {**base, "typ": "access", "role": "operator"},
              "stream without the admin mark": {**base, "typ": "stream", "role": "operator"}}
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        for what, claims in forged.items():
            token = jwt.encode(claims, secret, algorithm="HS256")
            r = await anon.get("/v1/devices", headers=_bearer(token))
            assert r.status_code == 401, (what, r.text)
            assert await _stream_status(stack, token) == 401, what
    minted = (await stack.http.post("/v1/auth/stream-token")).json()["token"]   # the real thing works
    assert await _stream_status(stack, minted) == 200


async def test_a_token_without_a_session_is_refused(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    """Tokens signed before sessions existed (no `sid`) cannot be revoked, so they are not accepted."""
    rider: User = await users()
    claims = {k: v for k, v in _claims(rider.token).items() if k != "sid"}
    old = jwt.encode(claims, stack.settings.jwt_secret, algorithm="HS256")
    async with httpx.AsyncClient(base_url=stack.api_url, headers=_bearer(old)) as http:
        r = await http.get("/v1/users/me")
        assert r.status_code == 401 and "log in again" in r.json()["detail"]


# ---- MQTT: the broker checks a rider's token the same way -------------------------------------


@pytest.fixture
async def ws_stack(tmp_path: Path) -> AsyncIterator[LiveStack]:
    async with Stack(make_settings(tmp_path, ws_port=0)) as st:
        async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                     headers=_bearer(st.settings.admin_token or "")) as http:
            yield LiveStack(st, http)


async def _mqtt_login(stack: LiveStack, user: User) -> MQTTClient:
    assert stack.stack.broker is not None
    port = stack.stack.broker.ports["ws"]
    client = MQTTClient(client_id=user.id, config={"auto_reconnect": False})
    await client.connect(f"ws://{user.id}:{user.token}@127.0.0.1:{port}/", cleansession=True)
    return client


async def test_a_revoked_or_deleted_users_token_no_longer_logs_in_over_mqtt(ws_stack: LiveStack) -> None:
    stack = ws_stack
    clients: list[httpx.AsyncClient] = []
    try:
        alice = await sign_up(stack, clients=clients)
        bob = await sign_up(stack, clients=clients)
        for u in (alice, bob):
            ok = await _mqtt_login(stack, u)
            await ok.disconnect()
        assert (await alice.http.post("/v1/auth/logout")).status_code == 204
        assert (await stack.http.delete(f"/v1/users/{bob.id}")).status_code == 204
        for u in (alice, bob):
            with pytest.raises((ConnectError, ClientError)):
                await asyncio.wait_for(_mqtt_login(stack, u), 10)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


async def test_open_streams_end_when_their_session_ends(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    """Logout ends the token's open SSE and WebSocket streams at once, not only its next request."""
    import asyncio
    import json as _json

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from tests.api.push_support import sse_messages

    rider = await users()
    url = stack.api_url.replace("http://", "ws://") + "/v1/ws"
    async with connect(url, additional_headers={"Authorization": f"Bearer {rider.token}"}) as ws:
        await ws.send(_json.dumps({"type": "subscribe"}))
        assert _json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"
        async with rider.http.stream("GET", "/v1/events/stream") as stream:
            messages = sse_messages(stream)
            assert (await asyncio.wait_for(messages.__anext__(), 10)).event == "ready"
            assert (await rider.http.post("/v1/auth/logout")).status_code == 204

            async def ended() -> str:
                async for m in messages:
                    if m.event == "error":
                        return m.json()["reason"]
                return "closed"
            assert "session ended" in await asyncio.wait_for(ended(), 10)
        try:
            await asyncio.wait_for(ws.recv(), 10)
            raise AssertionError("the WebSocket outlived its session")
        except ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code == 4401

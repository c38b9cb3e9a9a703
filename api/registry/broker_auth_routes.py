"""HTTP authentication/authorization hooks for external MQTT brokers that call out: EMQX 5.8+ and VerneMQ.

    POST /v1/broker/emqx/authn   EMQX HTTP authentication (answers with the client's ACL)
    POST /v1/broker/emqx/authz   EMQX HTTP authorization (per publish/subscribe)
    POST /v1/broker/vernemq      VerneMQ webhooks: auth_on_register, auth_on_subscribe, auth_on_publish
                                 (and their _m5 twins), selected by the `vernemq-hook` header

Every call must carry the shared hook secret (setting LATCH_BROKER_HOOK_SECRET, generated into
DATA_DIR/broker-hook.secret): ``Authorization: Bearer <secret>``, ``X-Latch-Hook-Secret: <secret>``,
or HTTP Basic with the secret as password (VerneMQ sends no custom headers, but its HTTP client
turns ``http://latch:<secret>@host/...`` into Basic auth). Without it: 401. Everything else is
answered 200, refusals included: for EMQX a 4xx means "ignore this authenticator", not "deny".
The decisions are in api/registry/broker_auth.py; how to configure the brokers: docs/external-brokers.md.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.registry.broker_auth import BrokerAuth

router = APIRouter(prefix="/v1/broker", tags=["external brokers"])

SECRET_HEADER = "x-latch-hook-secret"
UNAUTHORIZED = {"detail": "missing or wrong broker hook secret (DATA_DIR/broker-hook.secret): send "
                          "'Authorization: Bearer <secret>', 'X-Latch-Hook-Secret: <secret>' or HTTP Basic "
                          "with the secret as password"}


def _auth(request: Request) -> BrokerAuth:
    state = request.app.state
    auth = getattr(state, "broker_auth", None)
    if auth is None:
        rt = state.runtime
        auth = state.broker_auth = BrokerAuth(rt.db, rt.settings.service_secret or "", rt.settings.jwt_secret)
    return auth


def _presented_secrets(request: Request) -> list[str]:
    found: list[str] = []
    if header := request.headers.get(SECRET_HEADER):
        found.append(header)
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        found.append(value.strip())
    elif scheme.lower() == "basic" and value:
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            password = ""
        if password:
            found.append(password)
    return found


def _hook_secret_ok(request: Request) -> bool:
    expected = request.app.state.runtime.settings.broker_hook_secret
    if not expected:
        return False   # never open: ensure_secrets() always sets one
    return any(hmac.compare_digest(s.encode(), expected.encode()) for s in _presented_secrets(request))


async def _body(request: Request) -> Any:
    """The JSON body (or an x-www-form-urlencoded one, which EMQX can also send); None when malformed."""
    raw = await request.body()
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        try:
            return dict(parse_qsl(raw.decode(), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None


def _unauthorized() -> JSONResponse:
    return JSONResponse(UNAUTHORIZED, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="latch-broker-hooks"'})


@router.post("/emqx/authn", summary="EMQX 5.8+ HTTP authentication",
             responses={200: {"description": '{"result": "allow"|"deny", "is_superuser": false, "acl": [...]}'},
                        401: {"description": "missing or wrong hook secret"}})
async def emqx_authn(request: Request) -> JSONResponse:
    """Body: `{"username": "${username}", "password": "${password}", "clientid": "${clientid}"}`. A refusal is
    a 200 `deny` (a 4xx would make EMQX fall through to its next authenticator)."""
    if not _hook_secret_ok(request):
        return _unauthorized()
    return JSONResponse(await _auth(request).emqx_authenticate(await _body(request)))


@router.post("/emqx/authz", summary="EMQX HTTP authorization",
             responses={200: {"description": '{"result": "allow"|"deny"}'},
                        401: {"description": "missing or wrong hook secret"}})
async def emqx_authz(request: Request) -> JSONResponse:
    """Body: `{"username": "${username}", "clientid": "${clientid}", "topic": "${topic}", "action": "${action}"}`."""
    if not _hook_secret_ok(request):
        return _unauthorized()
    return JSONResponse(await _auth(request).emqx_authorize(await _body(request)))


@router.post("/vernemq", summary="VerneMQ webhooks (auth_on_register, auth_on_subscribe, auth_on_publish)",
             responses={200: {"description": '{"result": "ok"} or {"result": {"error": "..."}}'},
                        401: {"description": "missing or wrong hook secret"}})
async def vernemq(request: Request) -> JSONResponse:
    """One endpoint for every auth hook; VerneMQ names the hook in the `vernemq-hook` header."""
    if not _hook_secret_ok(request):
        return _unauthorized()
    hook = request.headers.get("vernemq-hook", "")
    if not hook:
        return JSONResponse({"result": {"error": "no vernemq-hook header: is this VerneMQ calling?"}})
    return JSONResponse(await _auth(request).vernemq(hook, await _body(request)))

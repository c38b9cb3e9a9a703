"""The OpenAPI document says every answer a client can get, not only the happy ones.

FastAPI documents a route's response model and its validation error; it cannot see the refusals Latch's
dependencies and services raise. This module adds them once, from what each route depends on, so the
schema and the behaviour agree (tests/fuzz checks every operation's answers against it):

- a bearer security scheme, on every operation that authenticates, with its 401;
- 403 on those (riders are refused operator operations, and things that are not theirs);
- 404 on operations with path parameters (an unknown id);
- 400 (a body that is not UTF-8 JSON), 413 (LATCH_MAX_BODY_BYTES) on operations that take a body;
- 429 and 503 where Latch refuses load (commands, rides, sign-up and login, event streams);
- every error as `{"detail": ...}`: a string, or for 422 also FastAPI's list of field errors.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from api import deps

ERROR = {"title": "Error", "type": "object", "required": ["detail"],
         "properties": {"detail": {"title": "Detail", "type": "string"}}}
AUTH_DEPENDENCIES = {deps.get_caller, deps.get_stream_caller, deps.get_principal}
LOAD_SHEDDING_PREFIXES = ("/v1/devices/{device_id}/commands", "/v1/rides", "/v1/auth/", "/v1/events")
STANDARD = {
    "400": "the body is not UTF-8 JSON, or a malformed request",
    "401": "missing, expired, revoked or invalid bearer token",
    "403": "not allowed for this caller (riders: not yours, or operators only)",
    "404": "no such resource",
    "409": "conflicts with the resource's state",
    "413": "the request body (or the signed command) is too large",
    "429": "too many requests or open streams (see Retry-After)",
    "503": "overloaded or degraded: retry (see Retry-After)",
}


def _calls(dependant: Any) -> set[Any]:
    found = {dependant.call}
    for d in dependant.dependencies:
        found |= _calls(d)
    return found


def _api_routes(routes: list[Any], prefix: str) -> list[tuple[str, APIRoute]]:
    """Every APIRoute with its full path, also inside included routers (FastAPI >= 0.16x nests them)."""
    found: list[tuple[str, APIRoute]] = []
    for r in routes:
        if isinstance(r, APIRoute):
            found.append((prefix + r.path, r))
        elif hasattr(r, "original_router"):
            found += _api_routes(r.original_router.routes, prefix + getattr(r.include_context, "prefix", ""))
    return found


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def install(app: FastAPI) -> None:
    """Replace app.openapi with one that adds the refusals above (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {})["Error"] = ERROR
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                     "description": "the operator token, or a user's access "
                                                                    "token (stream token in ?token= on streams)"}}
        routes = {(path, m.lower()): r for path, r in _api_routes(app.routes, "") for m in r.methods}
        for path, item in doc.get("paths", {}).items():
            for method, op in item.items():
                route = routes.get((path, method))
                if route is None:
                    continue
                _document(path, method, op, route)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi   # type: ignore[method-assign]


def _document(path: str, method: str, op: dict[str, Any], route: APIRoute) -> None:
    responses = op.setdefault("responses", {})

    def add(code: str) -> None:
        if code not in responses:
            responses[code] = _error(STANDARD[code])
        else:
            responses[code].setdefault("content", _error("")["content"])

    if _calls(route.dependant) & AUTH_DEPENDENCIES:
        op["security"] = [{"bearer": []}]
        add("401")
        add("403")
    if path.startswith("/v1/broker/"):   # the broker hooks authenticate with the hook secret
        add("401")
    if "{" in path:
        add("404")
    if "requestBody" in op:
        add("400")
        add("413")
    if path.startswith(LOAD_SHEDDING_PREFIXES):
        add("429")
        add("503")
    for code in ("409",):
        if code in responses:
            add(code)
    if "422" in responses:   # field errors (a list), or a refusal the route explains in one string
        schema = (responses["422"].get("content", {}).get("application/json", {}).get("schema")
                  or {"$ref": "#/components/schemas/HTTPValidationError"})
        one_of = [schema, {"$ref": "#/components/schemas/Error"}]
        responses["422"]["content"] = {"application/json": {"schema": {"anyOf": one_of}}}
    else:
        responses["422"] = _error("the request does not validate")
    stream = responses.get("200", {}).get("content", {}).get("text/event-stream")
    if stream is not None:   # an SSE body is a text stream of events, not one JSON value
        stream.pop("schema", None)

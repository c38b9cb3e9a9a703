"""Security headers on every HTTP response, and the API's own copy of the Swagger UI at /docs.

Every response says `nosniff`, may not be framed (X-Frame-Options and CSP frame-ancestors), sends no
referrer. Pages get a Content-Security-Policy that loads scripts only from Latch itself; JSON gets
`default-src 'none'`. /docs is Swagger UI served from the installed package (fastapi-offline ships its
assets) rather than a CDN: it works offline and nothing third-party runs beside an operator's token.
Its one inline start-up script is allowed by its hash, not by 'unsafe-inline'.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
DOCS_PATH = "/docs"
DOCS_ASSETS_PATH = "/docs-assets"

COMMON = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
          (b"referrer-policy", b"no-referrer"), (b"cross-origin-opener-policy", b"same-origin")]
# inline style attributes are used by the pages (and Swagger UI); scripts come only from 'self'
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def _script_hashes(html: str) -> str:
    inline = re.findall(r"<script>(.*?)</script>", html, re.S)
    return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in inline)


class SecurityHeaders:
    """ASGI middleware adding COMMON and a Content-Security-Policy to every HTTP response."""

    def __init__(self, app: Any, docs_csp: str) -> None:
        self.app = app
        self.docs_csp = docs_csp

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                html = any(k == b"content-type" and v.startswith(b"text/html") for k, v in headers)
                csp = self.docs_csp if path == DOCS_PATH else PAGE_CSP if html else API_CSP
                headers.extend(COMMON)
                headers.append((b"content-security-policy", csp.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI) -> None:
    """Serve /docs from the package's assets and wrap the app in SecurityHeaders."""
    page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} — API",
                               swagger_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
                               swagger_css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
                               swagger_favicon_url=f"{DOCS_ASSETS_PATH}/favicon.png")
    body = bytes(page.body)
    docs_csp = PAGE_CSP.replace("script-src 'self'", f"script-src 'self' {_script_hashes(body.decode())}")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(body)

    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.add_middleware(SecurityHeaders, docs_csp=docs_csp)

"""Helpers for the rider and push tests: user accounts with their own HTTP clients, SSE parsing."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support import LiveStack

_n = itertools.count(1)


@dataclass
class User:
    id: str
    email: str
    token: str
    role: str
    http: httpx.AsyncClient


async def sign_up(stack: LiveStack, role: str = "rider", email: str | None = None, password: str = "correct horse",
                  clients: list[httpx.AsyncClient] | None = None) -> User:
    email = email or f"{role}{next(_n)}@example.org"
    if role == "rider":
        async with httpx.AsyncClient(base_url=stack.api_url) as anon:
            r = await anon.post("/v1/auth/signup", json={"email": email, "password": password, "name": "Test"})
        assert r.status_code == 201, r.text
    else:
        r = await stack.http.post("/v1/users", json={"email": email, "password": password, "role": role})
        assert r.status_code == 201, r.text
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        r = await anon.post("/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    body = r.json()
    http = httpx.AsyncClient(base_url=stack.api_url, timeout=30,
                             headers={"Authorization": f"Bearer {body['access_token']}"})
    if clients is not None:
        clients.append(http)
    return User(body["user"]["id"], email, body["access_token"], body["user"]["role"], http)


@dataclass
class SseMessage:
    id: str | None = None
    event: str = "message"
    data: str = ""
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_messages(response: httpx.Response) -> AsyncIterator[SseMessage]:
    """Parses a text/event-stream body into messages (comments are attached to the next message
    or yielded alone as an event 'comment')."""
    msg = SseMessage()
    fields = False
    async for line in response.aiter_lines():
        if line == "":
            if fields:
                yield msg
            elif msg.comments:
                yield SseMessage(event="comment", comments=msg.comments)
            msg, fields = SseMessage(), False
            continue
        if line.startswith(":"):
            msg.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields = True
        if name == "id":
            msg.id = value
        elif name == "event":
            msg.event = value
        elif name == "data":
            msg.data = value if not msg.data else msg.data + "\n" + value


async def raw_request(api_url: str, path: str, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a GET over a fresh socket and return the stream (cheap enough to hold thousands)."""
    hostport = api_url.split("://", 1)[1]
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\n"
                 f"Connection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def raw_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, Any]:
    """Status and JSON body of a Connection: close response."""
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)

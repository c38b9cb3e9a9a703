"""Server-Sent Events: ids on every event, a type per kind, keep-alives, resume by Last-Event-ID,
stream tokens for EventSource, and a slow consumer cut off without slowing anyone else."""

from __future__ import annotations

import asyncio
import socket

import httpx

from api import tokens
from tests.api.push_support import SseMessage, sse_messages
from tests.support import LiveStack, eventually


async def collect(client: httpx.AsyncClient, until: int, params: dict | None = None,
                  headers: dict | None = None, timeout: float = 10) -> list[SseMessage]:
    """Messages from a stream until one with id >= `until` (bounded by `timeout`)."""
    out: list[SseMessage] = []

    async def run() -> None:
        async with client.stream("GET", "/v1/events/stream", params=params, headers=headers) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for msg in sse_messages(r):
                out.append(msg)
                if msg.id is not None and int(msg.id) >= until:
                    return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_every_event_has_an_id_and_a_type_and_resume_loses_nothing(stack: LiveStack) -> None:
    await stack.lock("bike-1")
    first = (await stack.command("bike-1", "locate")).json()
    assert first["status"] == "succeeded"
    head = stack.runtime.events.head
    msgs = await collect(stack.http, head, params={"after": 0})
    assert msgs[0].event == "ready" and msgs[0].id == "0" and msgs[0].json()["head"] == head
    events = [m for m in msgs[1:] if m.event != "comment"]
    assert [int(m.id) for m in events] == list(range(1, head + 1))     # every event, in order, once
    for m in events:
        body = m.json()
        assert m.event == body["kind"] and int(m.id) == body["id"]
    assert {"presence", "command", "lock_state"} >= {m.event for m in events} >= {"presence", "command"}
    # resume from the middle, by header and by query: exactly the rest
    middle = head // 2
    for kw in ({"headers": {"Last-Event-ID": str(middle)}}, {"params": {"last_event_id": str(middle)}}):
        again = [m for m in await collect(stack.http, head, **kw) if m.event not in ("ready", "comment")]
        assert [int(m.id) for m in again] == list(range(middle + 1, head + 1))


async def test_live_events_arrive_and_keepalive_comments_flow(stack: LiveStack) -> None:
    stack.runtime.settings.sse_keepalive_s = 0.2
    await stack.lock("bike-2")
    got: list[SseMessage] = []

    async def listen() -> None:
        async with stack.http.stream("GET", "/v1/events/stream") as r:   # no cursor: from now
            async for msg in sse_messages(r):
                got.append(msg)
                if msg.event == "command" and msg.json()["data"]["final"]:
                    return

    task = asyncio.ensure_future(asyncio.wait_for(listen(), 10))
    await eventually(lambda: any(m.event == "comment" for m in got), what="a keep-alive comment")
    # "from now": the newest event published when the stream opened (the lock's own reports may still
    # be arriving, so later ones can follow; none before the cursor)
    cursor = got[0].json()["cursor"]
    assert got[0].event == "ready" and 0 < cursor <= stack.runtime.events.head
    await stack.command("bike-2", "locate", wait=0)
    await task
    assert all(int(m.id) > cursor for m in got[1:] if m.id is not None)
    statuses = [m.json()["data"]["status"] for m in got if m.event == "command"]
    assert statuses == ["queued", "sent", "received", "succeeded"]
    assert "keep-alive" in [c for m in got for c in m.comments]


async def test_stream_tokens_in_the_query_for_eventsource(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    rider = await users()
    r = await rider.http.post("/v1/auth/stream-token")
    token = r.json()["token"]
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        async with anon.stream("GET", "/v1/events/stream", params={"token": token}) as s:
            assert s.status_code == 200
            msg = await asyncio.wait_for(anext(sse_messages(s)), 5)
            assert msg.event == "ready"
        expired, _ = tokens.issue(stack.settings.jwt_secret, rider.id, "rider", tokens.STREAM, 10, now=1_000_000)
        for bad, why in ((rider.token, "not accepted here"), (expired, "token expired"), ("nope", "invalid token")):
            r = await anon.get("/v1/events/stream", params={"token": bad})
            assert r.status_code == 401 and why in r.json()["detail"], r.text
        assert (await anon.get("/v1/events/stream")).status_code == 401
        # a stream token is for streams only
        r = await anon.get("/v1/bikes", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


async def append_padded(stack: LiveStack, n: int, size: int = 20_000) -> None:
    """Events straight into the log (the one append path), padded so socket buffers fill quickly."""
    rt = stack.runtime
    for i in range(0, n, 5):
        def unit(s, i=i):  # type: ignore[no-untyped-def]
            for j in range(i, min(n, i + 5)):
                rt.events.append(s, "command", {"device_id": "x", "seq": j, "pad": "x" * size}, None)
            s.commit()
        await rt.db.write(unit)


async def test_a_slow_consumer_is_cut_off_and_resumes_while_others_keep_up(stack: LiveStack) -> None:
    rt = stack.runtime
    rt.events.buffer = 20
    start = rt.events.head
    # the slow one: a socket with a tiny receive window that reads nothing for now
    host, port = stack.api_url.split("://")[1].rsplit(":", 1)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    slow.setblocking(False)
    await asyncio.get_running_loop().sock_connect(slow, (host, int(port)))
    slow.send(f"GET /v1/events/stream?after={start} HTTP/1.1\r\nHost: x\r\n"
              f"Authorization: Bearer {stack.admin_token}\r\n\r\n".encode())
    await eventually(lambda: len(rt.events) == 1, what="the slow subscriber")
    n = 400
    fast = asyncio.ensure_future(collect(stack.http, start + n, params={"after": start}, timeout=60))
    await eventually(lambda: len(rt.events) == 2, what="the fast subscriber")
    await append_padded(stack, n)
    got = [m for m in await fast if m.event == "command"]
    assert [int(m.id) for m in got] == list(range(start + 1, start + n + 1))   # the fast one had everything
    await eventually(lambda: rt.metrics.counts["subscribers_cut_off"] == 1, what="the slow one to be cut off")
    # the slow one reads what reached it, finds where it stopped, and resumes from there
    data = b""
    loop = asyncio.get_running_loop()
    for _ in range(10_000):
        chunk = await asyncio.wait_for(loop.sock_recv(slow, 65536), 10)
        if not chunk:
            break
        data += chunk
    slow.close()
    ids = [int(line[4:]) for line in data.decode(errors="replace").split("\n") if line.startswith("id: ")]
    last = max(i for i in ids if i > start and data.find(b"\n\n", data.find(b"id: %d\n" % i)) != -1)
    assert start < last < start + n
    rest = [m for m in await collect(stack.http, start + n, headers={"Last-Event-ID": str(last)})
            if m.event == "command"]
    assert [int(m.id) for m in rest] == list(range(last + 1, start + n + 1))

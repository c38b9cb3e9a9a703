"""The WebSocket: subscribe from a cursor, receive events, send commands with a request id and get a reply."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests.support import LiveStack, eventually


def ws_url(stack: LiveStack, query: str = "") -> str:
    return stack.api_url.replace("http://", "ws://") + "/v1/ws" + (f"?{query}" if query else "")


async def recv(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until(ws: ClientConnection, pred, limit: int = 200) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Frames up to and including the first matching `pred` (bounded in count and, per frame, in time)."""
    out = []
    for _ in range(limit):
        out.append(await recv(ws))
        if pred(out[-1]):
            return out
    raise AssertionError(f"no matching frame in {limit}")


async def test_subscribe_then_command_over_the_same_socket(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    await stack.lock("bike-1")
    rider = await users()
    ride = (await rider.http.post("/v1/rides", json={"bike_id": "bike-1"})).json()
    token = (await rider.http.post("/v1/auth/stream-token")).json()["token"]
    async with connect(ws_url(stack, f"token={token}")) as ws:
        await ws.send(json.dumps({"type": "subscribe", "after": 0, "request_id": "s1"}))
        assert await recv(ws) == {"type": "subscribed", "request_id": "s1", "cursor": 0}
        frames = await until(ws, lambda f: f["type"] == "event" and f["event"]["kind"] == "ride"
                             and f["event"]["data"]["status"] == "active")
        assert frames[0]["event"]["data"]["ride_id"] == ride["id"]
        # a lock over the socket: an immediate reply, then its progress as events
        await ws.send(json.dumps({"type": "command", "request_id": "r1", "device_id": "bike-1", "action": "lock"}))
        # the ride ends when the lock reports "locked"; the command succeeds on its ack: the two are
        # handled concurrently (in either order), so wait for both
        frames: list[dict] = []
        for _ in range(2):
            frames += await until(ws, lambda f: f["type"] == "event" and (
                (f["event"]["kind"] == "ride" and f["event"]["data"]["status"] == "ended")
                or (f["event"]["kind"] == "command" and f["event"]["data"]["action"] == "lock"
                    and f["event"]["data"]["final"])))
        reply = next(f for f in frames if f["type"] == "reply")
        assert reply["request_id"] == "r1" and reply["ok"] and reply["status"] == 201
        lock_id = reply["command"]["id"]
        statuses = [f["event"]["data"]["status"] for f in frames
                    if f["type"] == "event" and f["event"]["data"].get("command_id") == lock_id]
        assert statuses == ["queued", "sent", "received", "succeeded"]
        # the ride is over: the same socket is refused, with the reason
        await ws.send(json.dumps({"type": "command", "request_id": "r2", "device_id": "bike-1", "action": "unlock"}))
        reply = (await until(ws, lambda f: f["type"] == "reply"))[-1]
        assert reply == {**reply, "request_id": "r2", "ok": False, "status": 403}
        assert "you do not hold bike-1" in reply["error"]
        await ws.send(json.dumps({"type": "ping", "request_id": 7}))
        assert (await until(ws, lambda f: f["type"] == "pong"))[-1]["request_id"] == 7
        ids = [f["event"]["id"] for f in frames if f["type"] == "event"]
        assert ids == sorted(set(ids))


async def test_bad_frames_cursors_and_tokens(stack: LiveStack) -> None:
    async with connect(ws_url(stack), additional_headers={"Authorization": f"Bearer {stack.admin_token}"}) as ws:
        await ws.send("not json")
        assert "JSON objects" in (await recv(ws))["error"]
        await ws.send(json.dumps({"type": "launch"}))
        assert "unknown type" in (await recv(ws))["error"]
        await ws.send(json.dumps({"type": "subscribe", "after": "yesterday", "request_id": 1}))
        reply = await recv(ws)
        assert reply["status"] == 400 and "is not an event id" in reply["error"]
        await ws.send(json.dumps({"type": "subscribe", "after": 10**9, "request_id": 2}))
        assert "ahead of the newest event" in (await recv(ws))["error"]
        await ws.send(json.dumps({"type": "command", "request_id": 3, "device_id": "ghost", "action": "explode"}))
        assert (await recv(ws))["status"] == 422
        await ws.send(json.dumps({"type": "command", "request_id": 4, "device_id": "ghost", "action": "locate"}))
        reply = await recv(ws)
        assert reply["status"] == 404 and "no device" in reply["error"]
    for query, headers in (("token=forged", None), ("", None), ("", {"Authorization": "Bearer nope"})):
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            async with connect(ws_url(stack, query), additional_headers=headers):
                pass
        assert e.value.response.status_code == 401


async def test_a_slow_websocket_is_closed_with_a_reason_and_resumes(stack: LiveStack) -> None:
    from tests.api.test_sse import append_padded

    rt = stack.runtime
    rt.events.buffer = 20
    start = rt.events.head
    n = 400
    host, port = stack.api_url.split("://")[1].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)   # before connecting: a tiny window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    async with connect(ws_url(stack), sock=sock, max_queue=4, max_size=None, compression=None,
                       additional_headers={"Authorization": f"Bearer {stack.admin_token}"}) as ws:
        await ws.send(json.dumps({"type": "subscribe", "after": start}))
        assert (await recv(ws))["type"] == "subscribed"
        await append_padded(stack, n)      # and read nothing meanwhile
        await eventually(lambda: rt.metrics.counts["subscribers_cut_off"] == 1, timeout=20,
                         what="the slow socket to be cut off")
        last = start
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            for _ in range(n + 10):
                frame = await recv(ws, timeout=20)
                last = frame["event"]["id"]
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
        assert "too far behind" in closed.value.rcvd.reason
    assert start < last < start + n
    async with connect(ws_url(stack), additional_headers={"Authorization": f"Bearer {stack.admin_token}"},
                       max_size=None) as ws:
        await ws.send(json.dumps({"type": "subscribe", "after": last}))
        assert (await recv(ws))["cursor"] == last
        ids = [(await recv(ws))["event"]["id"] for _ in range(start + n - last)]
        assert ids == list(range(last + 1, start + n + 1))

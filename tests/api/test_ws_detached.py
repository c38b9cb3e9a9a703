"""A /v1/ws subscriber detached from its ASGI call (api/push/ws_detach.py), on the real server over real sockets: no
task left per socket; messages, pings and close frames still answered; oversize, fragmented and invalid frames as
before; keep-alive pings and the pong deadline; cut off (4008) and resumed, session ended (4401), server
shutdown (1012); and a socket that negotiated permessage-deflate kept on its task, working as before."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from api.push.ws_detach import DetachedSocket
from tests.api.test_push_direct import make_riders
from tests.api.test_sse import append_padded
from tests.support import LiveStack, eventually, live_stack

TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10


class RawWs:
    """A WebSocket client at the frame level (RFC 6455): masked frames out, the server's frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, stack: LiveStack, token: str, sock: socket.socket | None = None) -> "RawWs":
        host, port = stack.api_url.split("://")[1].rsplit(":", 1)
        if sock is None:
            reader, writer = await asyncio.open_connection(host, int(port))
        else:
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, op: int, payload: bytes, fin: bool = True, masked: bool = True) -> None:
        n = len(payload)
        head = bytes((0x80 * fin | op,))
        size = bytes((n,)) if n < 126 else bytes((126,)) + n.to_bytes(2, "big") if n < 65536 \
            else bytes((127,)) + n.to_bytes(8, "big")
        if not masked:
            self.writer.write(head + size + payload)
            return
        mask = os.urandom(4)
        self.writer.write(head + bytes((size[0] | 0x80,)) + size[1:] + mask
                          + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send_json(self, msg: dict[str, Any]) -> None:
        self.send(TEXT, json.dumps(msg).encode())

    async def frame(self, timeout: float = 10) -> tuple[int, bytes]:
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "server frames are not masked"
            n = b1 & 0x7F
            if n >= 126:
                n = int.from_bytes(await self.reader.readexactly(2 if n == 126 else 8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)
        return await asyncio.wait_for(read(), timeout)

    async def message(self, timeout: float = 10) -> dict[str, Any]:
        """The next text message (a ping on the way is answered)."""
        while True:
            op, payload = await self.frame(timeout)
            if op == PING:
                self.send(PONG, payload)
                continue
            assert op == TEXT, (op, payload)
            return json.loads(payload)

    async def answer(self) -> dict[str, Any]:
        """The next message that is not an event (a lock's own events may arrive in between: presence,
        lock_state)."""
        return (await self.until(lambda f: f["type"] != "event"))[-1]

    async def until(self, pred: Any, limit: int = 100) -> list[dict[str, Any]]:
        out = [await self.message()]
        while not pred(out[-1]):
            assert len(out) < limit
            out.append(await self.message())
        return out

    async def closed_with(self) -> tuple[int, str]:
        """The server's close frame (after any messages), then the end of the connection."""
        while True:
            op, payload = await self.frame()
            if op == CLOSE:
                code, reason = int.from_bytes(payload[:2], "big"), payload[2:].decode()
                self.send(CLOSE, payload[:2])
                try:
                    rest = await asyncio.wait_for(self.reader.read(), 10)
                except ConnectionResetError:   # the server closed without waiting for the answer (an error)
                    rest = b""
                assert rest == b""
                return code, reason

    def close(self) -> None:
        self.writer.close()


def uvicorn_state(stack: LiveStack) -> Any:
    return stack.stack._server.server_state  # type: ignore[union-attr]


async def subscribed(stack: LiveStack, ws: RawWs, detached: int | None, after: int | None = None) -> dict[str, Any]:
    """Subscribe, and wait until the socket is detached (the detached count reaches `detached`, unless None)."""
    ws.send_json({"type": "subscribe", "after": after, "request_id": "s"})
    reply = await ws.message()
    assert reply["type"] == "subscribed", reply
    if detached is not None:
        await eventually(lambda: stack.runtime.metrics.counts["subscribers_detached"] == detached,
                         what="the socket to be detached")
    return reply


async def test_a_detached_socket_has_no_task_and_still_answers_everything(stack: LiveStack) -> None:
    rt, state = stack.runtime, uvicorn_state(stack)
    await stack.lock("bike-1")
    ws = await RawWs.open(stack, stack.admin_token)
    await subscribed(stack, ws, 1)
    # no ASGI task is left for it, and the server's connection set holds our protocol instead of uvicorn's
    await eventually(lambda: not state.tasks, what="the ASGI call to end")
    assert [type(c) for c in state.connections if not isinstance(c, HttpToolsProtocol)] == [DetachedSocket]
    assert len(rt.events) == 1
    # messages: as on the ASGI path
    ws.send_json({"type": "ping", "request_id": 7})
    assert await ws.answer() == {"type": "pong", "request_id": 7}
    ws.send_json({"type": "subscribe", "request_id": 8})
    reply = await ws.answer()
    assert reply["status"] == 409 and "already subscribed" in reply["error"]
    ws.send_json({"type": "command", "request_id": "r1", "device_id": "bike-1", "action": "locate"})
    frames = await ws.until(lambda f: f["type"] == "event" and f["event"]["data"].get("final") is True)
    reply = next(f for f in frames if f["type"] == "reply")
    assert reply["request_id"] == "r1" and reply["ok"] and reply["status"] == 201
    statuses = [f["event"]["data"]["status"] for f in frames
                if f["type"] == "event" and f["event"]["data"].get("command_id") == reply["command"]["id"]]
    assert statuses[-1] == "succeeded", statuses
    ws.send(TEXT, b"not json")
    assert "JSON objects" in (await ws.answer())["error"]
    # a message in fragments, with a ping frame between them
    ws.send(TEXT, b'{"type": "pi', fin=False)
    ws.send(PING, b"between")
    ws.send(0, b'ng", "request_id": 9}')
    op, payload = await ws.frame()
    for _ in range(20):   # an event's text frame may come first
        if op != TEXT:
            break
        op, payload = await ws.frame()
    assert (op, payload) == (PONG, b"between")
    assert await ws.answer() == {"type": "pong", "request_id": 9}
    # over 16 KiB: dropped as it arrives, answered with the error, and the socket goes on
    ws.send(TEXT, b"x" * 10_000, fin=False)
    ws.send(0, b"x" * 10_000)
    assert (await ws.answer())["error"] == "frame over 16384 bytes"
    ws.send(TEXT, json.dumps({"type": "ping", "request_id": "x" * 17_000}).encode())
    assert (await ws.answer())["error"] == "frame over 16384 bytes"
    ws.send_json({"type": "ping", "request_id": 10})
    assert await ws.answer() == {"type": "pong", "request_id": 10}
    # the client's close: a close back with its code, the connection ends, the subscription with it
    ws.send(CLOSE, (1000).to_bytes(2, "big") + b"bye")
    assert await ws.frame() == (CLOSE, (1000).to_bytes(2, "big"))
    assert await asyncio.wait_for(ws.reader.read(), 10) == b""
    await eventually(lambda: len(rt.events) == 0 and not any(isinstance(c, DetachedSocket) for c in state.connections),
                     what="the subscription and the connection to close")
    ws.close()


async def test_frames_it_does_not_take_close_the_socket_with_the_code_for_it(stack: LiveStack) -> None:
    rt = stack.runtime
    for n, (op, payload, masked, code) in enumerate([(TEXT, b"\xff\xfe", True, 1007), (BINARY, b"{}", True, 1003),
                                                     (TEXT, b"{}", False, 1002)], start=1):
        ws = await RawWs.open(stack, stack.admin_token)
        await subscribed(stack, ws, n)
        ws.send(op, payload, masked=masked)
        assert (await ws.closed_with())[0] == code
        ws.close()
    await eventually(lambda: len(rt.events) == 0, what="the subscriptions to close")


async def test_a_detached_socket_is_pinged_and_closed_when_the_pong_is_overdue(tmp_path: Path) -> None:
    async with live_stack(tmp_path, sse_keepalive_s=0.05) as stack:   # housekeeping every 50 ms
        config = stack.stack._server.config  # type: ignore[union-attr]
        config.ws_ping_interval, config.ws_ping_timeout = 0.2, 0.5   # read by each new socket's protocol
        ws = await RawWs.open(stack, stack.admin_token)
        await subscribed(stack, ws, 1)
        for _ in range(2):   # pinged after a quiet interval, again after the pong
            op, payload = await ws.frame(timeout=5)
            assert op == PING
            ws.send(PONG, payload)
        assert (await ws.frame(timeout=5))[0] == PING   # and this one goes unanswered
        t0 = time.monotonic()
        assert await ws.closed_with() == (1011, "keepalive ping timeout")
        assert time.monotonic() - t0 >= 0.3
        await eventually(lambda: len(stack.runtime.events) == 0, what="the subscription to close")
        ws.close()


async def test_a_slow_detached_socket_is_closed_with_4008_and_resumes(stack: LiveStack) -> None:
    rt = stack.runtime
    rt.events.buffer = 20
    start, n = rt.events.head, 400
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)   # before connecting: a tiny window
    sock.setblocking(False)
    ws = await RawWs.open(stack, stack.admin_token, sock=sock)
    await subscribed(stack, ws, 1, after=start)
    await append_padded(stack, n)   # and read nothing meanwhile
    await eventually(lambda: rt.metrics.counts["subscribers_cut_off"] == 1, timeout=20,
                     what="the slow socket to be cut off")
    last = start
    while True:
        op, payload = await ws.frame(timeout=20)
        if op == CLOSE:
            break
        last = json.loads(payload)["event"]["id"]
    assert int.from_bytes(payload[:2], "big") == 4008 and "too far behind" in payload[2:].decode()
    ws.close()
    assert start < last < start + n
    again = await RawWs.open(stack, stack.admin_token)
    assert (await subscribed(stack, again, None, after=last))["cursor"] == last
    ids = [(await again.message())["event"]["id"] for _ in range(start + n - last)]
    assert ids == list(range(last + 1, start + n + 1))
    await eventually(lambda: rt.metrics.counts["subscribers_detached"] == 2, what="the resumed socket detached")
    again.close()


async def test_a_session_ended_elsewhere_closes_its_detached_socket_with_4401(stack: LiveStack) -> None:
    (uid, sid, token), (_, _, other) = await make_riders(stack, 2)
    mine, theirs = await RawWs.open(stack, token), await RawWs.open(stack, other)
    await subscribed(stack, mine, 1)
    await subscribed(stack, theirs, 2)
    r = await stack.http.post("/v1/auth/logout", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 204, r.text
    assert await mine.closed_with() == (4401, "session ended: log in again")
    theirs.send_json({"type": "ping"})
    assert (await theirs.message())["type"] == "pong"
    mine.close()
    theirs.close()


async def test_server_shutdown_closes_detached_sockets_with_1012_within_the_graceful_timeout(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack:
        ws = await connect(stack.api_url.replace("http://", "ws://") + "/v1/ws",
                           additional_headers={"Authorization": f"Bearer {stack.admin_token}"})
        await ws.send(json.dumps({"type": "subscribe"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"
        await eventually(lambda: stack.runtime.metrics.counts["subscribers_detached"] == 1, what="detached")
        graceful = stack.stack._server.config.timeout_graceful_shutdown  # type: ignore[union-attr]
        t0 = time.monotonic()
    assert time.monotonic() - t0 < graceful   # the server did not wait for the socket until it gave up
    try:
        await asyncio.wait_for(ws.recv(), 10)
        raise AssertionError("the socket stayed open")
    except ConnectionClosed as e:
        assert e.rcvd is not None and e.rcvd.code == 1012


async def test_a_socket_with_permessage_deflate_stays_on_its_task_and_works(stack: LiveStack) -> None:
    """uvicorn's default, which latch/stack.py turns off: such a socket is not detached (its frames may be
    compressed), and is written to directly by its task as before."""
    rt = stack.runtime
    stack.stack._server.config.ws_per_message_deflate = True  # type: ignore[union-attr]
    async with connect(stack.api_url.replace("http://", "ws://") + "/v1/ws",
                       additional_headers={"Authorization": f"Bearer {stack.admin_token}"}) as ws:
        assert ws.protocol.extensions, "permessage-deflate negotiated"
        await ws.send(json.dumps({"type": "subscribe"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"
        await eventually(lambda: rt.metrics.counts["subscribers_direct"] == 1, what="direct")
        await append_padded(stack, 3, size=100)
        for seq in range(3):
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["event"]["data"]["seq"] == seq
        await ws.send(json.dumps({"type": "ping", "request_id": 1}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"type": "pong", "request_id": 1}
        assert rt.metrics.counts["subscribers_detached"] == 0

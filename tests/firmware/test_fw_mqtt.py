"""The firmware's MQTT client (firmware/mqtt.py) under MicroPython against a scripted fake broker
that checks the bits on the wire: CONNECT flags, SUBSCRIBE only without a session, PUBACK only
after the handler, unsubscribed topics, keepalive and the receive timeout, DUP on resend,
refused CONNACK, and a refused TCP connect."""
from __future__ import annotations

import asyncio
import struct

from tests.firmware.fwsupport import MP_DIR, REPO, free_port, mp_env


async def read_packet(r: asyncio.StreamReader, timeout: float = 5) -> tuple[int, bytes]:
    first = (await asyncio.wait_for(r.readexactly(1), timeout))[0]
    n, shift = 0, 0
    while True:
        b = (await asyncio.wait_for(r.readexactly(1), timeout))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await asyncio.wait_for(r.readexactly(n), timeout) if n else b""


def pkt(first: int, body: bytes) -> bytes:
    n, out = len(body), bytearray([first])
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out) + body


def s(x: str | bytes) -> bytes:
    x = x.encode() if isinstance(x, str) else x
    return struct.pack("!H", len(x)) + x


def parse_publish(first: int, body: bytes) -> dict:
    n = struct.unpack("!H", body[:2])[0]
    topic = body[2:2 + n].decode()
    qos = (first >> 1) & 3
    pid = struct.unpack("!H", body[2 + n:4 + n])[0] if qos else None
    return {"topic": topic, "qos": qos, "pid": pid, "dup": bool(first & 8), "retain": bool(first & 1),
            "payload": body[2 + n + (2 if qos else 0):]}


async def run_probe(micropython: str, script: str, *args: object, until: asyncio.Event | None = None) -> str:
    """A probe script of tests/firmware/mp under MicroPython, run to its end (after `until`, when given): its output."""
    proc = await asyncio.create_subprocess_exec(
        micropython, str(MP_DIR / script), *map(str, args), env=mp_env(), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        if until is not None:
            await asyncio.wait_for(until.wait(), 20)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode()


class FakeBroker:
    def __init__(self):
        self.conn = 0
        self.log: list = []
        self.errors: list[str] = []
        self.done = asyncio.Event()

    def check(self, cond, what):
        if not cond:
            self.errors.append(what)

    async def handle(self, r, w):
        self.conn += 1
        n = self.conn
        try:
            first, body = await read_packet(r)
            self.check(first == 0x10, "CONNECT first")
            # protocol name, level 4, flags, keepalive
            self.check(body[:7] == b"\x00\x04MQTT\x04", "MQTT 3.1.1")
            flags, keepalive = body[7], struct.unpack("!H", body[8:10])[0]
            self.log.append(("connect", n, flags, keepalive))
            if n == 1:
                w.write(pkt(0x20, b"\x00\x00"))  # session-present 0
                first, body = await read_packet(r)
                self.check(first == 0x82, "SUBSCRIBE after session-present=0")
                self.log.append(("subscribe", body[2:]))
                w.write(pkt(0x90, body[:2] + b"\x01"))
                first, body = await read_packet(r)
                up = parse_publish(first, body)
                self.log.append(("publish", n, up))  # not acknowledged: it must come back, DUP
                # a retained command on the subscribed topic, then one on a foreign topic
                w.write(pkt(0x33, s("t/cmd") + b"\x00\x07" + b"open"))
                w.write(pkt(0x32, s("t/other") + b"\x00\x08" + b"nope"))
                seen = []
                while len([x for x in seen if x[0] == 0x40]) < 2:
                    seen.append(await read_packet(r))
                self.log.append(("after-commands", [(f, b) for f, b in seen]))
                # then silence: no PINGRESP; the client must ping, then give up on its own
                while True:
                    first, body = await read_packet(r, timeout=5)
                    self.log.append(("silent-rx", first))
            elif n == 2:
                w.write(pkt(0x20, b"\x01\x00"))  # session-present 1: no SUBSCRIBE expected
                for _ in range(2):
                    first, body = await read_packet(r)
                    p = parse_publish(first, body)
                    self.log.append(("publish", n, p))
                    w.write(pkt(0x40, struct.pack("!H", p["pid"])))
                await asyncio.sleep(0.2)
                w.close()  # the broker goes away
            elif n == 3:
                w.write(pkt(0x20, b"\x00\x05"))  # not authorized
                await asyncio.sleep(0.2)
                w.close()
                self.done.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.log.append(("eof", n))
        except asyncio.TimeoutError:
            self.log.append(("timeout", n))
        finally:
            w.close()


async def test_mqtt_client_on_the_wire(micropython):
    broker = FakeBroker()
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = free_port()
    try:
        text = await run_probe(micropython, "mqtt_probe.py", port, closed)
    finally:
        server.close()
        await server.wait_closed()
    assert not broker.errors, (broker.errors, text)
    log = broker.log
    # CONNECT: user+password, will retained QoS 1, clean session off, keepalive 1 s
    assert log[0] == ("connect", 1, 0x80 | 0x40 | 0x20 | 0x08 | 0x04, 1), log[0]
    assert ("subscribe", s("t/cmd") + b"\x01") in log
    first_up = [e for e in log if e[0] == "publish" and e[1] == 1][0][2]
    assert first_up["topic"] == "t/up" and first_up["qos"] == 1 and not first_up["dup"]
    # the retained command went to the handler; the foreign topic did not
    assert "HANDLE t/cmd open 1" in text and "t/other" not in text.replace("unsubscribed topic t/other", "")
    after = [e for e in log if e[0] == "after-commands"][0][1]
    kinds = [(f, b) for f, b in after]
    handled = next(i for i, (f, b) in enumerate(kinds) if f & 0xF0 == 0x30 and b"done:open" in b)
    ack7 = next(i for i, (f, b) in enumerate(kinds) if f == 0x40 and b == b"\x00\x07")
    ack8 = next(i for i, (f, b) in enumerate(kinds) if f == 0x40 and b == b"\x00\x08")
    assert handled < ack7, kinds  # PUBACK only after the handler finished
    assert not any(b"done:nope" in b for f, b in kinds)  # but the foreign message is acknowledged, unread
    assert ack8 >= 0
    # silence: the client pinged, then hung up on its own (receive timeout)
    assert ("silent-rx", 0xC0) in log and ("eof", 1) in log, log
    assert "receive timeout" in text
    # reconnect with a session: no SUBSCRIBE; the unacknowledged message again, DUP, same packet id
    assert ("connect", 2, 0xEC, 1) in log and not any(e[0] == "subscribe"
                                                      for e in log[log.index(("connect", 2, 0xEC, 1)):])
    second = [e[2] for e in log if e[0] == "publish" and e[1] == 2]
    assert second[0]["payload"] == b"hello0" and second[0]["dup"] and second[0]["pid"] == first_up["pid"]
    assert second[1]["payload"] == b"hello1" and not second[1]["dup"]
    assert "CONNECTED 1" in text
    # a refused CONNACK, then a refused TCP connect that only shows at the first write
    assert "REFUSED connection refused, code 5" in text
    assert "CLOSED PORT 111" in text
    assert "END pending=0" in text  # everything was acknowledged (hello2 was never sent)


async def test_no_memory_for_a_packet_keeps_the_link_and_the_qos1_message(micropython):
    """CI, 2026-12-07: on the 64 KiB heap a 200-byte PUBLISH could not be allocated and the client dropped
    the link, so the API saw the lock go offline and refused the next unlock. Now no memory for a packet is
    not a broken link: the QoS 1 message stays queued and goes out on a later tick (without DUP: it never
    left), the QoS 0 one is dropped, and the broker sees one connection throughout."""
    seen: list[dict] = []
    conns = 0
    got = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        try:
            first, _ = await read_packet(r)
            assert first == 0x10
            w.write(pkt(0x20, b"\x01\x00"))   # session present: no SUBSCRIBE
            while True:
                first, body = await read_packet(r, timeout=10)
                if first & 0xF0 == 0x30:
                    p = parse_publish(first, body)
                    seen.append(p)
                    if p["qos"]:
                        w.write(pkt(0x40, struct.pack("!H", p["pid"])))
                        got.set()
                elif first == 0xC0:
                    w.write(b"\xd0\x00")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        text = await run_probe(micropython, "mqtt_nomem_probe.py", port, until=got)
    finally:
        server.close()
        await server.wait_closed()
    assert "AFTER PUBLISH connected=True pending=1" in text, text
    assert "no memory for a 9-byte message now: kept queued" in text, text
    assert "no memory for a 4-byte message now: dropped" in text, text
    assert "link lost" not in text, text
    assert [(p["topic"], p["payload"], p["qos"], p["dup"]) for p in seen] == [("t/ack", b"succeeded", 1, False)]
    assert conns == 1
    assert "END connected=True pending=0" in text, text

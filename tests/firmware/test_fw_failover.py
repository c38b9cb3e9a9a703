"""The firmware with several broker addresses (the nodes of a clustered broker, issue 18): it starts on the
first node that answers and moves to the next when its node goes away; a refused login is not a node's
failure. The nodes here are loopback relays (tests/firmware/mqttproxy.py) in front of one Latch broker, so
they share the broker's sessions and the API, as a cluster's nodes do; a node "goes away" when its relay
stops listening and drops its connections."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from firmware import config as fwconfig
from protocol import topics
from tests.firmware.fwsupport import FirmwareProcess, device_config, free_port, run_mp
from tests.firmware.mqttproxy import MqttProxy, publish_parts

DEV = "bike-0001"


def connecting(fw, after=0) -> list[int]:
    """The ports of the "connecting to" lines, in order."""
    return [int(m.group(1)) for line in fw.lines[after:] if (m := re.search(r"connecting to 127\.0\.0\.1:(\d+)", line))]


async def start_device(stack, micropython, tmp_path, ports, **overrides):
    reg = await stack.register(DEV)
    cfg = device_config(reg, "127.0.0.1", 0, tmp_path / DEV, **overrides)
    cfg["broker"] = {"hosts": [["127.0.0.1", p] for p in ports]}
    fw = FirmwareProcess(micropython, tmp_path / DEV, cfg)
    stack.locks.append(fw)  # stopped at teardown
    await fw.start()
    return fw


def acked_through(proxy: MqttProxy, command_id: str) -> bool:
    """The lock's final ack of `command_id` went up through this node."""
    for p in proxy.up:
        parts = publish_parts(p)
        if parts and parts[0] == topics.ack_topic(DEV) and command_id.encode() in parts[3] \
                and b'"received"' not in parts[3]:
            return True
    return False


class UnavailableNode:
    """A node that is up but not serving: it answers every CONNECT with CONNACK code 3 (server unavailable)."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "UnavailableNode":
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await asyncio.wait_for(r.read(1), 10)   # its CONNECT has begun
                w.write(b"\x20\x02\x00\x03")
                await w.drain()
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                w.close()
        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()


async def test_starts_on_the_first_node_that_answers(stack, micropython, tmp_path):
    dead = free_port()   # nothing listens there
    async with UnavailableNode() as busy:
        fw = await start_device(stack, micropython, tmp_path, [dead, busy.port, stack.mqtt_port])
        await fw.wait_line(r"clock synchronised", timeout=30)
        await stack.wait_presence(DEV, True)
        assert connecting(fw) == [dead, busy.port, stack.mqtt_port], fw.output()
        assert busy.connections == 1
        # code 3 is that node's trouble: the lock moved on at its usual pace, not the 10 s of a refused login
        assert fw.count(r"link down: .*connection refused, code 3") == 1 and fw.count(r"^LATCH \d+ link: ") == 0
        r = await stack.command(DEV, "unlock", wait=10)
        assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
        assert fw.motor_runs() == 1


async def test_moves_to_the_next_node_when_its_node_goes_away(stack, micropython, tmp_path):
    a = await MqttProxy(stack.mqtt_host, stack.mqtt_port).start()
    b = await MqttProxy(stack.mqtt_host, stack.mqtt_port).start()
    a2 = None
    try:
        fw = await start_device(stack, micropython, tmp_path, [a.port, b.port])
        await fw.wait_line(r"clock synchronised", timeout=30)
        await stack.wait_presence(DEV, True)
        assert (a.connections, b.connections) == (1, 0)
        r = await stack.command(DEV, "unlock", wait=10)
        assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
        assert acked_through(a, r.json()["id"])

        # node A goes away: the lock is on B at its next attempt, and an unlock goes through B
        mark = len(fw.lines)
        await a.close()
        await fw.wait_line(r"link down", after=mark, timeout=15)
        await fw.wait_line(r"clock synchronised", after=mark, timeout=30)
        assert connecting(fw, mark) == [b.port], fw.output()
        await stack.wait_presence(DEV, True)
        r = await stack.command(DEV, "lock", wait=10)
        assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
        assert acked_through(b, r.json()["id"]) and not acked_through(a, r.json()["id"])

        # A is back on its address, B goes away: the lock wraps around to A
        a2 = await MqttProxy(stack.mqtt_host, stack.mqtt_port).start(port=a.port)
        mark = len(fw.lines)
        await b.close()
        await fw.wait_line(r"clock synchronised", after=mark, timeout=30)
        assert connecting(fw, mark) == [a.port], fw.output()
        await stack.wait_presence(DEV, True)
        r = await stack.command(DEV, "unlock", wait=10)
        assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
        assert acked_through(a2, r.json()["id"])
        assert fw.motor_runs() == 3 and fw.count("MemoryError") == 0
    finally:
        for p in (a, b, a2):
            if p is not None:
                await p.close()


async def test_a_refused_login_stays_on_its_node(stack, micropython, tmp_path):
    """A cluster's nodes share their accounts: the lock does not go round the nodes with a password they all
    refuse; it keeps the refused-login backoff (at least 10 s) and asks the same node again."""
    dead = free_port()
    fw = await start_device(stack, micropython, tmp_path, [stack.mqtt_port, dead], mqtt_password="wrong")
    await fw.wait_line(r"^LATCH \d+ link: connection refused, code [45]", timeout=20)
    m = await fw.wait_line(r"reconnect in (\d+) ms", timeout=10)
    assert int(m.group(1)) >= 10000
    mark = len(fw.lines)
    await fw.wait_line(r"link: connection refused", after=mark, timeout=25)
    assert connecting(fw) == [stack.mqtt_port, stack.mqtt_port], fw.output()


# config.json's broker addresses: what config.loads() makes of them, the same under CPython and MicroPython
BASE = {"device_id": DEV, "mqtt_password": "pw", "command_key": "ab" * 32}
CASES = [
    ({"host": "a"}, [["a", 1883, "a"]]),
    ({"host": "a", "port": 1884}, [["a", 1884, "a"]]),
    ({"host": "a", "tls": True, "server_hostname": "mqtt.example.org"}, [["a", 8883, "mqtt.example.org"]]),
    ({"hosts": [["10.0.0.1", 8883], ["10.0.0.2", 8884]], "tls": True},
     [["10.0.0.1", 8883, "10.0.0.1"], ["10.0.0.2", 8884, "10.0.0.2"]]),
    ({"hosts": ["n1", ["n2", 2000]], "port": 1999, "tls": True, "server_hostname": "mqtt.example.org"},
     [["n1", 1999, "mqtt.example.org"], ["n2", 2000, "mqtt.example.org"]]),
    ({"hosts": [["n", 1]] * 8}, [["n", 1, "n"]] * 8),
    ({"hosts": [["n", 1]] * 9}, "1 to 8 addresses"),
    ({"hosts": []}, "1 to 8 addresses"),
    ({"hosts": "n1,n2"}, "1 to 8 addresses"),
    ({"hosts": [["n", 1]], "host": "n"}, "host or hosts, not both"),
    ({"hosts": [["n", 0]]}, "port in 1..65535"),
    ({"hosts": [["n", 65536]]}, "port in 1..65535"),
    ({"hosts": [["n", "1883"]]}, "port in 1..65535"),
    ({"hosts": [["n", True]]}, "port in 1..65535"),
    ({"hosts": [["", 1883]]}, 'must be \\["host", port\\]'),
    ({"hosts": [["n"]]}, 'must be \\["host", port\\]'),
    ({"hosts": [["n", 1, 2]]}, 'must be \\["host", port\\]'),
    ({"port": 1883}, "broker needs a host"),
    ("mqtt://n", "broker must be a JSON object"),
]


def loaded(broker):
    try:
        return [list(h) for h in fwconfig.loads(json.dumps({**BASE, "broker": broker}))["broker"]["hosts"]]
    except ValueError as e:
        return "ValueError: " + str(e)


@pytest.mark.parametrize("broker,expected", CASES)
def test_config_broker_addresses(broker, expected):
    got = loaded(broker)
    if isinstance(expected, list):
        assert got == expected
    else:
        assert isinstance(got, str) and re.search(expected, got), got


def test_config_broker_addresses_under_micropython(micropython, tmp_path):
    script = tmp_path / "cases.py"
    script.write_text(
        "import json, sys\nfrom firmware import config\n"
        "for line in sys.stdin:\n"
        "    try:\n"
        "        print(json.dumps([list(h) for h in config.loads(line)['broker']['hosts']]))\n"
        "    except ValueError as e:\n"
        "        print(json.dumps('ValueError: ' + str(e)))\n")
    lines = "".join(json.dumps({**BASE, "broker": b}) + "\n" for b, _ in CASES)
    r = run_mp(micropython, script, input=lines, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [json.loads(x) for x in r.stdout.splitlines()] == [loaded(b) for b, _ in CASES]

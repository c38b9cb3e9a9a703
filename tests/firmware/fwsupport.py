"""Helpers for the firmware tests: find `micropython`/`mpy-cross`, run scripts under them,
run the firmware process itself against a broker.

Nothing here skips when LATCH_REQUIRE_ALL is set: a missing tool fails the test.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.ports import free_port  # noqa: F401  (the firmware tests' broker and API ports)

REPO = Path(__file__).resolve().parents[2]
MP_DIR = Path(__file__).resolve().parent / "mp"
if str(MP_DIR) not in sys.path:
    sys.path.insert(0, str(MP_DIR))  # controller_cases runs under both interpreters


def tool_path(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def need_tool(name: str) -> str:
    path = tool_path(name)
    if path is None:
        msg = f"{name} is not installed (pip install the firmware test dependencies)"
        if os.environ.get("LATCH_REQUIRE_ALL"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def need_module(name: str) -> None:
    """A Python package a test needs (esptool, mpremote, cryptography): skip locally, fail in CI."""
    import importlib.util
    if importlib.util.find_spec(name) is None:
        msg = f"Python package {name} is not installed (pip install the firmware test dependencies)"
        if os.environ.get("LATCH_REQUIRE_ALL"):
            pytest.fail(msg)
        pytest.skip(msg)


def mp_env(extra_paths=(), code_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    root = code_dir or REPO
    env["MICROPYPATH"] = ":".join([*map(str, extra_paths), str(root), str(MP_DIR), ".frozen"])
    return env


def run_mp(micropython, script, *args, heap=None, timeout=120, extra_paths=(), cwd=None, input=None):
    cmd = [micropython]
    if heap:
        cmd += ["-X", f"heapsize={heap}"]
    cmd += [str(script), *map(str, args)]
    return subprocess.run(cmd, env=mp_env(extra_paths), cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, input=input)


def device_config(reg: dict, host: str, port: int, workdir: Path, **overrides) -> dict:
    """A config.json for the firmware under the Unix port, from a registration response."""
    cfg = {
        "device_id": reg["id"],
        "mqtt_password": reg["mqtt_password"],
        "command_key": reg["command_key"],
        "broker": {"host": host, "port": port},
        "hal": "unix",
        "keepalive_s": 3,
        "connect_timeout_ms": 3000,
        "backoff_min_ms": 200,
        "backoff_max_ms": 2000,
        "heartbeat_s": 30,
        "telemetry_s": 60,
        "state_path": str(workdir / "state.json"),
        "wdt_ms": 0,
        "tick_ms": 50,
        "sim": {"control": str(workdir / "knobs.json"), "actuation_ms": 100},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


class FirmwareProcess:
    """`micropython -m firmware.main config.json` with the Unix HAL, its output collected."""

    def __init__(self, micropython: str, workdir: Path, config: dict | None, heap: str | None = None,
                 code_dir: Path | None = None, extra_paths=()):
        self.micropython = micropython
        self.workdir = workdir
        self.config = config
        self.heap = heap
        self.code_dir = code_dir
        self.extra_paths = list(extra_paths)
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self.starts = 0

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.json"

    def knobs(self, **knobs) -> None:
        path = Path(self.config["sim"]["control"])
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(knobs)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        os.replace(tmp, path)

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [self.micropython]
        if self.heap:
            cmd += ["-X", f"heapsize={self.heap}"]
        if self.config is None:
            # a provisioned "board": its root holds main.py, the app and config.json
            cmd += ["main.py"]
            env = dict(os.environ, MICROPYPATH=".frozen")
        else:
            self.config_path.write_text(json.dumps(self.config))
            cmd += ["-m", "firmware.main", str(self.config_path)]
            env = mp_env(self.extra_paths, code_dir=self.code_dir)
        cwd = self.workdir
        if self.code_dir is not None:
            # a build laid out like the board's flash: run from its root, as the board does
            cwd = self.code_dir
            env = dict(os.environ, MICROPYPATH=".frozen")
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, cwd=cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self.starts += 1
        self.lines.append(f"--- start {self.starts}")
        self._reader = asyncio.get_running_loop().create_task(self._read(self.proc))

    async def _read(self, proc) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_line(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match:
        """The first output line from index `after` on matching the regex `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = after
        while True:
            while i < len(self.lines):
                m = rx.search(self.lines[i])
                if m:
                    return m
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"firmware did not print /{pattern}/ within {timeout}s; output:\n"
                                     + self.output())
            if self.proc is not None and self.proc.returncode is not None and not self._changed.is_set():
                raise AssertionError(f"firmware exited ({self.proc.returncode}) before /{pattern}/:\n"
                                     + self.output())
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.lines if rx.search(line))

    def motor_runs(self) -> int:
        return self.count(r"^SIM motor (unlock|lock)")

    def output(self, last: int = 80) -> str:
        return "\n".join(self.lines[-last:])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        """Power cut: SIGKILL, nothing flushed."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        await self._wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
        await self._wait()

    async def _wait(self) -> None:
        if self.proc is not None:
            await asyncio.wait_for(self.proc.wait(), 10)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
            self._reader = None


class Injector:
    """An MQTT client with the service's broker credentials: sees and publishes on any device topic,
    like a forger who got onto the broker, or a broker redelivering."""

    def __init__(self, host: str, port: int, service_secret: str, client_id: str = "fw-test-injector"):
        self.host, self.port, self.secret, self.client_id = host, port, service_secret, client_id
        self.received: list[tuple[str, bytes]] = []
        self.client = None

    async def __aenter__(self) -> "Injector":
        from gmqtt import Client
        from gmqtt.mqtt.constants import MQTTv311

        self.client = Client(self.client_id)
        self.client.set_auth_credentials("latch-service", self.secret)
        self.client.on_message = self._on_message
        await asyncio.wait_for(self.client.connect(self.host, self.port, version=MQTTv311), 10)
        return self

    def _on_message(self, client, topic, payload, qos, properties) -> int:
        self.received.append((topic, payload))
        return 0

    async def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        await asyncio.sleep(0)  # gmqtt has no awaitable subscribe; callers poll for what they expect

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    async def __aexit__(self, *exc) -> None:
        await asyncio.wait_for(self.client.disconnect(), 10)


class ServeProcess:
    """`latch serve` in its own process, so it can be killed, restarted and frozen (SIGSTOP)."""

    def __init__(self, data_dir: Path, admin_token: str = "test-admin-token"):
        self.data_dir = data_dir
        self.admin_token = admin_token
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "serve.log"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    async def start(self, timeout: float = 30) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LATCH_ADMIN_TOKEN=self.admin_token, LATCH_SETTLE_GRACE_S="0.5",
                   PYTHONPATH=str(REPO))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "latch.cli", "serve", "--host", self.host, "--data-dir", str(self.data_dir),
                 "--mqtt-port", str(self.mqtt_port), "--http-port", str(self.http_port),
                 "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        import httpx
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while True:
                try:
                    r = await http.get(self.api_url + "/v1/devices", timeout=2,
                                       headers={"Authorization": f"Bearer {self.admin_token}"})
                    if r.status_code < 500:
                        return
                except httpx.HTTPError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("latch serve did not come up:\n" + self.log.read_text()[-3000:])
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


class ScratchCA:
    """A throwaway certificate authority for TLS tests (cryptography is an esptool dependency)."""

    def __init__(self, name: str = "Latch Test CA"):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ec, self._oid = x509, hashes, ec, NameOID
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._now = now
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def der(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding
        return self.cert.public_bytes(Encoding.DER)

    def pem(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding
        return self.cert.public_bytes(Encoding.PEM)

    def issue(self, directory: Path, hostnames=("localhost",), ips=("127.0.0.1",)) -> tuple[Path, Path]:
        """A server certificate and key (PEM files) for these names."""
        import datetime
        import ipaddress

        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        x509, ec = self._x509, self._ec
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, hostnames[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(self._now - datetime.timedelta(days=1))
                .not_valid_after(self._now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, self._hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / "server.crt", directory / "server.key"
        cert_path.write_bytes(cert.public_bytes(Encoding.PEM) + self.pem())
        key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        return cert_path, key_path


class SocketBoard:
    """The MicroPython Unix port's REPL on a TCP socket, so mpremote can talk to it as
    `socket://127.0.0.1:PORT` (with `resume`): a "board" whose flash is `root`.

    One REPL process per connection, on a pseudo-terminal (the Unix port's REPL wants a tty).
    """

    def __init__(self, micropython: str, root: Path):
        self.micropython = micropython
        self.root = root
        self.port = 0
        self._server: socket.socket | None = None
        self._threads: list = []
        self._procs: list[subprocess.Popen] = []
        self._stop = False

    def __enter__(self) -> "SocketBoard":
        import threading
        self.root.mkdir(parents=True, exist_ok=True)
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(4)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading
        deadline = time.monotonic() + 600
        while not self._stop and time.monotonic() < deadline:
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        import pty
        import select
        import tty

        master, slave = pty.openpty()
        tty.setraw(slave)
        proc = subprocess.Popen([self.micropython], stdin=slave, stdout=slave, stderr=slave, cwd=self.root,
                                env=mp_env(), close_fds=True)
        self._procs.append(proc)
        os.close(slave)
        deadline = time.monotonic() + 300
        try:
            while not self._stop and proc.poll() is None and time.monotonic() < deadline:
                r, _, _ = select.select([conn, master], [], [], 0.2)
                if conn in r:
                    data = conn.recv(4096)
                    if not data:
                        break
                    os.write(master, data)
                if master in r:
                    try:
                        data = os.read(master, 4096)
                    except OSError:
                        break
                    conn.sendall(data)
        finally:
            conn.close()
            proc.kill()
            proc.wait(10)
            os.close(master)

    def __exit__(self, *exc) -> None:
        self._stop = True
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for t in self._threads:
            t.join(5)
        self._server.close()

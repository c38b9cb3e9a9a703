"""The TLS and WebSocket listeners, each with a real client: gmqtt (what the API and the simulator
use) over TLS, with a password or with a client certificate as the device's identity, and amqtt's
client over MQTT-over-WebSocket."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from broker.identity import SERVICE_USERNAME
from latch.stack import Stack
from mqtt_client import MqttClient, MqttConnectError
from protocol import topics
from tests.support import LiveStack, eventually, make_settings, require

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
except ImportError:  # pragma: no cover - reported by require() in the fixture
    x509 = None  # type: ignore[assignment]


class CA:
    """A throwaway certificate authority writing PEM files."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=7))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = self.dir / f"{name.replace(' ', '_')}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7)))
        if server:
            import ipaddress
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{cn}.crt", self.dir / f"{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


@pytest.fixture
async def tls_stack(tmp_path: Path) -> AsyncIterator[tuple[LiveStack, CA]]:
    require(x509 is not None, "the cryptography package (to make test certificates)")
    ca = CA(tmp_path / "pki", "Latch Test CA")
    cert, key = ca.issue("broker", server=True)
    settings = make_settings(tmp_path, tls_cert=cert, tls_key=key, tls_port=0, tls_client_ca=ca.path, ws_port=0)
    async with Stack(settings) as st:
        async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {settings.admin_token}"}) as http:
            yield LiveStack(st, http), ca


def client_context(ca: CA, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


async def _service_observer(stack: LiveStack, seen: list[tuple[str, bytes]]) -> MqttClient:
    async def record(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        seen.append((topic, payload))

    observer = MqttClient("tls-observer", username=SERVICE_USERNAME, password=stack.settings.service_secret,
                          clean_session=True, handler=record)
    await observer.connect(stack.mqtt_host, stack.mqtt_port)            # plain TCP
    await observer.subscribe([("latch/v1/d/+/telemetry", 1)])
    return observer


async def test_tls_listener_with_password_both_directions(tls_stack: tuple[LiveStack, CA]) -> None:
    stack, ca = tls_stack
    tls_port = stack.stack.broker.ports["tls"]  # type: ignore[union-attr]
    creds = await stack.register("tls-pw")
    seen: list[tuple[str, bytes]] = []
    got: list[bytes] = []

    async def on_cmd(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        got.append(payload)

    observer = await _service_observer(stack, seen)
    device = MqttClient("tls-pw", username="tls-pw", password=creds["mqtt_password"], handler=on_cmd)
    await device.connect("127.0.0.1", tls_port, tls=client_context(ca))
    try:
        assert await device.subscribe([(topics.cmd_topic("tls-pw"), 1)]) == [1]
        device.publish(topics.telemetry_topic("tls-pw"), b"over-tls", qos=1)
        await eventually(lambda: (topics.telemetry_topic("tls-pw"), b"over-tls") in seen, what="TLS uplink")
        observer.publish(topics.cmd_topic("tls-pw"), b"to-tls", qos=1)
        await eventually(lambda: b"to-tls" in got, what="TLS downlink")
    finally:
        await device.disconnect()
        await observer.disconnect()


async def test_a_client_certificate_is_the_devices_identity(tls_stack: tuple[LiveStack, CA], tmp_path: Path) -> None:
    stack, ca = tls_stack
    tls_port = stack.stack.broker.ports["tls"]  # type: ignore[union-attr]
    await stack.register("cert-dev")
    seen: list[tuple[str, bytes]] = []
    observer = await _service_observer(stack, seen)
    device = MqttClient("cert-dev")                                 # no username, no password
    await device.connect("127.0.0.1", tls_port, tls=client_context(ca, ca.issue("cert-dev", server=False)))
    try:
        granted = await device.subscribe([(topics.cmd_topic("cert-dev"), 1), (topics.cmd_topic("other"), 1)])
        assert granted == [1, 0x80]                                 # the device fence applies to it
        device.publish(topics.telemetry_topic("cert-dev"), b"by-cert", qos=1)
        await eventually(lambda: (topics.telemetry_topic("cert-dev"), b"by-cert") in seen, what="cert uplink")
    finally:
        await device.disconnect()
        await observer.disconnect()
    # a certificate for a device the registry does not know logs nobody in
    stranger = MqttClient("not-registered")
    with pytest.raises(MqttConnectError):
        await stranger.connect("127.0.0.1", tls_port, tls=client_context(ca, ca.issue("not-registered", server=False)),
                               timeout=5)
    await stranger.disconnect()
    # nor does a certificate from another CA: the handshake fails
    rogue = CA(tmp_path / "rogue", "Rogue CA")
    ctx = client_context(ca, rogue.issue("cert-dev", server=False))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", tls_port, ssl=ctx), 5)
        w.write(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
        await w.drain()
        await asyncio.wait_for(w.wait_closed(), 5)
        raise ConnectionError("closed")


async def test_websocket_listener_with_a_real_client(tls_stack: tuple[LiveStack, CA]) -> None:
    from amqtt.client import MQTTClient  # amqtt's client speaks MQTT over WebSocket

    stack, _ = tls_stack
    ws_port = stack.stack.broker.ports["ws"]  # type: ignore[union-attr]
    creds = await stack.register("ws-dev")
    got: list[bytes] = []

    async def on_cmd(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        got.append(payload)

    device = MqttClient("ws-dev", username="ws-dev", password=creds["mqtt_password"], handler=on_cmd)
    await device.connect(stack.mqtt_host, stack.mqtt_port)
    await device.subscribe([(topics.cmd_topic("ws-dev"), 1)])
    ws = MQTTClient(client_id="ws-service", config={"auto_reconnect": False})
    try:
        await asyncio.wait_for(
            ws.connect(f"ws://{SERVICE_USERNAME}:{stack.settings.service_secret}@127.0.0.1:{ws_port}/"), 10)
        await ws.subscribe([("latch/v1/d/+/telemetry", 1)])
        await ws.publish(topics.cmd_topic("ws-dev"), b"via-websocket", qos=1)
        await eventually(lambda: b"via-websocket" in got, what="a command published over WebSocket")
        device.publish(topics.telemetry_topic("ws-dev"), b"to-websocket", qos=1)
        message = await asyncio.wait_for(ws.deliver_message(), 10)
        assert message is not None and (message.topic, bytes(message.data)) == (
            topics.telemetry_topic("ws-dev"), b"to-websocket")
    finally:
        await asyncio.wait_for(ws.disconnect(), 10)
        await device.disconnect()


async def test_websocket_violations_close_only_the_offender(tls_stack: tuple[LiveStack, CA]) -> None:
    """A text frame, or bytes that are not MQTT, close that WebSocket; a proper client goes on."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    stack, _ = tls_stack
    url = f"ws://127.0.0.1:{stack.stack.broker.ports['ws']}/"  # type: ignore[union-attr]
    for bad in ("CONNECT as text", b"GET / HTTP/1.1\r\n\r\n"):
        async with connect(url, subprotocols=["mqtt"]) as ws:  # type: ignore[list-item]
            await ws.send(bad)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
    async with connect(url, subprotocols=["mqtt"]) as ws:  # type: ignore[list-item]
        await ws.send(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04good")    # anonymous: refused, but answered
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x20\x02\x00\x05"

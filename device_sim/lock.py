"""One simulated lock: the firmware's LockController over a real MQTT connection.

The controller decides (signature, expiry, duplicates, what to report); this
module only performs its effects: publishing, a motor that takes a while and
may jam, a sensor that follows the motor. Fault knobs live in Behaviour.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import random
import ssl
import time
from dataclasses import dataclass, field

from firmware.controller import LockController
from mqtt_client import MqttClient, Will, drop_connection
from protocol import messages, topics

log = logging.getLogger("latch.sim")


def local_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Behaviour:
    ack_delay_s: float = 0.0          # before the lock looks at a command
    actuation_delay_s: float = 0.05   # how long the motor runs
    jam_rate: float = 0.0             # share of actuations that jam (reported failed, sensor unchanged)
    drop_rate: float = 0.0            # share of commands silently ignored (no answer at all)
    battery: int = 95


@dataclass
class Credentials:
    device_id: str
    mqtt_password: str
    command_key: str

    @classmethod
    def from_registration(cls, body: dict) -> "Credentials":
        return cls(body["id"], body["mqtt_password"], body["command_key"])


@dataclass
class SimulatedLock:
    creds: Credentials
    behaviour: Behaviour = field(default_factory=Behaviour)
    rng: random.Random = field(default_factory=random.Random)
    keepalive: int = 30

    def __post_init__(self) -> None:
        self.device_id = self.creds.device_id
        self.controller = LockController(self.device_id, binascii.unhexlify(self.creds.command_key),
                                         clock_offset_ms=0)
        self.controller.locked = True
        self.controller.battery = self.behaviour.battery
        self.actuations: list[tuple[str, str]] = []   # (command id, actuation), for tests and stats
        self.answers: list[dict] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.client = self._new_client()

    def _new_client(self) -> MqttClient:
        return MqttClient(self.device_id, username=self.device_id, password=self.creds.mqtt_password,
                          clean_session=False, keepalive=self.keepalive, handler=self._on_message,
                          will=Will(topics.presence_topic(self.device_id), messages.OFFLINE))

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Connect (over TLS when `tls` is given: an mqtts:// broker), subscribe to its commands, say hello."""
        if self.client.is_connected:
            return
        self.client = self._new_client()
        await self.client.connect(host, port, tls=tls if tls is not None else False)
        granted = await self.client.subscribe([(topics.cmd_topic(self.device_id), 1)])
        if granted[0] == 0x80:
            raise RuntimeError(f"broker refused {self.device_id}'s command subscription")
        self._run(self.controller.on_connected(local_ms()))

    async def stop(self, abrupt: bool = False) -> None:
        """Go offline: gracefully (announce 'offline', DISCONNECT) or abruptly (cut the socket)."""
        if abrupt:
            drop_connection(self.client)
            return
        self.client.publish(topics.presence_topic(self.device_id), messages.OFFLINE, qos=1, retain=True)
        await self.client.disconnect()
        for t in list(self._tasks):
            t.cancel()

    async def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.behaviour.drop_rate and self.rng.random() < self.behaviour.drop_rate:
            return
        if self.behaviour.ack_delay_s:
            await asyncio.sleep(self.behaviour.ack_delay_s)
        self._run(self.controller.on_message(topic, payload, local_ms(), retained=retain))

    def _run(self, effects: list[tuple]) -> None:
        for eff in effects:
            kind = eff[0]
            if kind == "publish":
                _, topic, payload, qos, retain = eff
                if topic.endswith("/ack"):
                    self.answers.append(messages.decode_ack(payload))
                if self.client.is_connected:
                    self.client.publish(topic, payload, qos=qos, retain=retain)
            elif kind == "actuate":
                _, what, command_id = eff
                self.actuations.append((command_id, what))
                task = asyncio.get_running_loop().create_task(self._actuate(what, command_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == "log":
                log.debug("%s: %s", self.device_id, eff[1])
            # "persist": the simulator keeps its records in memory; "reboot": nothing to restart

    async def _actuate(self, what: str, command_id: str) -> None:
        await asyncio.sleep(self.behaviour.actuation_delay_s)
        locked = bool(self.controller.locked)
        if what != "beep" and self.behaviour.jam_rate and self.rng.random() < self.behaviour.jam_rate:
            self._run(self.controller.on_actuated(command_id, False, locked, local_ms(), messages.REASON_JAMMED))
            return
        if what in ("lock", "unlock"):
            locked = what == "lock"   # the sensor follows the bolt
        self._run(self.controller.on_actuated(command_id, True, locked, local_ms()))

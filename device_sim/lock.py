"""One simulated lock: the firmware's LockController over a real MQTT connection, run the way firmware/app.py runs it.

The controller decides (signature, expiry, duplicates, what to report); this module performs its
effects in order, as firmware/app.py does, and only then lets the broker have its PUBACK:
- "persist": the record is made durable in the lock's state file (device_sim/store.py, the
  firmware's own Store format) before the next effect runs — before the "received" ack and the
  actuation, before the "succeeded" ack. A lock made again with the same `data_dir` loads it,
  so a replayed command is answered from the record and never actuated twice (without a
  `data_dir` the record lives in memory only: a new SimulatedLock forgets, like a wiped board);
- "publish": through the lock's outgoing queue (device_sim/outbox.py, firmware/mqtt.py's rules):
  a QoS 1 answer produced while the link is down is sent after the reconnect;
- "actuate": a motor that takes a while and may jam or hang, and a sensor that follows the bolt;
  each actuation is appended to the process's actuation record (device_sim/actuations.py);
- "reboot": not simulated (the lock keeps running; the answer was already sent).

Like the firmware it commands are handled one at a time per lock, the main loop (`on_sensor`,
`on_tick`: the actuation watchdog, heartbeat state, telemetry; the hourly clock resync and the
"no answer to the clock sync" check) runs every `tick_ms` (device_sim/ticker.py), and after every
reconnect it subscribes again when the broker kept no session, sends its unacknowledged messages
again, and announces itself (presence, state, clock sync). Timings are the firmware's own
config.json keys and defaults (firmware/config.py), overridable per lock with `config`.

Where it differs from a board, on purpose: its clock starts synchronised (offset 0: it shares the
API's host clock), reconnects follow gmqtt's fixed delay rather than the firmware's backoff, and
there is no hardware watchdog. Fault knobs live in Behaviour.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_sim import ticker
from device_sim.actuations import ActuationLog
from device_sim.outbox import Outbox
from device_sim.position import PositionedController, position_of
from device_sim.store import LockState, state_path
from firmware.config import DEFAULTS as FIRMWARE_DEFAULTS
from mqtt_client import MqttClient, MqttError, Will, drop_connection
from protocol import messages, topics

log = logging.getLogger("latch.sim")

Effect = tuple[Any, ...]
Stamped = list[tuple[Effect, int]]   # an effect and, for "persist", the number of its record (else 0)


def local_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Behaviour:
    ack_delay_s: float = 0.0          # before the lock looks at a command
    actuation_delay_s: float = 0.05   # how long the motor runs
    jam_rate: float = 0.0             # share of actuations that jam (reported failed, sensor unchanged)
    drop_rate: float = 0.0            # share of commands silently ignored (no answer at all)
    hang_rate: float = 0.0            # share of actuations whose driver never returns (the watchdog ends them)
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
    data_dir: Path | None = None      # state file and actuation record; None: in memory only
    config: dict[str, Any] = field(default_factory=dict)   # firmware config.json tuning keys

    def __post_init__(self) -> None:
        self.device_id = self.creds.device_id
        cfg = self.cfg = {**FIRMWARE_DEFAULTS, "keepalive_s": self.keepalive, **self.config}
        self.state = LockState(state_path(self.data_dir, self.device_id)) if self.data_dir is not None else None
        record = self.state.load() if self.state is not None else None   # once, like the firmware at boot
        self.controller = PositionedController(   # the firmware's, reporting a position too (device_sim/position.py)
            self.device_id, binascii.unhexlify(self.creds.command_key), record=record, clock_offset_ms=0,
            actuation_timeout_ms=cfg["actuation_timeout_ms"], heartbeat_ms=int(cfg["heartbeat_s"] * 1000),
            telemetry_ms=int(cfg["telemetry_s"] * 1000), max_records=cfg["max_records"],
            pos=position_of(self.device_id))
        self.bolt_locked = True           # where the bolt really is (the firmware's hal.read_locked())
        self.controller.on_sensor(self.bolt_locked, local_ms(), battery=self.behaviour.battery)  # boot reading
        self.record = ActuationLog.for_dir(self.data_dir) if self.data_dir is not None else None
        self.actuations: list[tuple[str, str]] = []   # (command id, actuation), for tests and stats
        self.answers: list[dict] = []
        self.outbox = Outbox()
        self.reconnects = 0
        self._serial = asyncio.Lock()     # one command at a time, as the firmware's MQTT reader
        self._live = False                # announced on the current client: later connects are reconnects
        self._resync_at = 0
        self._answer_by = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.client = self._new_client()

    def _new_client(self) -> MqttClient:
        c = MqttClient(self.device_id, username=self.device_id, password=self.creds.mqtt_password,
                       clean_session=False, keepalive=self.keepalive, handler=self._on_message,
                       will=Will(topics.presence_topic(self.device_id), messages.OFFLINE))
        c.on_connect_callbacks.append(self._on_connect)
        return c

    # ---- the link ------------------------------------------------------------
    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                    fallbacks: Sequence[tuple[str, int]] = ()) -> None:
        """Connect (over TLS when `tls` is given: an mqtts:// broker), subscribe to its commands, say hello.
        `fallbacks`: the broker's other nodes, moved to when this lock's node goes away (mqtt_client)."""
        if self.client.is_connected:
            return
        self._live = False
        self.client = self._new_client()
        self.outbox.attach(self.client)
        await self.client.connect(host, port, tls=tls if tls is not None else False, fallbacks=fallbacks)
        await self._subscribe()
        self._announce()
        self._live = True
        ticker.add(self, self.cfg["tick_ms"])

    async def stop(self, abrupt: bool = False) -> None:
        """Go offline: gracefully (announce 'offline', DISCONNECT) or abruptly (cut the socket, as a
        lock losing power would: the will fires). Either way its main loop stops."""
        self._live = False
        ticker.remove(self)
        if abrupt:
            drop_connection(self.client)
            return
        with contextlib.suppress(MqttError):   # not connected: the will says it
            self.client.publish(topics.presence_topic(self.device_id), messages.OFFLINE, qos=1, retain=True)
        await self.client.disconnect()
        for t in list(self._tasks):
            t.cancel()

    async def _subscribe(self) -> None:
        granted = await self.client.subscribe([(topics.cmd_topic(self.device_id), 1)])
        if granted[0] == 0x80:
            raise RuntimeError(f"broker refused {self.device_id}'s command subscription")

    def _announce(self) -> None:
        """Connected and subscribed: the unacknowledged messages again, then presence, state, clock sync."""
        self.outbox.resend()
        now = local_ms()
        self._perform_all(self.controller.on_connected(now))
        self._resync_at = now + self.cfg["resync_s"] * 1000
        self._answer_by = now + max(5000, 2000 * self.cfg["keepalive_s"])

    def _on_connect(self, session_present: bool) -> None:
        if self._live:   # gmqtt reconnected by itself
            self._spawn(self._reconnected(session_present))

    async def _reconnected(self, session_present: bool) -> None:
        self.reconnects += 1
        if not session_present:   # the broker forgot our subscription
            try:
                await self._subscribe()
            except Exception as e:
                log.warning("%s: subscribing again failed (%r): dropping the link to start over", self.device_id, e)
                self._bounce()
                return
        self._announce()

    def _bounce(self) -> None:
        """Drop the link so that gmqtt connects again (the firmware's c.close(): no DISCONNECT, the will fires)."""
        conn = self.client._client._connection
        if conn is not None and conn._transport is not None:
            conn._transport.abort()

    # ---- events --------------------------------------------------------------
    async def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.behaviour.drop_rate and self.rng.random() < self.behaviour.drop_rate:
            return
        if self.behaviour.ack_delay_s:
            await asyncio.sleep(self.behaviour.ack_delay_s)
        async with self._serial:
            await self._run(self._stamp(self.controller.on_message(topic, payload, local_ms(), retained=retain)))

    def tick(self, now: int) -> None:
        """The firmware's main loop body (firmware/app.py Firmware.loop), minus the hardware watchdog."""
        c, cfg = self.controller, self.cfg
        eff = c.on_sensor(self.bolt_locked, now, self.behaviour.battery)
        eff.extend(c.on_tick(now))
        # (is_connected asked only when something is due: it is most of a tick's cost otherwise)
        if now >= self._resync_at and self.client.is_connected:
            self._resync_at = now + cfg["resync_s"] * 1000
            self._answer_by = now + max(5000, 2000 * cfg["keepalive_s"])
            eff.extend(c.request_sync(now))
        if c.sync_nonce is None:
            self._answer_by = 0
        elif self._answer_by and now > self._answer_by and self.client.is_connected:
            # the broker takes our messages but nothing comes back: the route is broken; start over
            self._answer_by = 0
            self._bounce()
        if not eff:
            return
        if any(e[0] == "persist" for e in eff):
            self._spawn(self._run(self._stamp(eff)))
        else:
            self._perform_all(eff)

    # ---- effects ---------------------------------------------------------------
    def _stamp(self, effects: list[Effect]) -> Stamped:
        """Number the records in `effects` now, in the order the controller made them."""
        return [(e, self.state.offer(e[1]) if e[0] == "persist" and self.state is not None else 0)
                for e in effects]

    async def _run(self, effects: Stamped) -> None:
        """Run the controller's effects in order; a persist is durable before the effects after it."""
        for eff, number in effects:
            if eff[0] == "persist":
                if self.state is not None:
                    await self.state.durable(number)
            else:
                self._perform(eff)

    def _perform_all(self, effects: list[Effect]) -> None:
        for eff in effects:
            self._perform(eff)

    def _perform(self, eff: Effect) -> None:
        kind = eff[0]
        if kind == "publish":
            _, topic, payload, qos, retain = eff
            if topic.endswith("/ack"):
                self.answers.append(messages.decode_ack(payload))
            self.outbox.publish(topic, payload, qos, retain)
        elif kind == "actuate":
            _, what, command_id = eff
            self.actuations.append((command_id, what))
            self._spawn(self._actuate(what, command_id, self._expires_at(command_id)))
        elif kind == "log":
            log.debug("%s: %s", self.device_id, eff[1])
        elif kind == "persist":   # only without a data dir: the controller's memory is the record
            pass
        # "reboot": not simulated (see the module docstring)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expires_at(self, command_id: str) -> int | None:
        for r in self.controller.records:
            if r[0] == command_id:
                return r[1]
        return None

    async def _actuate(self, what: str, command_id: str, expires_at: int | None) -> None:
        if self.record is not None:   # before the motor moves: a kill -9 from here on still shows it
            at = local_ms()
            await self.record.append({"event": "actuate", "device": self.device_id, "command_id": command_id,
                                      "action": what, "at_ms": at, "expires_at": expires_at,
                                      "before_expiry": expires_at is not None and at <= expires_at})
        b = self.behaviour
        if b.hang_rate and self.rng.random() < b.hang_rate:
            return   # a wedged driver: only the controller's actuation timeout (on_tick) settles it
        await asyncio.sleep(b.actuation_delay_s)
        ok, reason, locked = True, None, self.bolt_locked
        if what != "beep" and b.jam_rate and self.rng.random() < b.jam_rate:
            ok, reason = False, messages.REASON_JAMMED
        elif what in ("lock", "unlock"):
            locked = what == "lock"
        if self.record is not None:
            await self.record.append({"event": "result", "device": self.device_id, "command_id": command_id,
                                      "action": what, "at_ms": local_ms(), "ok": ok, "reason": reason,
                                      "locked": locked})
        # the bolt arrives and the driver reports in one step (no await between), as firmware/hal_unix.py:
        # the main loop never sees the sensor move before the controller hears of the actuation
        self.bolt_locked = locked
        await self._run(self._stamp(self.controller.on_actuated(command_id, ok, self.bolt_locked, local_ms(),
                                                                 reason)))

"""The firmware: glues the LockController to the HAL, the state store and MQTT.

Three tasks:
- the link task (`connect`) joins WiFi, connects with backoff and jitter
  (to the next of the broker's nodes after each failure, when there are several),
  subscribes again when the broker kept no session (CONNACK
  session-present=0), resends unacknowledged messages, announces the device
  (presence "online", state, clock sync) and keeps the link alive until it
  dies; a server that never answers the clock sync also counts as a dead link;
- the main loop samples the sensor, ticks the controller (heartbeat,
  telemetry, actuation timeout) and feeds the watchdog, only while healthy;
- one task per actuation drives the lock and reports what the sensor says.

Incoming commands are handled inside the MQTT reader: the controller's
effects run in order (persist before anything else) and only then is the
message acknowledged to the broker.

(Names reuse strings the interpreter already interned: see firmware/mqtt.py.)
"""

import asyncio
import gc
import sys
from random import getrandbits
from time import ticks_diff, ticks_ms

from firmware import link
from firmware.controller import LockController
from firmware.mqtt import RefusedError
from firmware.store import Store
from protocol import signing

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

# indexes into Firmware.times (milliseconds since boot)
_ONLINE = const(0)   # last seen connected
_NET = const(1)      # the link task must have moved on by then, or it is stuck
_RESYNC = const(2)   # next clock resynchronisation
_SAMPLE = const(3)   # next battery/signal reading
_ANSWER = const(4)   # the server must have answered the clock sync by then (0: nothing asked)
_REBOOT = const(5)   # nonzero: a reboot is under way, the watchdog is no longer fed


class Firmware:
    def __init__(self, cfg, hal, log=None):
        self.cfg = cfg
        self.hal = hal
        self.log = log or self.write  # log(*parts): one line, the parts printed as print() does
        self.ticks = [ticks_ms(), 1]  # the last ticks_ms() seen, milliseconds since boot
        if hasattr(hal, "unique_id"):
            self.log("board %s, device %s" % (hal.unique_id(), cfg["device_id"]))
        self.store = Store(cfg["state_path"])
        record = self.store.load()
        self.log("state: %s, %d executed ids" % (self.store.recovered, len(record["executed"]) if record else 0))
        self.ctrl = LockController(cfg["device_id"], signing.decode_key(cfg["command_key"]), record=record,
                                   actuation_timeout_ms=cfg["actuation_timeout_ms"],
                                   heartbeat_ms=cfg["heartbeat_s"] * 1000, telemetry_ms=cfg["telemetry_s"] * 1000,
                                   max_records=cfg["max_records"], urandom=hal.urandom)
        self.client = link.make_client(cfg, self.log)
        self.client.handler = self.handler
        # of the broker's settings only its nodes stay, (host, port, TLS name) each (firmware/config.py), in
        # the slot the settings had (no new attribute: on the 64 KiB heap that one cost ~190 bytes)
        cfg["broker"] = cfg["broker"]["hosts"]
        for k in ("command_key", "sim"):
            cfg.pop(k, None)  # read at boot only (the HAL and the client keep what they need): a TLS CA is KBs
        self.ctrl.on_sensor(hal.read_locked(), self.time(), battery=hal.battery())
        now = self.time()
        self.times = [now, now + 60000, 0, 0, 0, 0]

    def write(self, *msg):
        # the parts printed one by one, not joined first: a log line costs the heap no copy of itself
        print("LATCH", self.time(), *msg)

    def time(self):
        """Milliseconds since boot, monotonic, never wrapping (ticks_ms wraps)."""
        t = ticks_ms()
        c = self.ticks
        c[1] += ticks_diff(t, c[0])
        c[0] = t
        return c[1]

    async def run(self, effects):
        """Run the controller's effects in order; a failed persist stops the rest."""
        for e in effects:
            k = e[0]
            if k == "publish":
                if e[1].endswith("/ack"):
                    self.log("ack", e[2].decode())
                await self.client.publish(e[1], e[2], e[3], e[4])
            elif k == "persist":
                self.store.save(e[1])
            elif k == "actuate":
                self.log("actuate", e[1], e[2])
                asyncio.create_task(self.actuate(e[1], e[2]))
            elif k == "reboot":
                asyncio.create_task(self.reboot())
            elif k == "log":
                self.log(e[1])

    async def handler(self, topic, payload, retained):
        """A message from the broker: to the controller, then its effects."""
        # the RETAIN flag gives a command no special standing: it is checked like any other
        c = self.ctrl
        n = c.syncs
        effects = c.on_message(topic, payload, self.time(), retained)
        if c.syncs != n:
            self.log("clock synchronised offset=%d" % c.clock_offset_ms)
        await self.run(effects)
        del effects
        gc.collect()  # between messages: the heap stays tidy (it may be small)

    async def actuate(self, action, command_id):
        try:
            ok, locked, reason = await self.hal.actuate(action)
        except Exception as e:
            ok, locked, reason = False, self.hal.read_locked(), "driver error: %r" % (e,)
        await self.run(self.ctrl.on_actuated(command_id, ok, locked, self.time(), reason))
        gc.collect()  # a quiet moment: tidy the heap, and say how much of it is left
        self.log("actuated %s %s ok=%s locked=%s free=%d" % (action, command_id, ok, locked, gc.mem_free()))

    async def reboot(self):
        self.times[_REBOOT] = 1
        t = self.time() + 3000
        while self.client.pending and self.time() < t:
            await asyncio.sleep_ms(50)  # let the acks reach the broker
        await self.client.stop()
        self.log("rebooting")
        self.hal.reset()

    async def connect(self):
        """The link task: (re)connect forever, with backoff and jitter, to the broker's nodes in turn."""
        cfg, c, times = self.cfg, self.client, self.times
        hosts = cfg["broker"]
        backoff = cfg["backoff_min_ms"]
        i = 0  # the node tried now (one, unless config.json lists a clustered broker's nodes)
        while True:
            times[_NET] = self.time() + 2 * cfg["connect_timeout_ms"] + 30000
            c.host, c.port, c.server_hostname = hosts[i]
            try:
                if not await link.up(cfg, self.log):
                    raise OSError("wifi not joined")
                self.log("connecting to %s:%d" % (c.host, c.port))
                # CONNECT, SUBSCRIBE when the broker kept no session, resend what is unacknowledged
                session = await c.connect()
                self.log("connected session_present=%d%s" % (session, "" if session else ", subscribed"))
                await self.run(self.ctrl.on_connected(self.time()))
                now = self.time()
                times[_RESYNC] = now + cfg["resync_s"] * 1000
                times[_ANSWER] = now + max(5000, 2000 * cfg["keepalive_s"])
                backoff = cfg["backoff_min_ms"]
                await c.loop()
            except RefusedError as e:
                self.log("link: %s" % e)
                backoff = max(backoff, 10000)  # bad credentials do not fix themselves quickly
                # and the same node again: a cluster's nodes share their accounts, so a login one node
                # refuses the others refuse too; moving on would only hide the cause and cost nothing less
                # than this backoff (a node that is merely unavailable, code 3, is not a refusal: mqtt.py)
            except Exception as e:
                self.log("link down: %r" % (e,))
                # a node that did not answer, or a link that dropped: the next node (in a cluster it has our
                # session). Also after a drop: a node that went away would otherwise cost one more attempt,
                # up to connect_timeout_ms when its address swallows SYNs, before the move
                i = (i + 1) % len(hosts)
            c.close()
            delay = backoff + getrandbits(16) % (backoff // 2 + 1)
            backoff = min(backoff * 2, cfg["backoff_max_ms"])
            times[_NET] = self.time() + delay + 5000
            self.log("reconnect in %d ms" % delay)
            await asyncio.sleep_ms(delay)

    async def loop(self):
        """The main loop: sensor, controller ticks, clock, watchdog."""
        hal, ctrl, c, cfg, times = self.hal, self.ctrl, self.client, self.cfg, self.times
        while True:
            now = self.time()
            hal.poll(now)
            battery = rssi = None
            if now >= times[_SAMPLE]:
                times[_SAMPLE] = now + min(10000, cfg["telemetry_s"] * 1000)
                battery = hal.battery()
                rssi = link.rssi() or hal.rssi()
            # run() only when there is something to run: each coroutine is a heap allocation, 20 ticks a second
            e = ctrl.on_sensor(hal.read_locked(), now, battery, rssi)
            if e:
                await self.run(e)
            e = ctrl.on_tick(now)
            if e:
                await self.run(e)
            del e
            if c.connected and now >= times[_RESYNC]:
                times[_RESYNC] = now + cfg["resync_s"] * 1000
                times[_ANSWER] = now + max(5000, 2000 * cfg["keepalive_s"])
                await self.run(ctrl.request_sync(now))
            if ctrl.sync_nonce is None:
                times[_ANSWER] = 0
            elif c.connected and times[_ANSWER] and now > times[_ANSWER]:
                # the broker takes our messages but nothing comes back: the route is broken
                # (a broker that took over our old session can be left like that); start over
                times[_ANSWER] = 0
                c.close(OSError("no answer to the clock sync"))
            # the watchdog is fed only while the link task makes progress and is not offline too long
            if c.connected:
                times[_ONLINE] = now
            if not times[_REBOOT] and (c.connected or (
                    now < times[_NET] and now - times[_ONLINE] < cfg["offline_reset_s"] * 1000)):
                hal.wdt_feed()
            await asyncio.sleep_ms(cfg["tick_ms"])

    async def start(self):
        gc.collect()
        gc.threshold(gc.mem_free() // 4 + gc.mem_alloc())  # collect early and often: a small heap
        if self.cfg["wdt_ms"]:
            self.hal.wdt_start(self.cfg["wdt_ms"])
        asyncio.create_task(self.connect())
        await self.loop()


def make_hal(cfg):
    if (cfg.get("hal") or ("esp32" if sys.platform == "esp32" else "unix")) == "esp32":
        from firmware.hal_esp32 import Esp32Hal
        return Esp32Hal(cfg)
    from firmware.hal_unix import UnixHal
    return UnixHal(cfg)

"""The HAL for the MicroPython Unix port: a simulated lock, for tests and CI.

The simulated bolt takes `actuation_ms` to move once the motor runs; the
sensor follows the bolt, not the command. Knobs come from a JSON control
file (config "sim": {"control": path}), re-read while the firmware runs:

    {"jam": true}            the motor runs, the bolt does not move
    {"hang": true}           the driver never returns (the controller's timeout fires)
    {"actuation_ms": 800}    how long the bolt takes
    {"battery": 55, "rssi": -70}
    {"manual": "lock"}       somebody closes (or opens) the lock by hand

Config "sim" (read once, at boot) may also hold "urandom": "<hex>": a broken RNG that returns
those bytes over and over (the same sync nonce every boot), for tests of what holds without it.

Every motor run prints a "SIM motor <direction>" line, so a test can count
actuations. The watchdog is a thread that kills the process (a reset) when
the main loop stops feeding it. (Names reuse interned strings: see mqtt.py.)
"""

import asyncio
import json
import sys
from time import sleep_ms, ticks_diff, ticks_ms


class UnixHal:
    def __init__(self, cfg):
        sim = cfg.get("sim") or {}
        self.path = sim.get("control")            # the knobs file
        self.locked = sim.get("locked", True)     # the bolt's real position
        self.actuation_ms = sim.get("actuation_ms", 300)
        self.driver_timeout_ms = cfg.get("driver_timeout_ms", 3000)
        self.knobs = {}
        self.count = 0                            # motor runs
        self.ticks = [0, 0]                       # knobs last read, watchdog last fed
        self.timeout = 0                          # watchdog period, ms
        self.rng = sim.get("urandom")             # hex: a broken RNG (tests); None: the OS's

    def load(self):
        """Read the knobs file (a missing or half-written one leaves the knobs as they were)."""
        try:
            with open(self.path) as f:
                k = json.load(f)
        except Exception:
            return
        m = k.get("manual")
        if m and m != self.knobs.get("manual"):
            self.locked = m == "lock"
            print("SIM manual " + m)
        self.knobs = k

    def poll(self, now):
        """From the main loop: sample the inputs (here: the knobs, every 200 ms)."""
        if self.path and ticks_diff(ticks_ms(), self.ticks[0]) >= 200:
            self.ticks[0] = ticks_ms()
            self.load()

    def read_locked(self):
        return self.locked

    def battery(self):
        return self.knobs.get("battery", 87)

    def rssi(self):
        return self.knobs.get("rssi", -61)

    async def actuate(self, action):
        """Drive the lock; returns (ok, locked as the sensor reads it, reason or None)."""
        if self.path:
            self.load()
        k = self.knobs
        self.count += 1
        print("SIM motor %s run=%d" % (action, self.count))
        if action == "beep":
            await asyncio.sleep_ms(50)
            return True, self.locked, None
        while k.get("hang"):  # a wedged driver: only the controller's timeout ends this
            await asyncio.sleep_ms(1000)
        target = action == "lock"
        t0 = ticks_ms()
        while True:
            dt = ticks_diff(ticks_ms(), t0)
            if not k.get("jam") and dt >= k.get("actuation_ms", self.actuation_ms):
                self.locked = target  # the bolt arrived; the sensor sees it
            if self.locked == target:
                print("SIM motor stop: %s" % ("locked" if target else "unlocked"))
                return True, self.locked, None
            if dt >= self.driver_timeout_ms:
                print("SIM motor stop: jammed")
                return False, self.locked, "jammed"
            await asyncio.sleep_ms(20)

    def urandom(self, n):
        """n random bytes (the sync nonce): the OS's RNG, or the broken one a test asked for."""
        if self.rng:
            from binascii import unhexlify
            b = unhexlify(self.rng)
            return (b * (n // len(b) + 1))[:n]
        from os import urandom
        return urandom(n)

    def wdt_start(self, timeout):
        import _thread
        self.timeout = timeout
        self.ticks[1] = ticks_ms()
        _thread.start_new_thread(self.run, ())

    def wdt_feed(self):
        self.ticks[1] = ticks_ms()

    def run(self):
        """The watchdog thread."""
        while ticks_diff(ticks_ms(), self.ticks[1]) <= self.timeout:
            sleep_ms(100)
        print("SIM watchdog reset")
        self.reset(True)

    def reset(self, hard=False):
        print("SIM reset")
        if hard:  # like the chip's reset line: nothing else runs
            import os
            with open("/proc/self/stat") as f:
                os.system("kill -9 %s" % f.read().split(" ")[0])
        sys.exit(3)

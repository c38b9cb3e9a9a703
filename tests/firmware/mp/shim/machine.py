"""A `machine` for the MicroPython Unix port that simulates an ESP32 DevKit wired to a lock.

On MICROPYPATH it shadows the built-in module (still reachable as `umachine`).
WORLD is the simulated hardware: an H-bridge motor or a servo moves a bolt in
`travel_ms`; a reed switch on the sensor pin reads 0 (closed) while the bolt
is in, and bounces for `bounce_ms` when it arrives; `jam` stops the bolt.
"""
from time import ticks_diff, ticks_ms

from umachine import *  # noqa: F401,F403  (what the Unix port has: idle, mem8, ...)


class World:
    def __init__(self):
        self.reset_world()

    def reset_world(self):
        self.pins = {}          # number -> level driven by an output
        self.pwm = {}           # number -> PWM
        self.bolt_locked = True
        self.moving_to = None   # True (lock) / False (unlock) / None
        self.move_started = 0
        self.arrived_at = None
        self.travel_ms = 40
        self.bounce_ms = 15
        self.jam = False
        self.sensor_pin = 33
        self.motor = (25, 26)
        self.servo_pin = 27
        self.battery_uv = 1900000
        self.wdt = None
        self.resets = 0
        self.log = []

    def _drive(self):
        """Which way the actuator currently pushes: True lock, False unlock, None idle."""
        a = self.pwm.get(self.motor[0])
        b = self.pwm.get(self.motor[1])
        if a is not None and b is not None:
            da, db = a.d, b.d
            if da and not db:
                return False
            if db and not da:
                return True
            return None
        s = self.pwm.get(self.servo_pin)
        if s is not None and s.ns:
            return s.ns <= 1500000  # 1.0 ms locked, 2.0 ms unlocked
        return None

    def step(self):
        goal = self._drive()
        now = ticks_ms()
        if goal != self.moving_to:
            self.moving_to = goal
            self.move_started = now
        if goal is not None and goal != self.bolt_locked and not self.jam:
            if ticks_diff(now, self.move_started) >= self.travel_ms:
                self.bolt_locked = goal
                self.arrived_at = now

    def sensor_level(self):
        self.step()
        level = 0 if self.bolt_locked else 1
        if self.arrived_at is not None and ticks_diff(ticks_ms(), self.arrived_at) < self.bounce_ms:
            if (ticks_ms() // 2) % 2:  # contact bounce
                level ^= 1
        return level


WORLD = World()


class Pin:
    IN = 1
    OUT = 3
    PULL_UP = 2
    PULL_DOWN = 1

    def __init__(self, n, mode=None, pull=None, value=None):
        self.n = n
        if value is not None:
            WORLD.pins[n] = value

    def value(self, v=None):
        if v is None:
            if self.n == WORLD.sensor_pin:
                return WORLD.sensor_level()
            return WORLD.pins.get(self.n, 0)
        WORLD.pins[self.n] = v
        WORLD.log.append(("pin", self.n, v))

    def __call__(self, v=None):
        return self.value(v)


class PWM:
    def __init__(self, pin, freq=0, duty_u16=None, duty_ns=None):
        self.n = pin.n
        self.freq = freq
        self.d = duty_u16 or 0
        self.ns = duty_ns or 0
        WORLD.pwm[self.n] = self
        WORLD.log.append(("pwm", self.n, freq))

    def duty_u16(self, d=None):
        if d is None:
            return self.d
        self.d = d
        self.ns = 0
        WORLD.step()

    def duty_ns(self, ns=None):
        if ns is None:
            return self.ns
        self.ns = ns
        WORLD.step()

    def deinit(self):
        self.d = self.ns = 0
        WORLD.log.append(("pwm-off", self.n))


class ADC:
    ATTN_11DB = 3

    def __init__(self, pin):
        self.n = pin.n

    def atten(self, a):
        pass

    def read_uv(self):
        return WORLD.battery_uv


class WDT:
    def __init__(self, id=0, timeout=5000):
        WORLD.wdt = self
        self.timeout = timeout
        self.fed = 0

    def feed(self):
        self.fed += 1


def unique_id():
    return b"\x24\x0a\xc4\x12\x34\x56"


def reset():
    WORLD.resets += 1
    raise SystemExit("machine.reset")

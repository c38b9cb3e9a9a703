"""The HAL for an ESP32 DevKit wired to a lock (see docs/firmware.md for the wiring).

Config "pins" (defaults in PINS):
    driver            "motor" (H-bridge: DRV8833/TB6612/L9110, two inputs) or "servo"
    motor_a, motor_b  H-bridge inputs; a -> unlock direction, b -> lock direction
    motor_duty        PWM duty (0-65535) while the motor runs
    servo             servo signal pin; servo_locked_us / servo_unlocked_us pulse widths
    sensor            reed switch or hall sensor input (internal pull-up)
    sensor_locked     the level the sensor reads when the bolt is in (locked): 0 or 1
    debounce_ms       a sensor change counts once it held this long
    buzzer, led       for "locate" (buzzer through a transistor; led: DevKit's blue LED is 2)
    battery_adc       ADC1 pin behind a divider; battery_divider = Vbat / Vpin
    battery_empty_mv, battery_full_mv   the battery's voltage range for 0-100 %
A pin set to null is not used.

The state reported is always the debounced sensor, never what was commanded.
"""

import asyncio
from time import ticks_diff, ticks_ms

import machine

PINS = {
    "driver": "motor", "motor_a": 25, "motor_b": 26, "motor_duty": 65535,
    "servo": 27, "servo_locked_us": 1000, "servo_unlocked_us": 2000,
    "sensor": 33, "sensor_locked": 0, "debounce_ms": 30,
    "buzzer": 32, "led": 2,
    "battery_adc": 34, "battery_divider": 2, "battery_empty_mv": 3300, "battery_full_mv": 4200,
}


class Esp32Hal:

    def __init__(self, cfg):
        p = dict(PINS)
        p.update(cfg.get("pins") or {})
        self.p = p
        self.driver_timeout_ms = cfg.get("driver_timeout_ms", 3000)
        Pin = machine.Pin
        self._sensor = Pin(p["sensor"], Pin.IN, Pin.PULL_UP)
        self._raw = self._sensor.value()
        self._raw_since = ticks_ms()
        self.locked = self._raw == p["sensor_locked"]
        self._a = self._b = self._servo = None
        if p["driver"] == "servo":
            self._servo = machine.PWM(Pin(p["servo"]), freq=50, duty_u16=0)
        else:
            self._a = machine.PWM(Pin(p["motor_a"]), freq=20000, duty_u16=0)
            self._b = machine.PWM(Pin(p["motor_b"]), freq=20000, duty_u16=0)
        self._led = Pin(p["led"], Pin.OUT, value=0) if p.get("led") is not None else None
        self._buzzer = p.get("buzzer")
        self._adc = None
        if p.get("battery_adc") is not None:
            self._adc = machine.ADC(Pin(p["battery_adc"]))
            try:
                self._adc.atten(machine.ADC.ATTN_11DB)  # full range, about 0-3.1 V
            except Exception:
                pass
        self._wdt = None

    # ---- sensor ------------------------------------------------------------
    def poll(self, now=None):
        """Sample the sensor; the debounced state changes once a new level held debounce_ms."""
        v = self._sensor.value()
        t = ticks_ms()
        if v != self._raw:
            self._raw = v
            self._raw_since = t
        elif ticks_diff(t, self._raw_since) >= self.p["debounce_ms"]:
            self.locked = v == self.p["sensor_locked"]

    def read_locked(self):
        return self.locked

    def battery(self):
        if self._adc is None:
            return None
        try:
            mv = self._adc.read_uv() // 1000 * self.p["battery_divider"]
        except Exception:
            return None
        lo, hi = self.p["battery_empty_mv"], self.p["battery_full_mv"]
        return max(0, min(100, (mv - lo) * 100 // (hi - lo)))

    def rssi(self):
        return None  # firmware.link reads it from the WiFi station

    def urandom(self, n):
        """n random bytes from the ESP32's hardware RNG (esp_random(): true random while the radio
        is on, as it is whenever the lock asks for the time; os.urandom reads it on this port)."""
        from os import urandom
        return urandom(n)

    def unique_id(self):
        from binascii import hexlify
        return hexlify(machine.unique_id()).decode()

    # ---- lock --------------------------------------------------------------
    def _drive(self, action):
        """Start moving toward `action` ("unlock"/"lock"), or stop (None)."""
        if self._servo is not None:
            if action:
                us = self.p["servo_locked_us" if action == "lock" else "servo_unlocked_us"]
                self._servo.duty_ns(us * 1000)
            else:
                self._servo.duty_u16(0)  # no pulses: the servo holds no torque, draws no current
            return
        d = self.p["motor_duty"]
        self._a.duty_u16(d if action == "unlock" else 0)
        self._b.duty_u16(d if action == "lock" else 0)

    async def actuate(self, action):
        """Drive the lock until the sensor shows the goal or the driver timeout; returns
        (ok, locked_from_sensor, reason or None). The motor is always stopped on the way out."""
        if action == "beep":
            await self.beep()
            return True, self.locked, None
        target = action == "lock"
        t0 = ticks_ms()
        self._drive(action)
        try:
            while True:
                self.poll()
                if self.locked == target:
                    return True, self.locked, None
                if ticks_diff(ticks_ms(), t0) >= self.driver_timeout_ms:
                    return False, self.locked, "jammed"
                await asyncio.sleep_ms(5)
        finally:
            self._drive(None)

    async def beep(self, times=3):
        for _ in range(times):
            if self._buzzer is not None:
                bz = machine.PWM(machine.Pin(self._buzzer), freq=2700, duty_u16=32768)
            if self._led:
                self._led.value(1)
            await asyncio.sleep_ms(200)
            if self._buzzer is not None:
                bz.deinit()
            if self._led:
                self._led.value(0)
            await asyncio.sleep_ms(150)

    # ---- system ------------------------------------------------------------
    def wdt_start(self, timeout_ms):
        self._wdt = machine.WDT(timeout=timeout_ms)  # cannot be stopped once started

    def wdt_feed(self):
        if self._wdt:
            self._wdt.feed()

    def reset(self, hard=False):
        machine.reset()

"""firmware.hal_esp32 driven under the Unix port against the simulated board in shim/machine.py."""
import asyncio
from time import ticks_diff, ticks_ms

from machine import WORLD

from firmware.hal_esp32 import Esp32Hal


def fresh(**pins):
    WORLD.reset_world()
    return Esp32Hal({"driver_timeout_ms": 400, "pins": pins})


def settle(hal, ms=60):
    t0 = ticks_ms()
    while ticks_diff(ticks_ms(), t0) < ms:
        hal.poll()


def case_motor_unlock_and_lock():
    hal = fresh()
    assert hal.read_locked() is True
    ok, locked, reason = asyncio.run(hal.actuate("unlock"))
    assert (ok, locked, reason) == (True, False, None), (ok, locked, reason)
    assert WORLD.pwm[25].d == 0 and WORLD.pwm[26].d == 0  # motor stopped
    ok, locked, reason = asyncio.run(hal.actuate("lock"))
    assert (ok, locked, reason) == (True, True, None)
    assert WORLD.bolt_locked is True


def case_motor_jammed_reports_sensor():
    hal = fresh()
    WORLD.jam = True
    ok, locked, reason = asyncio.run(hal.actuate("unlock"))
    assert (ok, locked, reason) == (False, True, "jammed"), (ok, locked, reason)
    assert WORLD.pwm[25].d == 0 and WORLD.pwm[26].d == 0  # stopped even when jammed


def case_servo():
    hal = fresh(driver="servo")
    ok, locked, reason = asyncio.run(hal.actuate("unlock"))
    assert (ok, locked) == (True, False), (ok, locked, reason)
    assert WORLD.pwm[27].ns == 0 and WORLD.pwm[27].d == 0  # pulses off after the move
    ok, locked, reason = asyncio.run(hal.actuate("lock"))
    assert (ok, locked) == (True, True)


def case_debounce():
    hal = fresh(debounce_ms=30)
    # the bolt is pulled out by hand: the reed bounces, then settles open
    WORLD.bolt_locked = False
    WORLD.arrived_at = ticks_ms()
    WORLD.bounce_ms = 20
    hal.poll()
    assert hal.read_locked() is True  # not yet: a change must hold debounce_ms
    settle(hal, 80)
    assert hal.read_locked() is False
    # a single glitch shorter than the debounce time changes nothing
    WORLD.bolt_locked = True
    hal.poll()
    WORLD.bolt_locked = False
    settle(hal, 50)
    assert hal.read_locked() is False


def case_battery_and_ids():
    hal = fresh()
    WORLD.battery_uv = 1900000  # 1.9 V at the pin, 3.8 V at the battery
    assert hal.battery() == 55, hal.battery()
    WORLD.battery_uv = 2500000
    assert hal.battery() == 100
    WORLD.battery_uv = 1000000
    assert hal.battery() == 0
    assert hal.unique_id() == "240ac4123456"


def case_locate_and_watchdog():
    hal = fresh()
    ok, locked, reason = asyncio.run(hal.actuate("beep"))
    assert ok and locked is True
    assert ("pwm-off", 32) in WORLD.log and ("pin", 2, 1) in WORLD.log
    hal.wdt_start(5000)
    assert WORLD.wdt.timeout == 5000
    hal.wdt_feed()
    hal.wdt_feed()
    assert WORLD.wdt.fed == 2


def case_wifi_join():
    import network

    from firmware import link
    assert link.wifi is not None  # `network` exists here, as on the board
    lines = []
    network.WORLD.wifi_password = "right"
    assert asyncio.run(link.up({"wifi": {"ssid": "Shop", "password": "wrong"}}, lines.append, 400)) is False
    assert asyncio.run(link.up({"wifi": {"ssid": "Shop", "password": "right"}}, lines.append, 2000)) is True
    assert link.rssi() == -58
    assert lines[0] == "wifi: joining Shop" and lines[-1] == "wifi: up 192.168.4.23", lines
    joins = network.WORLD.joins
    assert asyncio.run(link.up({"wifi": {"ssid": "Shop", "password": "right"}}, lines.append)) is True
    assert network.WORLD.joins == joins  # already joined: nothing to do


CASES = [case_motor_unlock_and_lock, case_motor_jammed_reports_sensor, case_servo, case_debounce,
         case_battery_and_ids, case_locate_and_watchdog, case_wifi_join]

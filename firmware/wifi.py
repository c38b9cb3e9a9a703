"""WiFi station for the ESP32 (imported by firmware.link only where `network` exists)."""

import asyncio
from time import ticks_diff, ticks_ms

import network

_wlan = None


async def up(cfg, timeout_ms, log):
    """Join the configured WiFi; True when the station is connected."""
    global _wlan
    if _wlan is None:
        _wlan = network.WLAN(network.STA_IF)
        _wlan.active(True)
        try:
            _wlan.config(pm=network.WLAN.PM_NONE)  # latency over a few mA: commands arrive at once
        except Exception:
            pass
    if _wlan.isconnected():
        return True
    w = cfg.get("wifi") or {}
    log("wifi: joining %s" % w.get("ssid"))
    try:
        _wlan.connect(w.get("ssid"), w.get("password"))
    except OSError as e:
        log("wifi: %r" % (e,))
    t0 = ticks_ms()
    while not _wlan.isconnected():
        if ticks_diff(ticks_ms(), t0) > timeout_ms:
            try:
                _wlan.disconnect()
            except OSError:
                pass
            return False
        await asyncio.sleep_ms(200)
    log("wifi: up " + _wlan.ifconfig()[0])
    return True


def rssi():
    try:
        return _wlan.status("rssi")
    except Exception:
        return None

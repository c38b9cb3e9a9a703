"""A `network` module for the MicroPython Unix port: a WiFi station that joins after a
moment if the password is right (WORLD.wifi_password), for firmware/wifi.py's tests.
(The host's real network carries the traffic.)"""
from time import ticks_diff, ticks_ms

STA_IF = 0


class _World:
    wifi_password = "secret"
    join_ms = 50
    joins = 0


WORLD = _World()


class WLAN:
    PM_NONE = 0

    def __init__(self, iface):
        self._on = False
        self._since = None
        self._ok = False

    def active(self, on=None):
        if on is not None:
            self._on = on
        return self._on

    def config(self, **kw):
        pass

    def connect(self, ssid, password):
        WORLD.joins += 1
        self._since = ticks_ms()
        self._ok = self._on and password == WORLD.wifi_password

    def disconnect(self):
        self._since = None

    def isconnected(self):
        return self._ok and self._since is not None and ticks_diff(ticks_ms(), self._since) >= WORLD.join_ms

    def ifconfig(self):
        return ("192.168.4.23", "255.255.255.0", "192.168.4.1", "192.168.4.1")

    def status(self, what=None):
        return -58 if what == "rssi" else 1010

"""The device's config.json: written by `latch firmware provision`, read at boot.

    {"device_id": "bike-0001", "mqtt_password": "...", "command_key": "<64 hex>",
     "wifi": {"ssid": "...", "password": "..."},
     "broker": {"host": "mqtt.example.org", "port": 8883, "tls": true,
                "ca_der": "<base64 of the CA certificate, DER>", "server_hostname": null},
     ... optional tuning, see DEFAULTS}
"""

import json

DEFAULTS = {
    "keepalive_s": 30,            # MQTT keepalive; the link is declared dead after as long without a byte
    "connect_timeout_ms": 10000,  # TCP + TLS + CONNACK, a SUBACK, and any single write
    "backoff_min_ms": 500,        # reconnect backoff, doubled per failure, with jitter
    "backoff_max_ms": 60000,
    "heartbeat_s": 60,            # state (retained) at least this often
    "telemetry_s": 300,           # battery and signal
    "resync_s": 3600,             # clock resynchronisation while connected
    "actuation_timeout_ms": 5000, # the controller gives up on the driver after this
    "driver_timeout_ms": 3000,    # the driver stops the motor and reports "jammed" after this
    "max_records": 64,            # executed command ids remembered (and persisted)
    "state_path": "state.json",
    "wdt_ms": 30000,              # hardware watchdog; 0 disables it
    "offline_reset_s": 900,       # no broker for this long: stop feeding the watchdog (reset)
    "tick_ms": 100,               # main loop period
    "hal": None,                  # "esp32" or "unix"; None: from sys.platform
}


def loads(text):
    """The config from its JSON text, defaults filled in; ValueError names what is wrong."""
    cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise ValueError("config must be a JSON object")
    for k in ("device_id", "mqtt_password", "command_key", "broker"):
        if k not in cfg:
            raise ValueError("config is missing %r" % k)
    if len(cfg["command_key"]) != 64:
        raise ValueError("command_key must be 64 hex digits")
    b = cfg["broker"]
    if "host" not in b:
        raise ValueError("broker needs a host")
    b.setdefault("tls", False)
    b.setdefault("port", 8883 if b["tls"] else 1883)
    for k in DEFAULTS:
        cfg.setdefault(k, DEFAULTS[k])
    return cfg


def load(path="config.json"):
    with open(path) as f:
        return loads(f.read())

"""The device's config.json: written by `latch firmware provision`, read at boot.

    {"device_id": "bike-0001", "mqtt_password": "...", "command_key": "<64 hex>",
     "wifi": {"ssid": "...", "password": "..."},
     "broker": {"host": "mqtt.example.org", "port": 8883, "tls": true,
                "ca_der": "<base64 of the CA certificate, DER>", "server_hostname": null},
     ... optional tuning, see DEFAULTS}

A clustered broker's nodes: "hosts" instead of "host", 1 to 8 addresses, each ["host", port] or "host"
(then "port", or the default port, applies), all with TLS or none, one CA:

     "broker": {"hosts": [["mqtt-1.example.org", 8883], ["mqtt-2.example.org", 8883]], "tls": true, ...}

loads() leaves broker["hosts"] as (host, port, TLS name) tuples, in order, for either form; the TLS name is
"server_hostname" when given (one name for every node, e.g. the cluster's certificate name), else that
node's own host. The firmware starts on the first and moves to the next when one fails (firmware/app.py).
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
    if not isinstance(b, dict):
        raise ValueError("broker must be a JSON object")
    b.setdefault("tls", False)
    port = b.setdefault("port", 8883 if b["tls"] else 1883)
    hosts = b.get("hosts")
    if hosts is None:
        if "host" not in b:
            raise ValueError("broker needs a host (or hosts: the nodes of a clustered broker)")
        hosts = [[b["host"], port]]
    elif "host" in b:
        raise ValueError("broker: give host or hosts, not both")
    # a short list: each address stays in RAM for the device's life
    if not isinstance(hosts, list) or not 0 < len(hosts) <= 8:
        raise ValueError("broker.hosts must list 1 to 8 addresses, each [\"host\", port]")
    name = b.get("server_hostname")
    out = []
    for h in hosts:
        if isinstance(h, str):
            h = [h, port]
        if (not isinstance(h, list) or len(h) != 2 or not isinstance(h[0], str) or not h[0]
                or not isinstance(h[1], int) or isinstance(h[1], bool) or not 0 < h[1] < 65536):
            raise ValueError("broker address %s must be [\"host\", port] with a port in 1..65535" % json.dumps(h))
        out.append((h[0], h[1], name or h[0]))
    b["hosts"] = out
    for k in DEFAULTS:
        cfg.setdefault(k, DEFAULTS[k])
    return cfg


def load(path="config.json"):
    with open(path) as f:
        return loads(f.read())

"""The network link: WiFi (on the ESP32), then MQTT over TCP or TLS to the broker.

TLS verifies the broker's certificate against the CA provisioned in the
config (DER, base64 in JSON: MicroPython's load_verify_locations(cadata=...)
takes DER, not PEM) and checks the broker's name against the certificate:
`server_hostname` when configured, else the host of the node being tried
(several nodes: see firmware/config.py and Firmware.connect).
"""

from firmware.mqtt import MQTTClient
from protocol import messages, topics

try:
    import network  # noqa: F401  (only to learn whether there is WiFi to join)

    from firmware import wifi
except ImportError:  # the Unix port: the host's network is up
    wifi = None


async def up(cfg, log, timeout_ms=20000):
    return wifi is None or await wifi.up(cfg, timeout_ms, log)


def rssi():
    return wifi and wifi.rssi()


def tls_context(broker):
    import ssl
    from binascii import a2b_base64
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not broker.get("ca_der"):
        raise ValueError("TLS needs the broker's CA (broker.ca_der)")
    ctx.load_verify_locations(cadata=a2b_base64(broker["ca_der"]))
    return ctx


def make_client(cfg, log):
    dev = cfg["device_id"]
    b = cfg["broker"]
    ctx = tls_context(b) if b.get("tls") else None
    h = b["hosts"][0]  # (host, port, TLS name): the first node; the link task moves on from there (firmware/app.py)
    c = MQTTClient(dev, h[0], h[1], dev, cfg["mqtt_password"], cfg["keepalive_s"],
                   (topics.presence_topic(dev), messages.OFFLINE, 1, True),
                   ctx, h[2], cfg["connect_timeout_ms"], log)
    c.topics.append(topics.cmd_topic(dev))
    return c

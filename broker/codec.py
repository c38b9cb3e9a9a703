"""MQTT 3.1.1 wire format for the broker side: a strict decoder and the encoders the broker needs.

Why not amqtt's codecs: they are coroutines that read field by field from a
stream (several awaits per packet), which is the per-packet task and CPU
churn the defect report measured. Here a packet is a complete byte string
cut from the connection's buffer and decoded by plain functions, and every
rule the broker relies on is checked before the packet is acted on:

* fixed-header flags (reserved bits of PUBREL/SUBSCRIBE/UNSUBSCRIBE = 0b0010,
  0 for the others; PUBLISH QoS 3 is malformed) [MQTT-2.2.2-1/2, 3.3.1-4];
* remaining length at most 4 bytes and at most the configured packet limit;
* UTF-8 strings well formed and without U+0000 [MQTT-1.5.3-1/2];
* topic names without wildcards [MQTT-3.3.2-2], filters well formed [MQTT-4.7.1];
* packet ids non-zero [MQTT-2.3.1-1]; SUBSCRIBE/UNSUBSCRIBE not empty
  [MQTT-3.8.3-3, 3.10.3-2]; SUBSCRIBE QoS byte 0..2 [MQTT-3-8.3-4];
* nothing left over after the last field.

Any violation raises ProtocolError; the connection then closes the socket.
"""

from __future__ import annotations

from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes
ACCEPTED = 0
REFUSED_PROTOCOL_VERSION = 1
REFUSED_IDENTIFIER = 2
REFUSED_UNAVAILABLE = 3
REFUSED_BAD_CREDENTIALS = 4
REFUSED_NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80


class ProtocolError(Exception):
    """The peer broke MQTT 3.1.1: the connection must be closed."""


# The low nibble each packet type must carry, for the types a client may send; None: any (PUBLISH).
CLIENT_FLAGS: dict[int, int | None] = {
    CONNECT: 0, PUBLISH: None, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0,
    SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0,
}


def decode_str(body: bytes, pos: int) -> tuple[str, int]:
    if pos + 2 > len(body):
        raise ProtocolError("string length past the end of the packet")
    n = (body[pos] << 8) | body[pos + 1]
    end = pos + 2 + n
    if end > len(body):
        raise ProtocolError("string past the end of the packet")
    raw = body[pos + 2:end]
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"invalid UTF-8: {e}") from None
    if "\x00" in s:
        raise ProtocolError("U+0000 in a string")
    return s, end


def decode_bin(body: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(body):
        raise ProtocolError("binary length past the end of the packet")
    n = (body[pos] << 8) | body[pos + 1]
    end = pos + 2 + n
    if end > len(body):
        raise ProtocolError("binary data past the end of the packet")
    return body[pos + 2:end], end


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(flt: str) -> bool:
    if not flt:
        return False
    if "+" not in flt and "#" not in flt:
        return True
    levels = flt.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


@dataclass(slots=True)
class Connect:
    protocol_name: str
    level: int
    clean_session: bool
    keepalive: int
    client_id: str
    will_topic: str | None
    will_payload: bytes
    will_qos: int
    will_retain: bool
    username: str | None
    password: bytes | None


PROTOCOLS = {"MQTT": 4, "MQIsdp": 3}


def decode_connect(body: bytes) -> Connect:
    """Raises ProtocolError for malformed input; an unknown protocol *level* is reported in
    Connect.level (the caller answers CONNACK 1 [MQTT-3.1.2-2])."""
    name, pos = decode_str(body, 0)
    if name not in PROTOCOLS:
        raise ProtocolError(f"protocol name {name!r}")  # [MQTT-3.1.2-1]: close, no CONNACK
    if pos + 4 > len(body):
        raise ProtocolError("CONNECT variable header truncated")
    level, flags = body[pos], body[pos + 1]
    keepalive = (body[pos + 2] << 8) | body[pos + 3]
    pos += 4
    if level != PROTOCOLS[name]:   # e.g. MQTT 5: the rest has another layout; answer CONNACK 1 without it
        return Connect(name, level, True, keepalive, "", None, b"", 0, False, None, None)
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag set")  # [MQTT-3.1.2-3]
    will = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if not will and (will_qos or will_retain):
        raise ProtocolError("will QoS/retain without a will")  # [MQTT-3.1.2-11/13/15]
    if will_qos == 3:
        raise ProtocolError("will QoS 3")  # [MQTT-3.1.2-14]
    has_user, has_pass = bool(flags & 0x80), bool(flags & 0x40)
    if has_pass and not has_user and level == 4:
        raise ProtocolError("password without username")  # [MQTT-3.1.2-22]
    client_id, pos = decode_str(body, pos)
    will_topic = None
    will_payload = b""
    if will:
        will_topic, pos = decode_str(body, pos)
        if not valid_topic_name(will_topic):
            raise ProtocolError("will topic with wildcards or empty")
        will_payload, pos = decode_bin(body, pos)
    username = password = None
    if has_user:
        username, pos = decode_str(body, pos)
    if has_pass:
        password, pos = decode_bin(body, pos)
    if pos != len(body):
        raise ProtocolError("trailing bytes after CONNECT payload")
    return Connect(name, level, bool(flags & 0x02), keepalive, client_id, will_topic, will_payload,
                   will_qos, will_retain, username, password)


def decode_publish(flags: int, body: bytes) -> tuple[str, int, bytes]:
    """-> (topic, packet id or 0, payload)."""
    topic, pos = decode_str(body, 0)
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError("PUBLISH topic empty or with wildcards")  # [MQTT-3.3.2-1/2]
    pid = 0
    if flags & 0x06:
        if pos + 2 > len(body):
            raise ProtocolError("PUBLISH packet id truncated")
        pid = (body[pos] << 8) | body[pos + 1]
        if pid == 0:
            raise ProtocolError("packet id 0")
        pos += 2
    return topic, pid, body[pos:]


def decode_packet_id(body: bytes) -> int:
    if len(body) != 2:
        raise ProtocolError("acknowledgement with a body other than a packet id")
    pid = (body[0] << 8) | body[1]
    if pid == 0:
        raise ProtocolError("packet id 0")
    return pid


def _leading_packet_id(body: bytes) -> int:
    if len(body) < 2:
        raise ProtocolError("packet id truncated")
    pid = (body[0] << 8) | body[1]
    if pid == 0:
        raise ProtocolError("packet id 0")
    return pid


def decode_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    pid = _leading_packet_id(body)
    pos = 2
    out: list[tuple[str, int]] = []
    while pos < len(body):
        flt, pos = decode_str(body, pos)
        if pos >= len(body):
            raise ProtocolError("SUBSCRIBE filter without QoS byte")
        qos = body[pos]
        pos += 1
        if qos > 2:
            raise ProtocolError("SUBSCRIBE QoS byte reserved bits or QoS 3")  # [MQTT-3-8.3-4]
        if not valid_topic_filter(flt):
            raise ProtocolError(f"invalid topic filter {flt!r}")
        out.append((flt, qos))
    if not out:
        raise ProtocolError("SUBSCRIBE without a filter")  # [MQTT-3.8.3-3]
    return pid, out


def decode_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    pid = _leading_packet_id(body)
    pos = 2
    out: list[str] = []
    while pos < len(body):
        flt, pos = decode_str(body, pos)
        if not valid_topic_filter(flt):
            raise ProtocolError(f"invalid topic filter {flt!r}")
        out.append(flt)
    if not out:
        raise ProtocolError("UNSUBSCRIBE without a filter")  # [MQTT-3.10.3-2]
    return pid, out


# --------------------------------------------------------------------------- encoders

_RL1 = [bytes((n,)) for n in range(128)]


def remaining_length(n: int) -> bytes:
    if n < 128:
        return _RL1[n]
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_publish(topic_b: bytes, payload: bytes, qos: int, retain: bool, dup: bool, pid: int) -> bytes:
    """topic_b: the topic already UTF-8 encoded (encoded once per message, not per recipient)."""
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    tl = len(topic_b)
    if qos:
        vh_len = tl + 4
        return b"".join((bytes((first,)), remaining_length(vh_len + len(payload)), bytes((tl >> 8, tl & 0xFF)),
                         topic_b, bytes((pid >> 8, pid & 0xFF)), payload))
    return b"".join((bytes((first,)), remaining_length(tl + 2 + len(payload)), bytes((tl >> 8, tl & 0xFF)),
                     topic_b, payload))


def encode_connack(session_present: bool, rc: int) -> bytes:
    return bytes((0x20, 2, 1 if session_present and rc == 0 else 0, rc))


def encode_ack(ptype: int, pid: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0b0010), PUBCOMP, UNSUBACK."""
    return bytes(((ptype << 4) | (2 if ptype == PUBREL else 0), 2, pid >> 8, pid & 0xFF))


def encode_suback(pid: int, codes: list[int]) -> bytes:
    return bytes((0x90,)) + remaining_length(2 + len(codes)) + bytes((pid >> 8, pid & 0xFF)) + bytes(codes)


PINGRESP_BYTES = bytes((0xD0, 0))

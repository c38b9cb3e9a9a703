"""Message formats on the wire, with their validation and signing.

All payloads are UTF-8 JSON objects carrying "v": 1, except presence, which
is the bare text "online" or "offline". Times are integer milliseconds since
the Unix epoch, on the server's clock. Decoders return plain dicts and raise
ProtocolError with a message that names the problem.

Command (API -> device, on the device's cmd topic, QoS 1):
    {"v": 1, "type": "cmd", "id": "<32 hex>", "device": "<id>", "action": "unlock",
     "params": {}, "issued_at": ms, "expires_at": ms, "sig": "<64 hex>"}
Time reply (API -> device, on the cmd topic, answers a sync request):
    {"v": 1, "type": "time", "device": "<id>", "t0": <device's nonce>, "server_ms": ms, "sig": "<64 hex>"}
Ack (device -> API, on the ack topic, QoS 1):
    {"v": 1, "id": "<command id>", "result": "received"|"succeeded"|"failed"|"rejected",
     "reason": "...", "state": {...}, "ts": ms}
State (device -> API, on the state topic, retained):
    {"v": 1, "locked": true, "battery": 87, "ts": ms}
Telemetry (device -> API, QoS 0):
    {"v": 1, "battery": 87, "rssi": -61, "ts": ms}
Sync request (device -> API, on the sync topic):
    {"v": 1, "t0": <nonce: the device's own clock reading>}
"""

import json

from protocol import canonical, signing

VERSION = 1
MAX_PAYLOAD = 4096  # bytes; larger device messages are refused unread

ACTIONS = ("unlock", "lock", "locate", "report", "reboot")
# An action whose late execution is harmful: never queued for an offline device.
FAIL_FAST_OFFLINE = ("unlock",)

RECEIVED = "received"
SUCCEEDED = "succeeded"
FAILED = "failed"
REJECTED = "rejected"
RESULTS = (RECEIVED, SUCCEEDED, FAILED, REJECTED)

ONLINE = b"online"
OFFLINE = b"offline"

# Reasons a device gives; free text is allowed too, these are the ones Latch's own locks use.
REASON_BAD_SIGNATURE = "bad signature"
REASON_EXPIRED_ON_DEVICE = "expired on device"
REASON_WRONG_DEVICE = "addressed to another device"
REASON_UNKNOWN_ACTION = "unknown action"
REASON_JAMMED = "jammed"
REASON_ACTUATION_TIMEOUT = "actuation timed out"
REASON_BUSY = "busy"

MAX_REASON = 200


class ProtocolError(ValueError):
    pass


def _load(payload):
    if payload is None:
        raise ProtocolError("empty payload")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("payload of %d bytes exceeds the %d-byte limit" % (len(payload), MAX_PAYLOAD))
    try:
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = bytes(payload).decode()
        obj = json.loads(payload)
    except Exception:
        raise ProtocolError("payload is not UTF-8 JSON")
    if not isinstance(obj, dict):
        raise ProtocolError("payload must be a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError("unsupported message version %r (expected %d)" % (obj.get("v"), VERSION))
    return obj


def _int(obj, name, required=True):
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("field %r must be an integer" % name)
    return value


def _dump(obj):
    return json.dumps(obj).encode()


# ---- commands -------------------------------------------------------------

def command_signing_text(cmd):
    return "latch-cmd-v1\n%s\n%s\n%s\n%s\n%d" % (
        cmd["id"], cmd["device"], cmd["action"], canonical.dumps(cmd["params"]), cmd["expires_at"])


def sign_command(cmd, key):
    """Return `cmd` with its "sig" set: HMAC-SHA256 under the device's key (bytes)."""
    cmd["sig"] = signing.hexdigest(key, command_signing_text(cmd).encode())
    return cmd


def command_signature_ok(cmd, key):
    return signing.equal(cmd.get("sig"), signing.hexdigest(key, command_signing_text(cmd).encode()))


def make_command(command_id, device_id, action, params, issued_at, expires_at, key=None):
    cmd = {"v": VERSION, "type": "cmd", "id": command_id, "device": device_id, "action": action,
           "params": params, "issued_at": issued_at, "expires_at": expires_at, "sig": ""}
    canonical.dumps(params)  # refuses what cannot be signed, before it is sent
    if key is not None:
        sign_command(cmd, key)
    return cmd


def encode_command(cmd):
    return _dump(cmd)


def decode_downlink(payload):
    """A message on a device's cmd topic: a command or a time reply."""
    obj = _load(payload)
    kind = obj.get("type")
    if kind == "cmd":
        for name in ("id", "device", "action", "sig"):
            if not isinstance(obj.get(name), str):
                raise ProtocolError("field %r must be a string" % name)
        if not isinstance(obj.get("params"), dict):
            raise ProtocolError("field 'params' must be an object")
        _int(obj, "issued_at")
        _int(obj, "expires_at")
        return obj
    if kind == "time":
        if not isinstance(obj.get("device"), str) or not isinstance(obj.get("sig"), str):
            raise ProtocolError("time reply needs 'device' and 'sig'")
        _int(obj, "t0")
        _int(obj, "server_ms")
        return obj
    raise ProtocolError("unknown downlink type %r" % (kind,))


# ---- clock sync -----------------------------------------------------------

def time_signing_text(device_id, t0, server_ms):
    return "latch-time-v1\n%s\n%d\n%d" % (device_id, t0, server_ms)


def make_time_reply(device_id, t0, server_ms, key):
    return {"v": VERSION, "type": "time", "device": device_id, "t0": t0, "server_ms": server_ms,
            "sig": signing.hexdigest(key, time_signing_text(device_id, t0, server_ms).encode())}


def time_signature_ok(reply, key):
    text = time_signing_text(reply["device"], reply["t0"], reply["server_ms"])
    return signing.equal(reply.get("sig"), signing.hexdigest(key, text.encode()))


def encode_sync(t0):
    return _dump({"v": VERSION, "t0": t0})


def decode_sync(payload):
    obj = _load(payload)
    _int(obj, "t0")
    return obj


# ---- device -> API ----------------------------------------------------------

def _check_state(state):
    if not isinstance(state, dict):
        raise ProtocolError("field 'state' must be an object")
    locked = state.get("locked")
    if locked is not None and not isinstance(locked, bool):
        raise ProtocolError("field 'state.locked' must be a boolean")
    battery = state.get("battery")
    if battery is not None and (not isinstance(battery, int) or isinstance(battery, bool) or not 0 <= battery <= 100):
        raise ProtocolError("field 'state.battery' must be an integer 0-100")
    return state


def make_ack(command_id, result, ts, reason=None, state=None):
    msg = {"v": VERSION, "id": command_id, "result": result, "ts": ts}
    if reason is not None:
        msg["reason"] = reason
    if state is not None:
        msg["state"] = state
    return msg


def encode_ack(command_id, result, ts, reason=None, state=None):
    return _dump(make_ack(command_id, result, ts, reason, state))


def decode_ack(payload):
    obj = _load(payload)
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise ProtocolError("field 'id' must be a non-empty string")
    if obj.get("result") not in RESULTS:
        raise ProtocolError("field 'result' must be one of %s" % ", ".join(RESULTS))
    reason = obj.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise ProtocolError("field 'reason' must be a string of at most %d characters" % MAX_REASON)
    if obj.get("state") is not None:
        _check_state(obj["state"])
    _int(obj, "ts", required=False)
    return obj


def encode_state(state, ts):
    msg = {"v": VERSION, "ts": ts}
    for k in state:
        msg[k] = state[k]
    return _dump(msg)


def decode_state(payload):
    obj = _load(payload)
    _check_state(obj)
    _int(obj, "ts", required=False)
    return obj


def encode_telemetry(battery, rssi, ts):
    return _dump({"v": VERSION, "battery": battery, "rssi": rssi, "ts": ts})


def decode_telemetry(payload):
    obj = _load(payload)
    _check_state(obj)
    rssi = obj.get("rssi")
    if rssi is not None and (not isinstance(rssi, int) or isinstance(rssi, bool)):
        raise ProtocolError("field 'rssi' must be an integer")
    return obj


def decode_presence(payload):
    if payload == ONLINE or payload == OFFLINE:
        return payload.decode()
    raise ProtocolError("presence must be 'online' or 'offline'")

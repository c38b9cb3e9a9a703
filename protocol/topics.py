"""The topic scheme: the only place a Latch topic string is built or parsed.

    latch/v1/d/<device_id>/cmd        API -> device   commands (QoS 1)
    latch/v1/d/<device_id>/ack        device -> API   receipt and outcome of a command (QoS 1)
    latch/v1/d/<device_id>/state      device -> API   reported state, retained (QoS 1)
    latch/v1/d/<device_id>/presence   device -> API   "online"/"offline", retained, the will (QoS 1)
    latch/v1/d/<device_id>/telemetry  device -> API   battery, signal (QoS 0)
    latch/v1/d/<device_id>/sync       device -> API   clock sync request; the reply comes on cmd

    latch/v1/u/<user_id>/events       API -> a user's app  the user's events (JSON, QoS 1), read-only

    latch/v1/svc/drop/<device_id>     API -> Latch's broker  close that device's connections now: its
                                      credentials were revoked or rotated (payload: which). Only the
                                      service identity may publish it; nobody receives it.

Device ids are 1-64 characters of [A-Za-z0-9_-]: never a wildcard, a slash
or a leading '$', so a device id can be substituted into a topic safely.
User ids follow the same rule.
"""

PREFIX = "latch/v1/d/"

CMD = "cmd"
ACK = "ack"
STATE = "state"
PRESENCE = "presence"
TELEMETRY = "telemetry"

SYNC = "sync"

# What a device may publish (to its own topics only) and receive.
DEVICE_PUBLISH_KINDS = (ACK, STATE, PRESENCE, TELEMETRY, SYNC)
DEVICE_SUBSCRIBE_KINDS = (CMD,)
KINDS = (CMD, ACK, STATE, PRESENCE, TELEMETRY, SYNC)

MAX_DEVICE_ID_LEN = 64
_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"


def valid_device_id(device_id):
    """True when `device_id` is safe to put in a topic and a URL."""
    if not isinstance(device_id, str) or not 0 < len(device_id) <= MAX_DEVICE_ID_LEN:
        return False
    for ch in device_id:
        if ch not in _ID_CHARS:
            return False
    return True


def _checked_id(device_id, what="device"):
    """`device_id` itself when it may stand in a topic; ValueError saying what is allowed otherwise."""
    if not valid_device_id(device_id):
        raise ValueError("invalid %s id %r: use 1-64 of [A-Za-z0-9_-]" % (what, device_id))
    return device_id


def topic(device_id, kind):
    """The topic of `kind` for one device; raises ValueError on a bad id or kind."""
    _checked_id(device_id)
    if kind not in KINDS:
        raise ValueError("unknown topic kind %r" % (kind,))
    return PREFIX + device_id + "/" + kind


def cmd_topic(device_id):
    return topic(device_id, CMD)


def ack_topic(device_id):
    return topic(device_id, ACK)


def state_topic(device_id):
    return topic(device_id, STATE)


def presence_topic(device_id):
    return topic(device_id, PRESENCE)


def telemetry_topic(device_id):
    return topic(device_id, TELEMETRY)


def all_devices_filter(kind):
    """The subscription filter matching `kind` for every device (the API's view)."""
    if kind not in KINDS:
        raise ValueError("unknown topic kind %r" % (kind,))
    return PREFIX + "+/" + kind


def parse(topic_name):
    """(device_id, kind) for a Latch device topic, or None for anything else."""
    if not isinstance(topic_name, str) or not topic_name.startswith(PREFIX):
        return None
    rest = topic_name[len(PREFIX):]
    parts = rest.split("/")
    if len(parts) != 2:
        return None
    device_id, kind = parts
    if kind not in KINDS or not valid_device_id(device_id):
        return None
    return device_id, kind


def device_may_publish(device_id, topic_name):
    """The broker's publish fence for a device identity."""
    parsed = parse(topic_name)
    return parsed is not None and parsed[0] == device_id and parsed[1] in DEVICE_PUBLISH_KINDS


def device_may_subscribe(device_id, topic_filter):
    """The broker's subscribe fence: a device subscribes to its own command topic, exactly."""
    return topic_filter == PREFIX + device_id + "/" + CMD if valid_device_id(device_id) else False


def device_may_receive(device_id, topic_name):
    """The broker's delivery fence: a device receives only its own commands."""
    return device_may_subscribe(device_id, topic_name)


def sync_topic(device_id):
    return topic(device_id, SYNC)


# ---- users' event topics (the MQTT push transport) ----------------------------------

USER_PREFIX = "latch/v1/u/"
USER_EVENTS = "events"


def user_events_topic(user_id):
    """The topic carrying one user's events; raises ValueError on a bad id."""
    return USER_PREFIX + _checked_id(user_id, "user") + "/" + USER_EVENTS


def user_may_subscribe(user_id, topic_filter):
    """The broker's subscribe fence for a user: their own events topic, exactly (no wildcards)."""
    return valid_device_id(user_id) and topic_filter == USER_PREFIX + user_id + "/" + USER_EVENTS


def user_may_receive(user_id, topic_name):
    return user_may_subscribe(user_id, topic_name)


# ---- the API's requests to Latch's own broker ------------------------------------------

SVC_PREFIX = "latch/v1/svc/"
SVC_DROP = SVC_PREFIX + "drop/"


def drop_topic(device_id):
    """Where the API asks Latch's broker to close a device's connections; ValueError on a bad id."""
    return SVC_DROP + _checked_id(device_id)


def parse_drop_topic(topic_name):
    """The device id of a drop request's topic, or None."""
    if not isinstance(topic_name, str) or not topic_name.startswith(SVC_DROP):
        return None
    device_id = topic_name[len(SVC_DROP):]
    return device_id if valid_device_id(device_id) else None

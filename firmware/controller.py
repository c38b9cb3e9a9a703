"""The decision logic of one lock, free of I/O: events in, effects out.

Runs unchanged under MicroPython (the firmware) and CPython (the simulator),
so it imports only `protocol` and uses plain tuples for effects:

    ("publish", topic, payload_bytes, qos, retain)
    ("actuate", "unlock" | "lock" | "beep", command_id)   drive the hardware, then call on_actuated()
    ("persist", record_dict)      write atomically, before the effects that follow it run;
                                  {"executed": [[id, expires_at, result, reason], ...],
                                   "clock": newest server ms known to have passed}; pass it back
                                  as `record` after a restart
    ("reboot",)
    ("log", text)

The caller runs the effects in order. Promises kept here:
- a command is actuated at most once: its id is persisted before actuation
  and a redelivery is answered from the record, never actuated again;
- never late: a command past its expiry (server clock) is rejected;
- the clock comes only from a signed time reply to this boot's own sync request (a random nonce,
  never repeated across boots), and it never moves back behind the newest server time the lock
  already knows to have passed (persisted as record["clock"]): a recorded reply replayed after
  a reboot cannot roll the clock back to make an old signed command valid again;
- never for a forger: the HMAC signature and the addressee are checked first;
- the reported state comes from the sensor, never from what was commanded.
"""

from os import urandom as _urandom

from protocol import messages as m
from protocol import topics

ACTUATION = {"unlock": "unlock", "lock": "lock", "locate": "beep"}
MAX_RECORDS = 64          # recently handled command ids kept (and persisted)
MAX_PENDING = 4           # commands held while the clock is not yet synchronised
IN_PROGRESS = "in_progress"
REASON_INTERRUPTED = "interrupted by restart"
REASON_CLOCK = "clock not synchronised"
REASON_FULL = "too many unexpired commands to remember; retry after they expire"
# A time reply slower than this is refused (and asked for again): the clock it gives is off by up
# to half the round trip, and a held-back reply is how a man in the middle would set it back.
MAX_SYNC_RTT_MS = 10000
# Two honest syncs can disagree by up to half of each round trip plus the local clock's drift
# since the last one. A reply behind what the lock knows by more than this is refused; by less,
# the clock is held at what the lock knows (it never moves back).
CLOCK_SLACK_MS = MAX_SYNC_RTT_MS


def new_nonce(urandom=_urandom):
    """A sync nonce: 62 random bits (an int the protocol's decoder takes, and a small int, with
    no heap, on 64-bit MicroPython). Never derived from the time: it must not repeat across boots."""
    return int.from_bytes(urandom(8), "big") >> 2


class LockController:
    def __init__(self, device_id, key, record=None, clock_offset_ms=None,
                 actuation_timeout_ms=5000, heartbeat_ms=60000, telemetry_ms=300000, max_records=MAX_RECORDS,
                 urandom=None):
        """`record`: what the last "persist" effect carried (None on first boot). `urandom(n)`:
        n random bytes for the sync nonce; the firmware passes its HAL's hardware RNG, the
        default is os.urandom."""
        self.device_id = device_id
        self.key = key
        self.cmd_topic = topics.cmd_topic(device_id)
        # handled commands: [id, expires_at, result, reason], oldest first
        self.records = list((record or {}).get("executed", []))
        for r in self.records:
            if r[2] == IN_PROGRESS:  # we restarted while this one was actuating
                r[2] = m.FAILED
                r[3] = REASON_INTERRUPTED
        self.clock_offset_ms = clock_offset_ms  # server_ms - local_ms; None until synchronised
        # the newest server time (ms) the lock knows to have passed: the clock never goes behind it
        self.clock_floor = (record or {}).get("clock") or 0
        self.urandom = urandom or _urandom
        self.sync_nonce = None     # the nonce of the sync request in flight
        self.sync_sent = None      # local ms it was sent at
        self.syncs = 0             # time replies accepted
        self.pending = []
        self.busy = None           # [command_id, local deadline]
        self.locked = None         # from the sensor only
        self.battery = None
        self.rssi = None
        self.actuation_timeout_ms = actuation_timeout_ms
        self.heartbeat_ms = heartbeat_ms
        self.telemetry_ms = telemetry_ms
        self.next_heartbeat = 0
        self.next_telemetry = 0
        self.stats = {"executed": 0, "duplicates": 0, "rejected": 0, "ignored": 0}
        self.max_records = max_records  # a board short of RAM keeps fewer (see firmware/config.py)

    # ---- clock -------------------------------------------------------------
    def server_now(self, local_ms):
        if self.clock_offset_ms is None:
            return None
        return local_ms + self.clock_offset_ms

    def _ts(self, local_ms):
        now = self.server_now(local_ms)
        return now if now is not None else 0

    # ---- events ------------------------------------------------------------
    def on_connected(self, local_ms):
        """The link is up and subscribed: announce ourselves, ask for the time."""
        eff = [("publish", topics.presence_topic(self.device_id), m.ONLINE, 1, True)]
        eff.extend(self._state_effects(local_ms))
        eff.extend(self.request_sync(local_ms))
        return eff

    def request_sync(self, local_ms):
        """Ask for the server's time with a fresh nonce (any earlier request's answer is stale)."""
        self.sync_nonce = new_nonce(self.urandom)
        self.sync_sent = local_ms
        return [("publish", topics.sync_topic(self.device_id), m.encode_sync(self.sync_nonce), 0, False)]

    def on_sensor(self, locked, local_ms, battery=None, rssi=None):
        """A sensor reading; publishes the state when the lock position changed."""
        if battery is not None:
            self.battery = battery
        if rssi is not None:
            self.rssi = rssi
        if locked == self.locked:
            return []
        self.locked = locked
        return self._state_effects(local_ms)

    def on_message(self, topic, payload, local_ms, retained=False):
        if topic != self.cmd_topic:
            self.stats["ignored"] += 1
            return [("log", "ignored message on unsubscribed topic %s" % topic)]
        try:
            msg = m.decode_downlink(payload)
        except m.ProtocolError as e:
            self.stats["ignored"] += 1
            return [("log", "ignored malformed downlink: %s" % e)]
        if msg["type"] == "time":
            return self._on_time(msg, local_ms)
        return self._on_command(msg, local_ms)

    def on_actuated(self, command_id, ok, locked, local_ms, reason=None):
        """The hardware finished (or gave up on) the actuation of `command_id`."""
        if self.busy is None or self.busy[0] != command_id:
            return [("log", "actuation result for %s arrived after it was settled" % command_id)]
        self.busy = None
        self.locked = locked
        result = m.SUCCEEDED if ok else m.FAILED
        if not ok and reason is None:
            reason = m.REASON_JAMMED
        return self._settle(command_id, result, reason, local_ms) + self._state_effects(local_ms)

    def on_tick(self, local_ms):
        """Periodic: actuation watchdog, heartbeat state, telemetry."""
        eff = []
        if self.busy is not None and local_ms >= self.busy[1]:
            command_id = self.busy[0]
            self.busy = None
            eff.extend(self._settle(command_id, m.FAILED, m.REASON_ACTUATION_TIMEOUT, local_ms))
            eff.extend(self._state_effects(local_ms))
        if local_ms >= self.next_heartbeat:
            eff.extend(self._state_effects(local_ms))
        if local_ms >= self.next_telemetry and self.battery is not None:
            self.next_telemetry = local_ms + self.telemetry_ms
            eff.append(("publish", topics.telemetry_topic(self.device_id),
                        m.encode_telemetry(self.battery, self.rssi, self._ts(local_ms)), 0, False))
        return eff

    # ---- internals ---------------------------------------------------------
    def _on_time(self, msg, local_ms):
        if msg["device"] != self.device_id or not m.time_signature_ok(msg, self.key):
            return [("log", "ignored time reply with a bad signature")]
        if self.sync_nonce is None or msg["t0"] != self.sync_nonce:
            return [("log", "ignored stale time reply")]
        self.sync_nonce = None  # used once
        sent = self.sync_sent
        rtt = local_ms - sent
        if rtt > MAX_SYNC_RTT_MS:
            return [("log", "refused time reply: %d ms round trip (limit %d); asking again"
                     % (rtt, MAX_SYNC_RTT_MS))] + self.request_sync(local_ms)
        # NTP-style: the server read its clock halfway through the round trip
        offset = msg["server_ms"] - (sent + local_ms) // 2
        behind = self.clock_floor - (local_ms + offset)
        if behind > CLOCK_SLACK_MS:
            # fail safe: commands wait (or are refused) until a sync agrees with what the lock knows
            return [("log", "refused time reply: it would set the clock %d ms behind what the lock already knows"
                     % behind)]
        if behind > 0:
            offset += behind  # within the slack: held at what the lock knows, never moved back
        self.clock_offset_ms = offset
        self.clock_floor = local_ms + offset
        self.syncs += 1
        eff = [self._persist()]  # the floor survives a reboot
        pending, self.pending = self.pending, []
        for cmd in pending:
            eff.extend(self._on_command(cmd, local_ms))
        return eff

    def _find(self, command_id):
        for r in self.records:
            if r[0] == command_id:
                return r
        return None

    def _on_command(self, cmd, local_ms):
        cid = cmd["id"]
        if cmd["device"] != self.device_id:
            return self._reject(cmd, m.REASON_WRONG_DEVICE, local_ms, record=False)
        if not m.command_signature_ok(cmd, self.key):
            return self._reject(cmd, m.REASON_BAD_SIGNATURE, local_ms, record=False)
        seen = self._find(cid)
        if seen is not None:
            self.stats["duplicates"] += 1
            if seen[2] == IN_PROGRESS:
                return [self._ack(cid, m.RECEIVED, None, local_ms)]
            return [self._ack(cid, seen[2], seen[3], local_ms, with_state=True)]
        now = self.server_now(local_ms)
        if now is None:
            if len(self.pending) >= MAX_PENDING:
                return self._reject(cmd, REASON_CLOCK, local_ms, record=False)
            self.pending.append(cmd)
            return self.request_sync(local_ms) if self.sync_nonce is None else []
        if now > self.clock_floor:
            self.clock_floor = now
        if now > cmd["expires_at"]:
            return self._reject(cmd, m.REASON_EXPIRED_ON_DEVICE, local_ms)
        if not self._make_room(now):
            # every remembered id is still valid: forgetting one could let its redelivery actuate twice
            return self._reject(cmd, REASON_FULL, local_ms, record=False)
        action = cmd["action"]
        if action not in m.ACTIONS:
            return self._reject(cmd, m.REASON_UNKNOWN_ACTION, local_ms)
        if action in ACTUATION:
            if self.busy is not None:
                return self._reject(cmd, m.REASON_BUSY, local_ms)
            self.busy = [cid, local_ms + self.actuation_timeout_ms]
            self._remember(cid, cmd["expires_at"], IN_PROGRESS, None)
            self.stats["executed"] += 1
            return [self._persist(), self._ack(cid, m.RECEIVED, None, local_ms),
                    ("actuate", ACTUATION[action], cid)]
        # report and reboot need no actuator
        self._remember(cid, cmd["expires_at"], m.SUCCEEDED, None)
        self.stats["executed"] += 1
        eff = [self._persist(), self._ack(cid, m.SUCCEEDED, None, local_ms, with_state=True)]
        eff.extend(self._state_effects(local_ms))
        if action == "reboot":
            eff.append(("reboot",))
        return eff

    def _reject(self, cmd, reason, local_ms, record=True):
        self.stats["rejected"] += 1
        eff = []
        if record:
            self._remember(cmd["id"], cmd["expires_at"], m.REJECTED, reason)
            eff.append(self._persist())
        eff.append(self._ack(cmd["id"], m.REJECTED, reason, local_ms))
        return eff

    def _settle(self, command_id, result, reason, local_ms):
        r = self._find(command_id)
        if r is not None:
            r[2] = result
            r[3] = reason
        return [self._persist(), self._ack(command_id, result, reason, local_ms, with_state=True)]

    def _make_room(self, now):
        """Free a slot for one more record without weakening the once-only promise.

        A record is needed only while its command could still be actuated: an expired command is
        rejected on redelivery anyway, and a rejected one never actuates. So expired records go
        first, then rejected ones (oldest first); True when a slot is free."""
        if len(self.records) < self.max_records:
            return True
        self.records = [r for r in self.records if r[1] >= now]
        i = 0
        while len(self.records) >= self.max_records and i < len(self.records):
            if self.records[i][2] == m.REJECTED:
                del self.records[i]
            else:
                i += 1
        return len(self.records) < self.max_records

    def _remember(self, command_id, expires_at, result, reason):
        if len(self.records) >= self.max_records:
            return  # only rejections get here when full (see _make_room); they need no record
        self.records.append([command_id, expires_at, result, reason])

    def _persist(self):
        return ("persist", {"executed": [list(r) for r in self.records], "clock": self.clock_floor})

    def state(self):
        s = {}
        if self.locked is not None:
            s["locked"] = self.locked
        if self.battery is not None:
            s["battery"] = self.battery
        return s

    def _ack(self, command_id, result, reason, local_ms, with_state=False):
        payload = m.encode_ack(command_id, result, self._ts(local_ms), reason,
                               self.state() if with_state else None)
        return ("publish", topics.ack_topic(self.device_id), payload, 1, False)

    def _state_effects(self, local_ms):
        self.next_heartbeat = local_ms + self.heartbeat_ms
        return [("publish", topics.state_topic(self.device_id),
                 m.encode_state(self.state(), self._ts(local_ms)), 1, True)]

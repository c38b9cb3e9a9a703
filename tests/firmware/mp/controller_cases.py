"""LockController scenarios that run unchanged under CPython (pytest) and MicroPython.

Each case_* function raises AssertionError on failure. Under MicroPython,
run_cases.py runs them all and prints one line per case.
"""
import json

from firmware.controller import IN_PROGRESS, REASON_INTERRUPTED, LockController
from protocol import messages as m
from protocol import topics

DEV = "bike-0001"
KEY = bytes(range(32))
T0 = 1000            # local ms at connect
SERVER = 1700000000000  # server ms at sync


def cid(n):
    return "%032x" % n


def time_reply(c, server_ms, nonce=None, key=KEY):
    return json.dumps(m.make_time_reply(DEV, c.sync_nonce if nonce is None else nonce, server_ms, key)).encode()


def synced(record=None):
    c = LockController(DEV, KEY, record=record)
    c.on_connected(T0)
    reply = m.make_time_reply(DEV, c.sync_nonce, SERVER + 10, KEY)
    eff = c.on_message(topics.cmd_topic(DEV), json.dumps(reply).encode(), T0 + 20)
    # the server read its clock halfway through the round trip; never behind what the record knew
    known = (record or {}).get("clock") or 0
    assert c.server_now(T0 + 20) == max(SERVER + 10 - (T0 + T0 + 20) // 2 + T0 + 20, known), c.clock_offset_ms
    assert kinds(eff) == ["persist"] and eff[0][1]["clock"] == c.server_now(T0 + 20), eff
    return c


def cmd_payload(n, action="unlock", ttl=30000, key=KEY, device=DEV, params=None, now=SERVER):
    cmd = m.make_command(cid(n), device, action, params or {}, now, now + ttl, key)
    return m.encode_command(cmd)


def kinds(eff):
    return [e[0] for e in eff]


def acks(eff):
    out = []
    for e in eff:
        if e[0] == "publish" and e[1] == topics.ack_topic(DEV):
            out.append(json.loads(e[2]))
    return out


def actuations(eff):
    return [e for e in eff if e[0] == "actuate"]


def case_unlock_round_trip():
    c = synced()
    c.on_sensor(True, T0 + 30, battery=90)
    eff = c.on_message(c.cmd_topic, cmd_payload(1), T0 + 40)
    assert kinds(eff) == ["persist", "publish", "actuate"], eff
    assert eff[0][1]["executed"][0][:3] == [cid(1), SERVER + 30000, IN_PROGRESS]
    assert acks(eff)[0]["result"] == "received"
    assert eff[2] == ("actuate", "unlock", cid(1))
    eff = c.on_actuated(cid(1), True, False, T0 + 500)
    a = acks(eff)[0]
    assert a["result"] == "succeeded" and a["state"] == {"locked": False, "battery": 90}, a
    assert a["ts"] == c.server_now(T0 + 500)
    states = [json.loads(e[2]) for e in eff if e[0] == "publish" and e[1] == topics.state_topic(DEV)]
    assert states and states[-1]["locked"] is False
    assert eff[0][0] == "persist" and eff[0][1]["executed"][0][2] == "succeeded"


def case_forged_signature_rejected():
    c = synced()
    eff = c.on_message(c.cmd_topic, cmd_payload(2, key=b"x" * 32), T0 + 40)
    assert not actuations(eff) and "persist" not in kinds(eff)
    a = acks(eff)[0]
    assert a["result"] == "rejected" and a["reason"] == m.REASON_BAD_SIGNATURE, a
    # a tampered field breaks the signature too
    cmd = json.loads(cmd_payload(3))
    cmd["action"] = "lock"
    eff = c.on_message(c.cmd_topic, json.dumps(cmd).encode(), T0 + 41)
    assert acks(eff)[0]["reason"] == m.REASON_BAD_SIGNATURE and not actuations(eff)
    cmd = json.loads(cmd_payload(4))
    cmd["expires_at"] += 60000
    eff = c.on_message(c.cmd_topic, json.dumps(cmd).encode(), T0 + 42)
    assert acks(eff)[0]["reason"] == m.REASON_BAD_SIGNATURE and not actuations(eff)


def case_expired_on_device():
    c = synced()
    # valid signature, but expired 1 ms before the device's server-clock now
    now = c.server_now(T0 + 5000)
    eff = c.on_message(c.cmd_topic, cmd_payload(5, ttl=1000, now=now - 1001), T0 + 5000)
    a = acks(eff)[0]
    assert a["result"] == "rejected" and a["reason"] == m.REASON_EXPIRED_ON_DEVICE, a
    assert not actuations(eff)
    # expiring exactly now is still in time
    eff = c.on_message(c.cmd_topic, cmd_payload(6, ttl=1000, now=now - 1000), T0 + 5000)
    assert actuations(eff)


def case_duplicate_actuates_once():
    c = synced()
    p = cmd_payload(7)
    eff1 = c.on_message(c.cmd_topic, p, T0 + 40)
    assert len(actuations(eff1)) == 1
    eff2 = c.on_message(c.cmd_topic, p, T0 + 50)  # redelivered while actuating
    assert not actuations(eff2) and acks(eff2)[0]["result"] == "received"
    c.on_actuated(cid(7), True, False, T0 + 300)
    eff3 = c.on_message(c.cmd_topic, p, T0 + 400)  # redelivered after
    assert not actuations(eff3)
    a = acks(eff3)[0]
    assert a["result"] == "succeeded" and a["state"]["locked"] is False, a
    assert c.stats["executed"] == 1 and c.stats["duplicates"] == 2


def case_duplicate_across_reboot():
    c = synced()
    eff = c.on_message(c.cmd_topic, cmd_payload(8), T0 + 40)
    record = eff[0][1]
    eff = c.on_actuated(cid(8), True, False, T0 + 300)
    record = [e for e in eff if e[0] == "persist"][0][1]
    # power cycle: a new controller from the persisted record; clock resynchronised
    c2 = synced(json.loads(json.dumps(record)))
    eff = c2.on_message(c2.cmd_topic, cmd_payload(8), T0 + 60)
    assert not actuations(eff) and acks(eff)[0]["result"] == "succeeded"


def case_interrupted_by_restart():
    c = synced()
    eff = c.on_message(c.cmd_topic, cmd_payload(9), T0 + 40)
    record = eff[0][1]  # persisted before actuation; then the power went
    c2 = synced(json.loads(json.dumps(record)))
    eff = c2.on_message(c2.cmd_topic, cmd_payload(9), T0 + 60)
    assert not actuations(eff)
    a = acks(eff)[0]
    assert a["result"] == "failed" and a["reason"] == REASON_INTERRUPTED, a


def case_other_device_and_topics():
    c = synced()
    eff = c.on_message(c.cmd_topic, cmd_payload(11, device="bike-0002"), T0 + 40)
    assert acks(eff)[0]["reason"] == m.REASON_WRONG_DEVICE and not actuations(eff)
    eff = c.on_message(topics.cmd_topic("bike-0002"), cmd_payload(12), T0 + 40)
    assert kinds(eff) == ["log"] and c.stats["ignored"] == 1
    eff = c.on_message(c.cmd_topic, b"not json", T0 + 40)
    assert kinds(eff) == ["log"]


def case_jammed_and_timeout():
    c = synced()
    c.on_sensor(True, T0)
    c.on_message(c.cmd_topic, cmd_payload(13), T0 + 40)
    eff = c.on_actuated(cid(13), False, True, T0 + 3000, m.REASON_JAMMED)
    a = acks(eff)[0]
    assert a["result"] == "failed" and a["reason"] == m.REASON_JAMMED and a["state"]["locked"] is True, a
    c.on_message(c.cmd_topic, cmd_payload(14), T0 + 4000)
    eff = c.on_tick(T0 + 4000 + c.actuation_timeout_ms)
    a = acks(eff)[0]
    assert a["result"] == "failed" and a["reason"] == m.REASON_ACTUATION_TIMEOUT, a
    eff = c.on_actuated(cid(14), True, False, T0 + 99999)  # too late: already settled
    assert kinds(eff) == ["log"]


def case_state_from_sensor():
    c = synced()
    c.on_sensor(True, T0)
    c.on_message(c.cmd_topic, cmd_payload(15), T0 + 40)
    # the motor ran but the sensor still reads locked: report what the sensor says
    eff = c.on_actuated(cid(15), True, True, T0 + 400)
    assert acks(eff)[0]["state"]["locked"] is True
    # a sensor change outside any command publishes the new state
    eff = c.on_sensor(False, T0 + 500)
    assert json.loads(eff[0][2])["locked"] is False
    assert c.on_sensor(False, T0 + 600) == []


def case_busy_and_other_actions():
    c = synced()
    c.on_message(c.cmd_topic, cmd_payload(16), T0 + 40)
    eff = c.on_message(c.cmd_topic, cmd_payload(17, action="lock"), T0 + 41)
    assert acks(eff)[0]["reason"] == m.REASON_BUSY
    c.on_actuated(cid(16), True, False, T0 + 300)
    eff = c.on_message(c.cmd_topic, cmd_payload(18, action="report"), T0 + 400)
    assert acks(eff)[0]["result"] == "succeeded" and not actuations(eff)
    eff = c.on_message(c.cmd_topic, cmd_payload(19, action="reboot"), T0 + 401)
    assert eff[-1] == ("reboot",)
    eff = c.on_message(c.cmd_topic, cmd_payload(20, action="locate"), T0 + 402)
    assert actuations(eff)[0][1] == "beep"


def case_heartbeat_and_telemetry():
    c = synced()
    c.on_sensor(True, T0, battery=80, rssi=-60)
    eff = c.on_tick(T0 + c.heartbeat_ms + 1)
    topics_out = [e[1] for e in eff if e[0] == "publish"]
    assert topics.state_topic(DEV) in topics_out and topics.telemetry_topic(DEV) in topics_out
    tel = [json.loads(e[2]) for e in eff if e[1] == topics.telemetry_topic(DEV)][0]
    assert tel["battery"] == 80 and tel["rssi"] == -60
    assert [e for e in c.on_tick(T0 + c.heartbeat_ms + 2) if e[0] == "publish"] == []


def case_params_and_unicode_signature():
    c = synced()
    eff = c.on_message(c.cmd_topic, cmd_payload(21, action="locate",
                                                params={"pattern": "kurz–lang", "n": [1, 2], "q": None}), T0 + 40)
    assert actuations(eff), eff


CASES = [case_unlock_round_trip, case_forged_signature_rejected, case_expired_on_device,
         case_duplicate_actuates_once, case_duplicate_across_reboot, case_interrupted_by_restart,
         case_other_device_and_topics,
         case_jammed_and_timeout, case_state_from_sensor, case_busy_and_other_actions,
         case_heartbeat_and_telemetry, case_params_and_unicode_signature]

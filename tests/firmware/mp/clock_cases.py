"""The lock's clock: waiting for it, the time reply's checks, sync nonces, the clock floor, slow
replies (issue 12, defect 9). Runs unchanged
under CPython (pytest) and MicroPython (run_cases.py), like controller_cases (its own module so
that each compiles within a 64 KiB heap)."""
import json

from controller_cases import DEV, KEY, SERVER, T0, acks, actuations, cmd_payload, synced, time_reply

from firmware.controller import CLOCK_SLACK_MS, MAX_SYNC_RTT_MS, REASON_CLOCK, LockController
from protocol import messages as m
from protocol import topics


def case_waits_for_clock():
    c = LockController(DEV, KEY)
    c.on_connected(T0)
    eff = c.on_message(c.cmd_topic, cmd_payload(10), T0 + 5)
    assert eff == []  # held: a sync request is already out
    eff = c.on_message(c.cmd_topic, time_reply(c, SERVER + 10), T0 + 20)
    assert len(actuations(eff)) == 1
    # held commands are bounded
    c = LockController(DEV, KEY)
    c.on_connected(T0)
    for i in range(4):
        assert c.on_message(c.cmd_topic, cmd_payload(20 + i), T0) == []
    eff = c.on_message(c.cmd_topic, cmd_payload(30), T0)
    assert acks(eff)[0]["reason"] == REASON_CLOCK


def case_time_reply_checked():
    c = LockController(DEV, KEY)
    c.on_connected(T0)
    nonce = c.sync_nonce
    c.on_message(c.cmd_topic, time_reply(c, SERVER, key=b"y" * 32), T0 + 20)
    assert c.clock_offset_ms is None
    c.on_message(c.cmd_topic, time_reply(c, SERVER, nonce - 1), T0 + 20)
    assert c.clock_offset_ms is None
    c.on_message(c.cmd_topic, time_reply(c, SERVER), T0 + 20)
    assert c.clock_offset_ms is not None
    # a replayed reply (nonce used) changes nothing
    c.on_message(c.cmd_topic, time_reply(c, SERVER + 99999, nonce), T0 + 30)
    assert c.server_now(T0 + 10) == SERVER


def case_nonce_is_random_not_the_time():
    seen = []
    for _ in range(2):  # two boots, the same local time at connect
        c = LockController(DEV, KEY)
        eff = c.on_connected(T0)
        sync = [json.loads(e[2]) for e in eff if e[0] == "publish" and e[1] == topics.sync_topic(DEV)][0]
        assert sync["t0"] == c.sync_nonce and 0 <= sync["t0"] < 2 ** 62, sync
        m.decode_sync(m.encode_sync(sync["t0"]))  # the protocol's decoder takes it
        seen.append(sync["t0"])
        again = c.request_sync(T0)  # a new request: a new nonce, the old one's answer is stale
        assert json.loads(again[0][2])["t0"] not in seen
    assert seen[0] != seen[1] and seen[0] != T0, seen
    # the RNG is the caller's (the firmware passes its HAL's): a fixed one gives fixed nonces
    c = LockController(DEV, KEY, urandom=lambda n: b"\xff" * n)
    c.on_connected(T0)
    assert c.sync_nonce == 2 ** 62 - 1, c.sync_nonce


def case_clock_never_behind_what_the_lock_knows():
    c = synced()
    eff = c.on_message(c.cmd_topic, cmd_payload(40), T0 + 1000)
    record = json.loads(json.dumps(eff[0][1]))
    known = record["clock"]
    assert known == c.server_now(T0 + 1000), record
    # reboot; the right nonce (a broken RNG, say) but a reply recorded 64 h ago: refused
    c2 = LockController(DEV, KEY, record=record)
    c2.on_connected(T0)
    eff = c2.on_message(c2.cmd_topic, time_reply(c2, SERVER - 64 * 3600 * 1000), T0 + 20)
    assert c2.clock_offset_ms is None and "refused time reply" in eff[0][1], eff
    # so a 64 h old unlock is never judged against that clock
    old = cmd_payload(41, now=SERVER - 64 * 3600 * 1000)
    eff = c2.on_message(c2.cmd_topic, old, T0 + 30)
    assert eff and eff[0][1] == topics.sync_topic(DEV), eff  # held, a new sync asked for
    eff = c2.on_message(c2.cmd_topic, time_reply(c2, known + 5000), T0 + 40)
    a = acks(eff)[0]
    assert a["result"] == "rejected" and a["reason"] == m.REASON_EXPIRED_ON_DEVICE and not actuations(eff), a
    # a reply a little behind (within the slack) is taken, but the clock is held at what it knew
    c3 = LockController(DEV, KEY, record=record)
    c3.on_connected(T0)
    c3.on_message(c3.cmd_topic, time_reply(c3, known - CLOCK_SLACK_MS // 2), T0 + 20)
    assert c3.server_now(T0 + 20) == known, (c3.server_now(T0 + 20), known)
    # a record from before the clock was persisted: no floor, the first sync is believed
    c4 = LockController(DEV, KEY, record={"executed": []})
    c4.on_connected(T0)
    c4.on_message(c4.cmd_topic, time_reply(c4, SERVER), T0 + 20)
    assert c4.server_now(T0 + 10) == SERVER


def case_slow_time_reply_refused():
    c = LockController(DEV, KEY)
    c.on_connected(T0)
    nonce = c.sync_nonce
    eff = c.on_message(c.cmd_topic, time_reply(c, SERVER), T0 + MAX_SYNC_RTT_MS + 1)
    assert c.clock_offset_ms is None and "round trip" in eff[0][1], eff
    assert c.sync_nonce != nonce and eff[1][1] == topics.sync_topic(DEV), eff  # asked again
    c.on_message(c.cmd_topic, time_reply(c, SERVER), T0 + MAX_SYNC_RTT_MS + 50)
    assert c.server_now(T0 + MAX_SYNC_RTT_MS + 25) == SERVER


CASES = [case_waits_for_clock, case_time_reply_checked, case_nonce_is_random_not_the_time,
         case_clock_never_behind_what_the_lock_knows, case_slow_time_reply_refused]

"""The executed-id memory is bounded, and bounding it never weakens 'actuated at most once'."""

from firmware.controller import REASON_FULL, LockController
from protocol import messages as m
from protocol import topics

KEY = b"k" * 32
DEV = "bike-r"


def command(cid: str, expires_at: int) -> bytes:
    return m.encode_command(m.make_command(cid, DEV, "unlock", {}, 0, expires_at, KEY))


def deliver(c: LockController, cid: str, expires_at: int, now: int) -> list[tuple]:
    eff = c.on_message(topics.cmd_topic(DEV), command(cid, expires_at), now)
    for e in eff:
        if e[0] == "actuate":
            eff += c.on_actuated(cid, True, False, now)
    return eff


def actuations(eff: list[tuple]) -> int:
    return sum(1 for e in eff if e[0] == "actuate")


def last_ack(eff: list[tuple]) -> dict:
    return [m.decode_ack(e[2]) for e in eff if e[0] == "publish" and e[1].endswith("/ack")][-1]


def test_full_of_unexpired_ids_refuses_rather_than_forget_one() -> None:
    c = LockController(DEV, KEY, clock_offset_ms=0, max_records=3)
    for i in range(3):
        assert actuations(deliver(c, f"c{i}", 10_000, 100)) == 1
    refused = deliver(c, "c3", 10_000, 200)
    assert actuations(refused) == 0 and last_ack(refused)["reason"] == REASON_FULL
    again = deliver(c, "c0", 10_000, 300)                 # a redelivery is still recognised
    assert actuations(again) == 0 and last_ack(again)["result"] == m.SUCCEEDED


def test_expired_and_rejected_records_make_room_first() -> None:
    c = LockController(DEV, KEY, clock_offset_ms=0, max_records=3)
    assert actuations(deliver(c, "old", 1_000, 100)) == 1
    late = deliver(c, "late", 50, 100)                     # rejected as expired, recorded
    assert last_ack(late)["reason"] == m.REASON_EXPIRED_ON_DEVICE
    assert actuations(deliver(c, "keep", 60_000, 200)) == 1
    # at t=2000 "old" has expired: its slot (and the rejection's) can be reused safely
    assert actuations(deliver(c, "new1", 60_000, 2_000)) == 1
    assert actuations(deliver(c, "new2", 60_000, 2_000)) == 1
    assert [r[0] for r in c.records] == ["keep", "new1", "new2"]
    assert actuations(deliver(c, "keep", 60_000, 2_100)) == 0   # still actuated once

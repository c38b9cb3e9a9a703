"""The state table, over every (state, event) pair."""

import itertools

from api.commands.states import FINAL, TRANSITIONS, Event, Status, advance, is_final

EXPECTED_MOVES = {
    Status.QUEUED: {Event.DISPATCH: Status.SENT, Event.DEVICE_RECEIVED: Status.RECEIVED,
                    Event.DEVICE_SUCCEEDED: Status.SUCCEEDED, Event.DEVICE_FAILED: Status.FAILED,
                    Event.DEVICE_REJECTED: Status.REJECTED, Event.DEVICE_OFFLINE: Status.FAILED,
                    Event.EXPIRE: Status.EXPIRED, Event.CANCEL: Status.CANCELLED},
    Status.SENT: {Event.DEVICE_RECEIVED: Status.RECEIVED, Event.DEVICE_SUCCEEDED: Status.SUCCEEDED,
                  Event.DEVICE_FAILED: Status.FAILED, Event.DEVICE_REJECTED: Status.REJECTED,
                  Event.TIMEOUT: Status.TIMED_OUT, Event.PUBLISH_FAILED: Status.FAILED},
    Status.RECEIVED: {Event.DEVICE_SUCCEEDED: Status.SUCCEEDED, Event.DEVICE_FAILED: Status.FAILED,
                      Event.DEVICE_REJECTED: Status.REJECTED, Event.TIMEOUT: Status.TIMED_OUT},
}


def test_every_state_event_pair() -> None:
    for status, event in itertools.product(Status, Event):
        expected = EXPECTED_MOVES.get(status, {}).get(event)
        assert advance(status, event) == expected, (status, event)


def test_final_states_never_move() -> None:
    assert FINAL == {Status.SUCCEEDED, Status.FAILED, Status.REJECTED, Status.EXPIRED, Status.TIMED_OUT,
                     Status.CANCELLED}
    for status in FINAL:
        assert is_final(status)
        for event in Event:
            assert advance(status, event) is None


def test_table_has_no_entry_from_a_final_state_and_every_state_is_reachable() -> None:
    assert not any(src in FINAL for src, _ in TRANSITIONS)
    reachable = {Status.QUEUED} | set(TRANSITIONS.values())
    assert reachable == set(Status)


def test_duplicate_device_answers_do_not_move() -> None:
    assert advance(Status.RECEIVED, Event.DEVICE_RECEIVED) is None
    assert advance(Status.SENT, Event.DISPATCH) is None

import pytest

from protocol import topics


def test_build_and_parse_round_trip() -> None:
    for kind in topics.KINDS:
        t = topics.topic("bike-0001", kind)
        assert topics.parse(t) == ("bike-0001", kind)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "bike 1", "x" * 65, "$SYS", "ü", None, 5])
def test_unsafe_device_ids_are_refused(bad: object) -> None:
    assert not topics.valid_device_id(bad)
    with pytest.raises(ValueError, match="invalid device id"):
        topics.cmd_topic(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("t", ["latch/v1/d/a/b/ack", "latch/v1/d/a", "other/x", "latch/v1/d/+/ack",
                               "latch/v1/d/a/nope", "", "latch/v1/d//ack"])
def test_parse_rejects_non_device_topics(t: str) -> None:
    assert topics.parse(t) is None


def test_fence_rules() -> None:
    assert topics.device_may_publish("a", "latch/v1/d/a/ack")
    assert topics.device_may_publish("a", "latch/v1/d/a/presence")
    assert not topics.device_may_publish("a", "latch/v1/d/b/ack")
    assert not topics.device_may_publish("a", "latch/v1/d/a/cmd")      # only the API commands
    assert topics.device_may_subscribe("a", "latch/v1/d/a/cmd")
    assert not topics.device_may_subscribe("a", "latch/v1/d/+/cmd")
    assert not topics.device_may_subscribe("a", "latch/v1/d/a/#")
    assert not topics.device_may_subscribe("a", "#")
    assert not topics.device_may_receive("a", "latch/v1/d/b/cmd")


def test_drop_requests() -> None:
    assert topics.drop_topic("bike-1") == "latch/v1/svc/drop/bike-1"
    assert topics.parse_drop_topic("latch/v1/svc/drop/bike-1") == "bike-1"
    for t in ("latch/v1/svc/drop/", "latch/v1/svc/drop/a/b", "latch/v1/svc/drop/+", "latch/v1/d/a/ack", 7):
        assert topics.parse_drop_topic(t) is None   # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid device id"):
        topics.drop_topic("a/#")

"""Differential MQTT 3.1.1 conformance tests.

Every test runs one scenario (``scenarios.py``) against every registered
broker (``brokers.py``) and asserts what MQTT 3.1.1 requires (which is what
Mosquitto 2.0 does, except where noted).  Where amqtt 0.12.1 or nats-server's
MQTT listener (Latch's NATS tier) is known to be wrong the (test, broker) pair is
a strict xfail (``known.defect``), so the suite documents each defect and fails
loudly if that broker's behaviour changes.

Claims 1-9 refer to docs/amqtt-defects.md.
"""

from __future__ import annotations

import known
import pytest
import scenarios as sc
from known import AMQTT, NATS, defect, not_applicable

pytestmark = pytest.mark.asyncio


# ===========================================================================
# Baseline behaviour
# ===========================================================================


async def test_basic_qos_delivery(broker, observe):
    obs = await observe("basic_qos_delivery")
    for q in (0, 1, 2):
        entry = obs[f"qos{q}"]
        assert entry["suback"] == [q]
        assert len(entry["received"]) == 1, entry  # exactly once (QoS 0 "at most once": it did arrive once)
        got = entry["received"][0]
        assert (got["payload"], got["qos"], got["retain"], got["dup"]) == (f"m{q}", q, False, False)


@defect(AMQTT, "claim 3: outgoing QoS is the subscription QoS, not min(publish, subscription) "
               "(broker.py:788 broadcasts without the publish QoS; broker.py:1023 falls back to sub_qos)")
async def test_qos_is_min_of_publish_and_subscription(broker, observe):
    """[MQTT-3.8.4-6]/section 3.8.4: delivered QoS = min(publish QoS, granted QoS)."""
    obs = await observe("qos_min_live")
    expected = {f"pub{p}_sub{s}": min(p, s) for p in (0, 1, 2) for s in (0, 1, 2)}
    assert obs["delivered_qos"] == expected


@defect(AMQTT, "claim 3: a retained QoS 0 message goes to a QoS 2 subscriber as QoS 2 "
               "(broker.py:1150 min(qos, retained.qos or qos): QoS 0 is falsy)")
async def test_retained_qos_is_min(broker, observe):
    obs = await observe("qos_min_retained")
    got = obs["retained_to_qos2_subscriber"]
    assert got == {"qr/0": {"qos": 0, "retain": True}, "qr/1": {"qos": 1, "retain": True}}


async def test_retained_set_overwrite_clear(broker, observe, request):
    """[MQTT-3.3.1-5/6/10/11]: stored, replaced, removed by a zero-byte retained publish."""
    obs = await observe("retained_lifecycle")
    for phase, payload in (("after_set", "v1"), ("after_overwrite", "v2")):
        assert len(obs[phase]) == 1, (phase, obs[phase])
        assert obs[phase][0]["payload"] == payload and obs[phase][0]["retain"] is True
    assert obs["after_clear"] == []
    if request.node.callspec.params["broker"] not in known.RETAINED_SETTLES:
        assert obs["late_views"] == 0   # the first subscription after the PUBACK saw the new state


async def test_retain_flag_cleared_on_live_delivery(broker, observe):
    """[MQTT-3.3.1-9]: RETAIN=0 when delivering to an established subscription."""
    obs = await observe("retain_flag_on_live_delivery")
    got = obs["live_subscriber_got"]
    assert [g["payload"] for g in got] == ["retained-msg", ""]  # the clearing publish is forwarded too
    assert all(g["retain"] is False for g in got)


async def test_unsubscribe_stops_delivery(broker, observe):
    obs = await observe("unsubscribe_stops_delivery")
    assert obs["received_before_unsubscribe"] and obs["sentinel_received"]
    assert obs["received_after_unsubscribe"] == []


async def test_overlapping_subscriptions(broker, observe):
    """[MQTT-3.3.5-1]: at least one copy at the max granted QoS of the matching
    subscriptions (here min(2, max(0, 1)) = 1); extra copies are allowed.
    Observed: Mosquitto 2.0 sends 1 copy (QoS 1), amqtt 2 copies (QoS 0 and 1)."""
    obs = await observe("overlapping_subscriptions")
    assert obs["copy_count"] >= 1
    assert max(obs["qos_of_copies"]) == 1
    assert all(c["payload"] == "m" for c in obs["copies"])


async def test_zero_length_client_id(broker, observe):
    """[MQTT-3.1.3-6/7]: allowed with clean session; [MQTT-3.1.3-8]: rejected (rc 2) and closed otherwise."""
    obs = await observe("zero_length_client_id")
    assert obs["clean"] == {"connack_rc": 0, "session_present": False, "roundtrip": True}
    assert obs["persistent"]["connack_rc"] == 2
    assert obs["persistent"]["closed_within_deadline"]


async def test_dollar_topics_not_matched_by_wildcards(broker, observe):
    """[MQTT-4.7.2-1]: '#' and '+' at the first level never match '$...' topics.
    (Whether a client may publish to '$test/x' at all is the broker's choice:
    Mosquitto routes it to '$test/#'; amqtt silently drops it -- see
    test_dollar_publish_does_not_wedge_publisher.)"""
    obs = await observe("dollar_topics")
    assert obs["sentinel_received_by_wildcard"]
    assert obs["wildcard_subscriber_got_dollar"] == []


@defect(AMQTT, "a PUBLISH to a '$' topic silently ends the broker's message loop for that client "
               "(broker.py:772-776 returns False, broker.py:644-645 breaks) without closing it: "
               "the connection still answers PINGREQ but nothing it sends is processed any more")
async def test_dollar_publish_does_not_wedge_publisher(broker, observe):
    """Route or drop the $-publish and keep serving the client, or close it -- never half-alive."""
    obs = await observe("dollar_topics")
    assert obs["publisher_disconnected"] or obs["publisher_roundtrip"], (
        "publisher neither closed nor served after its $-topic publish")


async def test_will_on_abrupt_close(broker, observe):
    """[MQTT-3.1.2-8]: network connection closed without DISCONNECT -> will published."""
    obs = await observe("will_on_abrupt_close")
    assert obs["will_received"] is not None
    assert obs["will_received"]["payload"] == "gone"
    assert obs["will_received"]["qos"] == 1


async def test_no_will_on_clean_disconnect(broker, observe):
    """[MQTT-3.1.2-10]: will is discarded on DISCONNECT."""
    obs = await observe("no_will_on_clean_disconnect")
    assert obs["sentinel_received"]
    assert obs["will_received"] == []


# ===========================================================================
# Claims 1-9
# ===========================================================================


@defect(AMQTT, "claim 1: keepalive is never enforced -- the reader's wait_for timeout calls "
               "BrokerProtocolHandler.handle_read_timeout(), a no-op (handler.py:466/537-539, "
               "broker_handler.py:86-87); no disconnect, no will")
async def test_keepalive_enforced_on_half_open_connection(broker, observe):
    """Claim 1, [MQTT-3.1.2-24]: silent client with keepalive=2 is disconnected and its will published.
    Deadline 9 s, not 3 s: Mosquitto 2.0's keepalive check runs only every ~6 s (see scenarios.py)."""
    obs = await observe("keepalive_half_open")
    assert obs["will_after_s"] is not None, f"no will within {obs['deadline_s']} s"
    assert obs["closed_after_s"] is not None, f"connection not closed within {obs['deadline_s']} s"
    assert obs["will_after_s"] >= 1.5 * sc.KEEPALIVE - 1.0  # not before the keepalive could have expired


@not_applicable("amqtt_auth", "amqtt_auth requires a username (allow_anonymous=False): an anonymous CONNECT is refused")
@defect("amqtt_plain", "claim 2: allow_anonymous marks the session anonymous and anonymous sessions never "
                       "queue offline messages (broker.py:1034-1037; authentication.py:35-37)")
async def test_offline_qos1_queued_for_anonymous_persistent_session(broker, observe):
    """Claim 2, [MQTT-3.1.2-4]/[MQTT-4.4.0-1]: clean_session=0 session keeps QoS 1 messages while offline."""
    obs = await observe("offline_queue_anonymous")
    assert obs["routed_to_witness"]
    assert obs["reconnect_session_present"] is True
    assert [(m["payload"], m["qos"]) for m in obs["queued_delivered"]] == [("while-offline", 1)]


@defect("amqtt_plain", "claim 2: with allow_anonymous=True *every* session is flagged anonymous, even one that "
                       "presents a username (authentication.py:35-37), so nothing is queued (broker.py:1034-1037)")
async def test_offline_qos1_queued_for_persistent_session_with_username(broker, observe):
    obs = await observe("offline_queue_with_username")
    assert obs["routed_to_witness"]
    assert obs["reconnect_session_present"] is True
    assert [(m["payload"], m["qos"]) for m in obs["queued_delivered"]] == [("while-offline", 1)]


@defect(AMQTT, "claim 4: in-flight QoS 1 messages are dropped on disconnect (handler.py:325-328 pops "
               "inflight_out in `finally`, also after the 5 s PUBACK timeout), so _retry_deliveries "
               "(handler.py:174-193) has nothing to resend")
@defect(NATS, "an unacknowledged QoS 1 message is not sent again when the session resumes (session present), "
              "only after the MQTT listener's ack_wait (30 s by default) [MQTT-4.4.0-1]; Latch's generated "
              "configuration sets 3 s (latch/nats_config.py; the paho 3.1.1 suite's test_redelivery_on_reconnect "
              "fails on NATS for this)")
async def test_unacked_qos1_redelivered_with_dup_on_reconnect(broker, observe):
    """Claim 4, [MQTT-4.4.0-1]: resend unacknowledged PUBLISH with DUP=1 and the same packet id."""
    obs = await observe("qos1_redelivery_after_reconnect")
    assert obs["drop_processed_before_reconnect"]  # precondition: not a takeover
    first = obs["first_delivery"]
    assert first is not None and first["dup"] is False
    assert obs["reconnect_session_present"] is True
    assert len(obs["redelivered"]) == 1, obs["redelivered"]
    again = obs["redelivered"][0]
    assert (again["payload"], again["qos"], again["dup"], again["packet_id"]) == (
        "unacked", 1, True, first["packet_id"])


@defect("amqtt_auth", "claim 5: messages queued for an offline session are sent with RETAIN=1 "
                      "(broker.py:1128 mqtt_publish(..., retain=True))")
@defect("amqtt_plain", "claims 2+5: nothing is queued for the (anonymous) offline session at all, so the "
                       "queued message never arrives; with queuing (amqtt_auth) it arrives with RETAIN=1")
async def test_offline_queued_message_delivered_without_retain_flag(broker, observe):
    """Claim 5, [MQTT-3.3.1-9]: RETAIN=1 only for new-subscription deliveries of retained messages."""
    obs = await observe("offline_queue_retain_flag")
    assert len(obs["queued_delivered"]) == 1, obs
    assert obs["queued_delivered"][0]["retain"] is False


@pytest.mark.parametrize("variant", ["clean", "persistent"])
@defect(AMQTT, "claim 6: with clean_session=1, _delete_session (broker.py:912-924) drops the old session "
               "without stopping its handler: the old TCP connection stays open",
        when=lambda p: p["variant"] == "clean")
@defect(AMQTT, "claim 6 (persistent variant): the old connection IS closed, but the old client loop then "
               "marks the shared Session 'disconnected' (broker.py:572-575 then :698), so the new "
               "connection is deaf: messages for it are queued (amqtt_auth) or dropped (amqtt_plain)",
        when=lambda p: p["variant"] == "persistent")
async def test_session_takeover_closes_old_connection(broker, observe, variant):
    """Claim 6, [MQTT-3.1.4-2]: a CONNECT with an in-use client id disconnects the existing client;
    the new connection then works normally."""
    obs = await observe(f"takeover_{variant}")
    assert obs["new_connack"][0] == 0
    assert obs["old_closed_after_s"] is not None, f"old connection still open {sc.TAKEOVER_DEADLINE} s after takeover"
    assert obs["new_receives_after_takeover"]
    assert not obs["old_receives_after_takeover"]


@defect(AMQTT, "claim 7: on every CONNECT the broker sends the retained messages matching *all* clients' "
               "subscription filters (broker.py:599-602 iterates self._subscriptions), even to a fresh "
               "clean-session client with no subscriptions")
async def test_no_retained_messages_for_other_clients_subscriptions(broker, observe):
    """Claim 7: retained messages are only sent for the receiving client's own new subscriptions [MQTT-3.3.1-6]."""
    obs = await observe("retained_leak")
    assert obs["persistent_reconnect_got"] == []
    assert obs["fresh_clean_client_got"] == []


VIOLATIONS = {
    "subscribe_reserved_flags": "SUBSCRIBE with fixed-header flags 0b0000 is accepted and SUBACKed, connection "
                                "stays open [MQTT-3.8.1-1]: flags are never checked (SubscribePacket.__init__, "
                                "subscribe.py:67-75, checks only the type)",
    "publish_before_connect": "the first packet is parsed as CONNECT fields whatever its type (the type is "
                              "only checked after the whole body was read, connect.py:259-261): a short PUBLISH "
                              "leaves the broker waiting forever for more bytes; a long enough one reaches the "
                              "AMQTTError path (broker.py:490-495 -> 466-469) which returns without closing",
    "publish_before_connect_parsable": "a PUBLISH whose body happens to parse as CONNECT fields reaches the "
                                       "AMQTTError path (broker.py:490-495 -> 466-469), which logs and returns "
                                       "without closing the socket",
    "second_connect": None,
    "wildcard_in_publish_topic": "PublishVariableHeader raises MQTTError before the payload is read "
                                 "(publish.py:15-17); the reader loop swallows it (handler.py:532-533) and "
                                 "mis-parses the payload as the next packet: connection open but wedged",
    "garbage_after_connect": None,
    "garbage_remaining_length": "an invalid remaining length raises MQTTError (packet.py:97-99), swallowed by "
                                "the reader loop (handler.py:532-533): connection open but wedged",
    "garbage_instead_of_connect": "non-MQTT bytes are parsed as CONNECT fields (see publish_before_connect): the "
                                  "broker waits forever for the bogus lengths, or returns without closing",
}


# More malformed input, each closing the offender on Mosquitto 2.0 and on Latch's broker. The amqtt
# reasons are observations of the harness (amqtt keeps the offender connected), not source analysis.
VIOLATIONS.update({
    "wrong_protocol_level": None,          # "MQTT" with level 3: CONNACK 1, then close [MQTT-3.1.2-2]
    "unknown_protocol_name": None,         # [MQTT-3.1.2-1]
    "connect_reserved_flag": None,         # [MQTT-3.1.2-3]
    # [MQTT-3.1.3-... / 4.7.3]
    "will_topic_with_wildcard": "a will topic with a wildcard is accepted (observed: connection kept)",
    # [MQTT-1.5.3-1]
    "invalid_utf8_client_id": "client id bytes are not UTF-8 validated (observed: connection kept)",
    "publish_qos3": "PUBLISH QoS 3 is not rejected (observed: connection kept)",                  # [MQTT-3.3.1-4]
    "invalid_utf8_topic": "topic names are not UTF-8 validated (observed: connection kept)",            # [MQTT-1.5.3-1]
    # [MQTT-1.5.3-2]
    "nul_in_topic": "U+0000 in a topic name is not rejected (observed: connection kept)",
    "reserved_packet_type_15": None,       # [MQTT-2.2.1]
    # [MQTT-3.6.1-1]
    "pubrel_reserved_flags": "PUBREL fixed-header flags are not checked (observed: connection kept)",
    # [MQTT-3.10.1-1]
    "unsubscribe_reserved_flags": "UNSUBSCRIBE fixed-header flags are not checked (observed: connection kept)",
    # [MQTT-4.7.1-2]
    "subscribe_invalid_filter": "invalid topic filters are not rejected (observed: connection kept)",
    "subscribe_without_filters": "an empty SUBSCRIBE is not rejected (observed: connection kept)",     # [MQTT-3.8.3-3]
    # [MQTT-3-8.3-4]
    "subscribe_qos3": "a SUBSCRIBE QoS byte of 3 is not rejected (observed: connection kept)",
})


# nats-server 2.15.1 answers these instead of closing the connection (observed)
NATS_VIOLATIONS = {
    "invalid_utf8_client_id": "a client id that is not UTF-8 gets CONNACK 2 (identifier rejected), then the close",
    "subscribe_invalid_filter": "an invalid topic filter gets a SUBACK and the connection is kept",
}


def _violation_defects(fn):
    for name, reason in VIOLATIONS.items():
        if reason:
            fn = defect(AMQTT, f"claim 8 ({name}): {reason}", when=lambda p, n=name: p["violation"] == n)(fn)
    for name, reason in NATS_VIOLATIONS.items():
        fn = defect(NATS, f"{name}: {reason}", when=lambda p, n=name: p["violation"] == n)(fn)
    return fn


@pytest.mark.parametrize("violation", list(VIOLATIONS))
@_violation_defects
async def test_protocol_violation_disconnects_offender_only(broker, observe, violation):
    """Claim 8, section 4.8 / [MQTT-3.1.0-1,2] [MQTT-3.8.1-1] [MQTT-3.3.2-2]: the server closes the
    offending connection and keeps serving everyone else."""
    obs = await observe(violation)
    # the broker keeps serving others, whatever it did to the offender
    assert obs["existing_client_roundtrip"] is True
    assert obs["new_client_connack"] == 0 and obs["new_client_roundtrip"] is True
    if violation == "subscribe_reserved_flags":
        assert not obs["suback_received"]
    if violation == "wildcard_in_publish_topic":
        assert obs["subscriber_got_wildcard_topic"] == []
    if violation == "wrong_protocol_level":
        assert obs["connack_codes"] in ([], [1])      # refused as "unacceptable protocol version", if at all
    elif "connack_codes" in obs:
        assert obs["connack_codes"] == []             # malformed CONNECT: closed without CONNACK
    assert obs["offender_closed_after_s"] is not None, (
        f"offender still open after {sc.CLOSE_DEADLINE} s (responsive={obs['offender_still_responsive']})")


@pytest.mark.slow_conformance
@defect(AMQTT, "claim 9: no CONNECT timeout -- init_from_connect awaits ConnectPacket.from_stream with no "
               "deadline (broker_handler.py:166, broker.py:489)")
async def test_idle_socket_without_connect_is_closed(broker, observe):
    """Claim 9 (slow, opt-in): a socket that never sends CONNECT is closed 'within a reasonable amount of
    time' (section 3.1, non-normative SHOULD).  Mosquitto 2.0 treats it like keepalive=60 -> ~96 s here."""
    obs = await observe("no_connect_timeout", timeout=sc.CONNECT_TIMEOUT_DEADLINE + 30)
    assert obs["closed_after_s"] is not None, f"idle socket still open after {obs['deadline_s']} s"

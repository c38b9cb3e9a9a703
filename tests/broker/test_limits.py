"""The broker's fences over raw sockets: packet size, CONNECT timeout, keepalive, in-flight window,
queue limits and their policies (and the metric that shows them), session expiry, subscription cap.
Each runs Latch's broker in its own process with small limits (tests/conformance/latch_server.py)."""

from __future__ import annotations

import asyncio
import time

from tests.broker.brokersupport import latch_broker, rawmqtt, scenarios

ClientSet = rawmqtt.ClientSet


async def _sys_value(cs: rawmqtt.ClientSet, metric: str, want: str, timeout: float = 5.0) -> str | None:
    mon, _ = await cs.connect(f"mon-{metric}")
    await mon.subscribe(f"$SYS/broker/{metric}", 0)
    got = await mon.wait_for(lambda: [p for p in mon.publishes if p.payload == want.encode()], timeout)
    return want if got else (mon.publishes[-1].payload.decode() if mon.publishes else None)


async def test_a_packet_over_the_size_limit_closes_the_connection_before_its_body_arrives() -> None:
    async with latch_broker("max_packet_size=1024") as (host, port), ClientSet(host, port) as cs:
        bystander, _ = await cs.connect("bystander")
        await bystander.subscribe("size/t", 0)
        await bystander.publish("size/t", b"y" * 1000, 0)           # under the limit: delivered
        assert await bystander.wait_publish("size/t") is not None
        offender, _ = await cs.connect("offender")
        # announce a 2 MB PUBLISH and send only its first bytes: the header alone is enough to refuse it
        await offender.send_raw(b"\x30" + rawmqtt.encode_remaining_length(2_000_000) + b"\x00\x06size/t")
        assert await offender.wait_closed(2.0) is not None
        ok = await scenarios.bystander_ok(cs, bystander)
        assert ok == {"existing_client_roundtrip": True, "new_client_connack": 0, "new_client_roundtrip": True}


async def test_a_silent_socket_and_a_half_sent_connect_are_closed_after_the_connect_timeout() -> None:
    async with latch_broker("connect_timeout=1") as (host, port), ClientSet(host, port) as cs:
        bystander, _ = await cs.connect("bystander", keepalive=60)
        silent = await cs.open("silent")
        slow = await cs.open("slowloris")
        await slow.send_raw(rawmqtt.encode_connect("slowloris")[:5])     # a CONNECT that never completes
        for c in (silent, slow):
            closed = await c.wait_closed(4.0)
            assert closed is not None and 0.9 <= closed <= 3.0, closed
        assert await scenarios.echo_barrier(bystander)                 # an idle-but-connected client stays


async def test_keepalive_expiry_closes_the_connection_and_publishes_the_will() -> None:
    async with latch_broker() as (host, port), ClientSet(host, port) as cs:
        watcher, _ = await cs.connect("watcher")
        await watcher.subscribe("ka/will", 1)
        w = await cs.open("silent")
        await w.connect("silent", keepalive=1, will=("ka/will", b"gone", 1, False))
        await scenarios.echo_barrier(w)
        w.go_silent()
        t0 = time.monotonic()
        will = await watcher.wait_publish("ka/will", b"gone", 4.0)
        assert will is not None and 1.4 <= will.t - t0 <= 3.5, None if will is None else will.t - t0
        assert await w.wait_closed(1.0) is not None


async def test_the_in_flight_window_holds_back_messages_until_acknowledged() -> None:
    async with latch_broker("max_inflight=5") as (host, port), ClientSet(host, port) as cs:
        sub, _ = await cs.connect("sub")
        await sub.subscribe("win/t", 1)
        sub.auto_ack = False
        pub, _ = await cs.connect("pub")
        for i in range(12):
            await pub.publish("win/t", str(i), 1)
        await scenarios.echo_barrier(pub)
        await sub.wait_publishes(5, 2.0, "win/t")
        await scenarios.echo_barrier(sub)
        assert [p.payload for p in sub.publishes if p.topic == "win/t"] == [str(i).encode() for i in range(5)]
        for p in list(sub.publishes):
            if p.topic == "win/t":
                await sub.ack(p)
        got = await sub.wait_publishes(10, 2.0, "win/t")
        assert [p.payload for p in got] == [str(i).encode() for i in range(10)]


async def _fill_queue(policy: str) -> tuple[list[bytes], str | None]:
    limits = ("max_inflight=2", "max_queued=3", f"queue_policy={policy}", "sys_interval=0.2", "throttle_timeout=0")
    async with latch_broker(*limits) as (host, port), ClientSet(host, port) as cs:
        sub, _ = await cs.connect("sub")
        await sub.subscribe("ql/t", 1)
        sub.auto_ack = False
        pub, _ = await cs.connect("pub")
        for i in range(10):
            await pub.publish("ql/t", str(i), 1)
        await sub.wait_publishes(2, 2.0, "ql/t")
        dropped = await _sys_value(cs, "dropped_queue_full", "5")
        for _ in range(4):          # acknowledge everything that arrives until nothing more does
            for p in [p for p in sub.publishes if p.topic == "ql/t"]:
                await sub.ack(p)
            await scenarios.echo_barrier(sub)
        return [p.payload for p in sub.publishes if p.topic == "ql/t"], dropped


async def test_a_full_queue_drops_the_newest_by_default_and_counts_it() -> None:
    got, dropped = await _fill_queue("drop-new")
    assert got == [b"0", b"1", b"2", b"3", b"4"]       # 2 in flight + 3 queued; 5..9 dropped
    assert dropped == "5"


async def test_the_drop_oldest_policy_keeps_the_newest() -> None:
    got, dropped = await _fill_queue("drop-oldest")
    assert got == [b"0", b"1", b"7", b"8", b"9"]
    assert dropped == "5"


async def test_qos0_is_not_queued_for_an_offline_session_qos1_is() -> None:
    async with latch_broker() as (host, port), ClientSet(host, port) as cs:
        c = await cs.open("c1")
        await c.connect("offline", clean_session=False)
        await c.subscribe("off/t", 2)
        await c.disconnect()
        pub, _ = await cs.connect("pub")
        await pub.publish("off/t", "q0", 0)
        await pub.publish("off/t", "q1", 1)
        await scenarios.echo_barrier(pub)
        c2 = await cs.open("c2")
        ack = await c2.connect("offline", clean_session=False)
        await scenarios.echo_barrier(c2)
        assert ack.session_present
        assert [(p.payload, p.qos) for p in c2.publishes if p.topic == "off/t"] == [(b"q1", 1)]


async def test_a_persistent_session_expires_after_the_configured_time() -> None:
    async with latch_broker("session_expiry=1") as (host, port), ClientSet(host, port) as cs:
        c = await cs.open("c1")
        await c.connect("expiring", clean_session=False)
        await c.subscribe("exp/t", 1)
        await c.disconnect()
        again = await cs.open("c2")
        assert (await again.connect("expiring", clean_session=False)).session_present   # within the expiry
        await again.disconnect()
        await asyncio.sleep(1.3)    # the expiry is the thing under test: there is no event to wait for
        late = await cs.open("c3")
        assert not (await late.connect("expiring", clean_session=False)).session_present


async def test_subscriptions_beyond_the_cap_are_refused_in_the_suback() -> None:
    async with latch_broker("max_subscriptions=2") as (host, port), ClientSet(host, port) as cs:
        c, _ = await cs.connect("greedy")
        ack = await c.subscribe([("a/1", 1), ("a/2", 1), ("a/3", 1), ("a/1", 0)])
        assert ack.return_codes == [1, 1, 0x80, 0]      # re-subscribing an existing filter is not a new one


async def test_a_publisher_outrunning_an_online_subscriber_is_slowed_down_not_dropped() -> None:
    """Flow control: past half of an online session's queue its publishers are not read until the
    queue is down to a quarter; nothing is dropped. A consumer that does not drain in time
    (throttle_timeout) releases them and its queue policy applies."""
    limits = ("max_inflight=2", "max_queued=8", "throttle_timeout=1", "sys_interval=0.2")
    async with latch_broker(*limits) as (host, port), ClientSet(host, port) as cs:
        sub, _ = await cs.connect("slow-sub")
        await sub.subscribe("fc/t", 1)
        sub.auto_ack = False
        pub, _ = await cs.connect("fast-pub")
        for i in range(6):                                   # 2 in flight + 4 queued: not throttled yet
            await pub.publish("fc/t", str(i), 1)
        await pub.send_raw(rawmqtt.encode_publish("fc/t", b"6", qos=1, packet_id=100)     # 5 queued > 8/2
                           + rawmqtt.encode_publish("fc/t", b"7", qos=1, packet_id=101))  # same read: held too
        await pub.wait_for(lambda: any(p.packet_id == 100 for p in pub.received), 2.0)
        assert not any(p.packet_id == 101 for p in pub.received)   # not read: held back, not dropped
        for _ in range(5):                                       # the subscriber catches up ...
            for p in [p for p in sub.publishes if p.topic == "fc/t"]:
                await sub.ack(p)
            await sub.wait_publishes(len(sub.publishes) + 1, 0.5, "fc/t")
        assert await pub.wait_for(lambda: any(p.packet_id == 101 for p in pub.received), 2.0)  # ... and resumes it
        got = await sub.wait_publishes(8, 2.0, "fc/t")
        assert sorted({p.payload for p in got}) == [str(i).encode() for i in range(8)]
        assert await _sys_value(cs, "dropped_queue_full", "0") == "0"

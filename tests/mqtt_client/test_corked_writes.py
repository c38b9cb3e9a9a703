"""mqtt_client's CorkedTransport: what the client writes during one loop iteration leaves in one write, in
order, and a clean disconnect still sends its DISCONNECT (no will fires). Against Latch's broker process."""

from __future__ import annotations

import asyncio

from mqtt_client import CorkedTransport, MqttClient, Will
from tests.broker.brokersupport import latch_broker


async def test_packets_of_one_loop_iteration_leave_in_one_write_in_order() -> None:
    got: list[bytes] = []
    all_in = asyncio.Event()

    async def handler(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        got.append(payload)
        if len(got) == 50:
            all_in.set()

    async with latch_broker() as (host, port):
        sub = MqttClient("sub-1", handler=handler, clean_session=True)
        pub = MqttClient("pub-1", clean_session=True)
        await sub.connect(host, port)
        await sub.subscribe([("t/order", 1)])
        await pub.connect(host, port)
        try:
            corked = pub._client._connection._protocol._transport
            assert isinstance(corked, CorkedTransport)
            writes: list[int] = []
            raw_write = corked.transport.write
            corked.transport.write = lambda data: (writes.append(len(data)), raw_write(data))[1]  # type: ignore[method-assign]
            for i in range(50):   # one loop iteration: no await between them
                pub.publish("t/order", str(i).encode(), qos=1)
            await asyncio.wait_for(all_in.wait(), 10)
            assert got == [str(i).encode() for i in range(50)]
            assert len(writes) == 1   # fifty PUBLISH packets, one send
        finally:
            await pub.disconnect()
            await sub.disconnect()


async def test_a_clean_disconnect_still_sends_disconnect_so_no_will_fires() -> None:
    wills: list[bytes] = []
    other, marker = asyncio.Event(), asyncio.Event()

    async def handler(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        (wills if topic == "t/will" else []).append(payload)
        if topic == "t/after":
            other.set()
        if topic == "t/marker":
            marker.set()

    async with latch_broker() as (host, port):
        watcher = MqttClient("watcher", handler=handler, clean_session=True)
        await watcher.connect(host, port)
        await watcher.subscribe([("t/will", 1), ("t/after", 1), ("t/marker", 1)])
        client = MqttClient("leaver", clean_session=True, will=Will("t/will", b"gone", qos=1, retain=False))
        await client.connect(host, port)
        client.publish("t/after", b"last", qos=1)   # corked with the DISCONNECT that follows
        await client.disconnect()
        await asyncio.wait_for(other.wait(), 10)      # what was corked before the DISCONNECT arrived ...
        probe = MqttClient("probe", clean_session=True)   # a will would reach the watcher before this marker
        await probe.connect(host, port)
        probe.publish("t/marker", b"m", qos=1)
        await asyncio.wait_for(marker.wait(), 10)
        await probe.disconnect()
        await watcher.disconnect()
    assert wills == []

"""Drives firmware.mqtt.MQTTClient under MicroPython with no memory for one packet: `micropython
mqtt_nomem_probe.py PORT`. Building the first QoS 1 packet and one QoS 0 packet raises MemoryError (what a
fragmented 64 KiB heap did in CI); the link must stay up and the QoS 1 message go out on a later tick."""
import asyncio
import sys

import firmware.mqtt as mqtt

real = mqtt._publish
fail = [2]   # the next two packets built: the QoS 1 message, then the QoS 0 one


def starved(*a):
    if fail[0]:
        fail[0] -= 1
        raise MemoryError("memory allocation failed, allocating 200 bytes")
    return real(*a)


mqtt._publish = starved
c = mqtt.MQTTClient("dev-1", "127.0.0.1", int(sys.argv[1]), "dev-1", "pw", 5, None, timeout=2000)


async def main():
    await c.connect()
    await c.publish("t/ack", b"succeeded", 1)
    await c.publish("t/note", b"qos0", 0)
    print("AFTER PUBLISH connected=%s pending=%d" % (c.connected, len(c.pending)))
    try:
        await asyncio.wait_for_ms(c.loop(50), 3000)
    except Exception as e:
        print("LOOP ENDED", repr(e))
    print("END connected=%s pending=%d" % (c.connected, len(c.pending)))


asyncio.run(main())

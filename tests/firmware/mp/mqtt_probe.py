"""Drives firmware.mqtt.MQTTClient under MicroPython against the fake broker of
test_fw_mqtt.py: `micropython mqtt_probe.py PORT CLOSED_PORT`."""
import asyncio
import sys

from firmware.mqtt import MQTTClient, RefusedError

port = int(sys.argv[1])
closed_port = int(sys.argv[2])


async def handler(topic, payload, retained):
    print("HANDLE", topic, bytes(payload).decode(), retained)
    await asyncio.sleep_ms(100)  # persisting, say
    # the broker must see this before the PUBACK of the message being handled
    await c.publish("t/handled", b"done:" + payload, 0)


c = MQTTClient("dev-1", "127.0.0.1", port, "dev-1", "pw", 1, ("t/will", b"offline", 1, True), timeout=2000)
c.topics.append("t/cmd")
c.handler = handler


async def main():
    for attempt in range(3):
        try:
            sp = await c.connect()
            print("CONNECTED", sp)
            await c.publish("t/up", b"hello%d" % attempt, 1)
            await c.loop(50)
        except RefusedError as e:
            print("REFUSED", e)
        except Exception as e:
            print("DOWN", repr(e))
        c.close()
    c.port = closed_port
    try:
        await c.connect()
    except OSError as e:
        print("CLOSED PORT", e.errno)
    print("END pending=%d" % len(c.pending))


asyncio.run(main())

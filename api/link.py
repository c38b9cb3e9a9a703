"""The API's own MQTT connection: the service identity, subscribed to every device's uplink."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from mqtt_client import Handler, MqttClient
from protocol import topics

log = logging.getLogger("latch.link")

UPLINK_KINDS = (topics.ACK, topics.STATE, topics.PRESENCE, topics.TELEMETRY, topics.SYNC)
RETAINED_KINDS = (topics.PRESENCE, topics.STATE)


class BrokerLink:
    """Publishes commands and feeds every device message to `handler`."""

    def __init__(self, client_id: str, username: str, password: str, handler: Handler, *,
                 ingest: bool = True, share_group: str | None = None, max_packet_size: int | None = None,
                 reconnect_delay: float = 0.25) -> None:
        """`ingest`: subscribe to the devices' uplink (False: an HTTP-only replica that publishes
        commands and learns outcomes from the database). `share_group`: subscribe as
        `$share/<group>/...` so a broker that supports shared subscriptions (Mosquitto, EMQX, HiveMQ)
        gives each device message to one replica of the group instead of to all of them; correct
        either way, since every state change is a conditional UPDATE. `max_packet_size`: the broker's
        packet limit; a bigger publish is refused here rather than sent to close the connection.
        `reconnect_delay`: between attempts while the broker is away — short, so an outage costs
        riders little more than the outage (one TCP connect per attempt is all it costs)."""
        self.ingest = ingest
        self.share_group = share_group
        # a persistent session keeps acks queued across a restart; a non-ingesting link needs none
        self.client = MqttClient(client_id, username=username, password=password, clean_session=not ingest,
                                 handler=handler, max_packet_size=max_packet_size,
                                 reconnect_delay=reconnect_delay, on_dropped=self._dropped)
        # a message the link gave up on (mqtt_client drops it after repeated replays): its command fails
        self.on_dropped: list[Callable[[str, bytes], None]] = []
        # called after every reconnect (not the first connect): commands queued while the link was down wait
        # for it (api/app.py dispatches them)
        self.on_reconnected: list[Callable[[], None]] = []
        self.client.on_connect_callbacks.append(self._on_connect)
        self._host = ""
        self._port = 0
        self._connected_before = False

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                    fallbacks: list[tuple[str, int]] | None = None) -> None:
        """Connect (over TLS when `tls` is given: an mqtts:// broker) and subscribe to every uplink.
        `fallbacks`: the broker's other nodes (mqtt_client moves there when its node goes away)."""
        self._host, self._port = host, port
        await self.client.connect(host, port, tls=tls if tls is not None else False, fallbacks=fallbacks or ())
        await self._subscribe()

    def _dropped(self, topic: str, payload: bytes) -> None:
        for cb in self.on_dropped:
            cb(topic, payload)

    def _on_connect(self, session_present: bool) -> None:
        first, self._connected_before = not self._connected_before, True
        if not first:
            for cb in self.on_reconnected:
                cb()
        if session_present or not self.ingest:   # a session kept (or none asked for: nothing to subscribe)
            return
        if first:   # start() subscribes next; an earlier session is not expected on a first start
            log.info("subscribing to device topics")
            return
        # reconnected, and the persistent session it had is gone (the broker restarted without its store,
        # or the session expired): the subscriptions are made again; device answers sent meanwhile were lost
        log.warning("the broker lost the API's MQTT session: subscribing to device topics again")
        asyncio.get_running_loop().create_task(self._subscribe())

    async def _subscribe(self) -> None:
        if not self.ingest:
            return
        # only acks are shared: presence and state go to every replica, and the lease holder applies them
        # (api/commands/ingest.py), so one process sees each device's reports in order
        prefix = f"$share/{self.share_group}/" if self.share_group else ""
        granted = await self.client.subscribe([((prefix if k == topics.ACK else "") + topics.all_devices_filter(k), 1)
                                               for k in UPLINK_KINDS])
        if any(q == 0x80 for q in granted):
            raise RuntimeError(f"broker refused the API's subscriptions: {granted}")

    async def refresh_retained(self) -> None:
        """Subscribe again to the retained uplink (presence, state): the broker re-sends every retained
        message, so a replica that just took over applying them starts from each device's latest."""
        if self.ingest and self.client.is_connected:
            await self.client.subscribe([(topics.all_devices_filter(k), 1) for k in RETAINED_KINDS])

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    async def room(self, limit: int) -> None:
        """Wait until fewer than `limit` of this link's messages are unacknowledged (mqtt_client)."""
        await self.client.room(limit)

    async def stop(self) -> None:
        await self.client.disconnect()

"""Builds, starts and stops the embedded amqtt broker with Latch's plugins."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.session import Session

from broker.credentials import CredentialStore

log = logging.getLogger("latch.broker")

# The amqtt release whose internals broker/ relies on (private attributes,
# method names); tests/broker/test_amqtt_pin.py fails loudly on any other.
AMQTT_VERSION = "0.12.1"


@dataclass
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883                  # 0 = an ephemeral port
    ws_port: int | None = None        # MQTT over WebSocket, off unless set
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int | None = None
    allow_anonymous: bool = False
    extra_plugins: dict[str, Any] = field(default_factory=dict)


class LatchBroker(Broker):
    """amqtt's Broker with two defects mended that would break Latch's promises.

    1. Retained messages leak: as shipped, a reconnecting persistent client is
       sent the retained messages of *every* subscription filter on the broker
       (other clients' included), and that path skips the topic ACL. Here
       retained messages go only through the session's own subscriptions, at
       the session's QoS, and each one passes the RECEIVE fence.
    2. Messages are lost while clients subscribe: `_run_broadcast` iterates the
       live subscription dict across an `await`, so a SUBSCRIBE arriving
       meanwhile raises "dictionary changed size during iteration" and the
       message being broadcast is dropped. Here it iterates a snapshot.
    """

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for k_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, k_filter):
                continue
            for target_session, sub_qos in list(subscriptions):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                state = target_session.transitions.state
                if state != "connected":
                    if not target_session.clean_session and qos in (QOS_1, QOS_2) and not target_session.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(asyncio.ensure_future(
                        handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)))

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, _ = subscription
        own = [qos for s, qos in self._subscriptions.get(topic_filter, []) if s.client_id == session.client_id]
        if not own:
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            qos = min(own[0], retained.qos if retained.qos is not None else own[0])
            sends.append(handler.mqtt_publish(retained.topic, retained.data, qos, retain=True))
        if sends:
            await asyncio.gather(*sends)


def broker_config(options: BrokerOptions, store: CredentialStore) -> dict[str, Any]:
    listeners: dict[str, Any] = {
        "default": {"type": "tcp", "bind": f"{options.host}:{options.port}"},
    }
    if options.ws_port is not None:
        listeners["ws"] = {"type": "ws", "bind": f"{options.host}:{options.ws_port}"}
    if options.tls_cert is not None or options.tls_key is not None:
        if options.tls_cert is None or options.tls_key is None:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        listeners["tls"] = {
            "type": "tcp", "bind": f"{options.host}:{options.tls_port or 8883}", "ssl": True,
            "certfile": str(options.tls_cert), "keyfile": str(options.tls_key),
        }
    plugins: dict[str, Any] = {
        "broker.plugins.LatchAuthPlugin": {"store": store, "allow_anonymous": options.allow_anonymous},
        "broker.plugins.LatchTopicPlugin": {},
    }
    plugins.update(options.extra_plugins)
    return {"listeners": listeners, "plugins": plugins}


class EmbeddedBroker:
    """An amqtt broker running in this event loop; ports are known after start()."""

    def __init__(self, options: BrokerOptions, store: CredentialStore) -> None:
        self.options = options
        self._broker = LatchBroker(broker_config(options, store))
        self.ports: dict[str, int] = {}

    @property
    def port(self) -> int:
        return self.ports["default"]

    async def start(self) -> None:
        await self._broker.start()
        for name, server in self._broker._servers.items():  # amqtt keeps bound servers here
            sockets = getattr(server.instance, "sockets", None)
            if sockets:
                self.ports[name] = sockets[0].getsockname()[1]
        log.info("MQTT broker listening: %s", ", ".join(f"{k}={v}" for k, v in self.ports.items()))

    async def stop(self) -> None:
        await self._broker.shutdown()

    @property
    def amqtt(self) -> Broker:
        return self._broker

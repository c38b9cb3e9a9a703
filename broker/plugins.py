"""amqtt plugins: authentication against Latch's registry and the per-device topic fence.

amqtt builds plugins from a dotted path and a config dict, so the live
credential store is handed over through `Config.store` (any object).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker.identity import Identity, Role
from protocol import topics

IDENTITY_KEY = "latch_identity"


def identity_of(session: Session | None) -> Identity | None:
    if session is None:
        return None
    identity = session.attributes.get(IDENTITY_KEY)
    return identity if isinstance(identity, Identity) else None


class LatchAuthPlugin(BaseAuthPlugin):
    """Accepts a device whose username is its id and whose password matches the registry."""

    @dataclass
    class Config:
        store: Any = None
        allow_anonymous: bool = False

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        if self.config.store is None:
            raise ValueError("LatchAuthPlugin needs a credential store in its config")

    async def authenticate(self, *, session: Session) -> bool | None:
        identity = await self.config.store.check(session.username, session.password)
        if identity is None and self.config.allow_anonymous and not session.username:
            identity = Identity(Role.ANONYMOUS, session.client_id or "")
        if identity is None:
            self.context.logger.info("refused MQTT login for username %r", session.username)
            return False
        if identity.role is Role.DEVICE and session.client_id != identity.name:
            # one identity, one session: a device must use its id as client id
            self.context.logger.info("refused device %s: client id %r must equal the device id",
                                     identity.name, session.client_id)
            return False
        session.attributes[IDENTITY_KEY] = identity
        return True


class LatchTopicPlugin(BaseTopicPlugin):
    """The fence: a device sees only its own command topic and writes only its own uplink topics."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        identity = identity_of(session)
        if identity is None or topic is None:
            return False
        if identity.role is Role.SERVICE:
            return True
        if identity.role is Role.DEVICE:
            if action == Action.PUBLISH:
                return topics.device_may_publish(identity.name, topic)
            if action == Action.SUBSCRIBE:
                return topics.device_may_subscribe(identity.name, topic)
            return topics.device_may_receive(identity.name, topic)
        # anonymous (development only): anything outside Latch's device topics
        return not topic.startswith(topics.PREFIX) and not topic.startswith("latch/")

"""Who may connect (the gatekeeper) and what they may publish, subscribe to and receive (the fence).

* A device logs in with its id as username *and* client id and the password
  from the registry, or with a TLS client certificate whose subject CN is its
  id (signed by the CA given with ``--tls-client-ca``). It may publish only on
  its own uplink topics, subscribe only to its own command topic, and is
  delivered nothing else — the last check runs on *every* delivery,
  retained and queued ones included.
* A user's app (username = user id, password = the user's access token)
  may subscribe only to its own events topic, is delivered nothing else, and
  publishes nothing.
* The service identity (the API) may do everything.
* Anonymous clients (no username, only with ``--allow-anonymous``) stay off
  Latch's topics (``latch/...``) entirely.

Sessions belong to an identity: a persistent session is resumed (or a live
connection taken over) only by the same identity; an authenticated identity
may discard a session an anonymous client left under its client id, never the
other way round (otherwise an anonymous client could squat a device's id or
kick a device off the broker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.codec import ACCEPTED, REFUSED_BAD_CREDENTIALS, REFUSED_NOT_AUTHORIZED
from broker.credentials import CredentialStore
from broker.identity import Identity, Role
from protocol import topics

log = logging.getLogger("latch.broker")

Refusal = int


class Gatekeeper:
    def __init__(self, credentials: CredentialStore | None, allow_anonymous: bool) -> None:
        self.credentials = credentials
        self.allow_anonymous = allow_anonymous

    def check_now(self, client_id: str, username: str | None, password: bytes | None,
                  cert_name: str | None) -> Identity | Refusal | None:
        """The answer when it needs no lookup; None: call `check` (it does)."""
        if username is None and cert_name is None:
            if self.allow_anonymous:
                return Identity(Role.ANONYMOUS, "")
            return REFUSED_NOT_AUTHORIZED
        if self.credentials is None:
            return REFUSED_BAD_CREDENTIALS
        return None

    async def check(self, client_id: str, username: str | None, password: bytes | None,
                    cert_name: str | None) -> Identity | Refusal:
        assert self.credentials is not None
        if cert_name is not None and (username is None or username == cert_name):
            by_cert = getattr(self.credentials, "check_certificate", None)
            identity = await by_cert(cert_name) if by_cert is not None else None
        else:
            pw = None
            if password is not None:
                try:
                    pw = password.decode("utf-8")
                except UnicodeDecodeError:
                    return REFUSED_BAD_CREDENTIALS
            identity = await self.credentials.check(username, pw)
        if identity is None:
            log.info("refused MQTT login for username %r (certificate %r)", username, cert_name)
            return REFUSED_BAD_CREDENTIALS
        if identity.role is Role.DEVICE and client_id != identity.name:
            log.info("refused device %s: client id %r must equal the device id", identity.name, client_id)
            return REFUSED_NOT_AUTHORIZED
        if identity.role is _USER and not (client_id == identity.name or client_id.startswith(identity.name + "-")):
            # a user's app may not squat another client's id (a lock's, say): its own id, or '<user id>-...'
            log.info("refused user %s: client id %r must be the user id or start with it and '-'",
                     identity.name, client_id)
            return REFUSED_NOT_AUTHORIZED
        return identity


def may_own(old: Identity | None, new: Identity) -> bool | None:
    """May `new` resume a session owned by `old`? True: resume; None: discard it first; False: refuse."""
    if old is None or old == new:
        return True
    if old.role is Role.ANONYMOUS and new.role is not Role.ANONYMOUS:
        return None
    return False


_USER = getattr(Role, "USER", None)


def _deny(topic: str) -> bool:
    return False


def _off_latch(topic: str) -> bool:
    return not topic.startswith("latch/")


class TopicFence:
    """The per-identity topic ACL."""

    def may_publish(self, identity: Identity, topic: str) -> bool:
        role = identity.role
        if role is Role.SERVICE:
            return True
        if role is Role.DEVICE:
            return topics.device_may_publish(identity.name, topic)
        if role is _USER:
            return False
        return _off_latch(topic)

    def may_subscribe(self, identity: Identity, topic_filter: str) -> bool:
        role = identity.role
        if role is Role.SERVICE:
            return True
        if role is Role.DEVICE:
            return topics.device_may_subscribe(identity.name, topic_filter)
        if role is _USER:
            return topics.user_may_subscribe(identity.name, topic_filter)
        # anonymous: not on Latch's topics; a '#' or '+/...' filter is allowed, the delivery
        # check keeps Latch's messages out of it
        return _off_latch(topic_filter)

    def receive_check(self, identity: Identity) -> Callable[[str], bool] | None:
        """A predicate every delivery to this identity must pass; None: everything passes."""
        role = identity.role
        if role is Role.SERVICE:
            return None
        if role is Role.DEVICE:
            own = topics.PREFIX + identity.name + "/" + topics.CMD
            return own.__eq__
        if role is _USER:
            own = topics.user_events_topic(identity.name) if topics.valid_device_id(identity.name) else ""
            return own.__eq__ if own else _deny
        return _off_latch


__all__ = ["ACCEPTED", "Gatekeeper", "TopicFence", "may_own"]

"""Who may log in to an external MQTT broker, and what they may do there: the decisions behind
Mosquitto's generated ACL file (api/registry/mosquitto_config.py) and the HTTP hooks EMQX and VerneMQ call
(api/registry/broker_auth_routes.py).

There is one truth, the one Latch's own broker runs: logins go through broker/fence.py's
``Gatekeeper`` over api/registry/credentials.py's ``SqlCredentialStore`` (device secrets from the
registry, revoked devices refused, the service secret, riders' access tokens; a device's client id
must be its id), and per-topic answers through broker/fence.py's ``TopicFence``. Where a broker
wants the rules as a list instead of asking per topic (EMQX's ``acl`` in the authentication
answer, Mosquitto's ``acl_file``), ``grants()`` enumerates them from the same constants
protocol/topics.py gives the fence; tests/external/test_acl_agreement.py checks the list against
``TopicFence`` topic by topic.

One deliberate narrowing: on Latch's own broker the service identity (the API) may do everything;
on a shared external broker it gets Latch's topics only (``latch/v1/#``).

EMQX and VerneMQ formats (see docs/external-brokers.md for where they are documented):

* EMQX 5.8+ HTTP authentication: POST ``{"username", "password", "clientid"}`` →
  200 ``{"result": "allow"|"deny", "is_superuser": false, "acl": [...]}``. A 4xx/5xx answer makes
  EMQX *ignore* this authenticator and go on down its chain, so every refusal is an explicit 200 deny.
* EMQX HTTP authorization: POST ``{"username", "clientid", "topic", "action"}`` →
  200 ``{"result": "allow"|"deny"}``.
* VerneMQ webhooks (one URL, the hook named by the ``vernemq-hook`` header): ``auth_on_register``,
  ``auth_on_subscribe``, ``auth_on_publish`` and their ``_m5`` twins → ``{"result": "ok"}`` or
  ``{"result": {"error": "..."}}``; a partly refused SUBSCRIBE keeps its allowed topics and gets
  QoS 128 (``_m5``: 135, "not authorized") for the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from api import tokens
from api.db import Database
from api.registry.credentials import SqlCredentialStore
from api.riders.models import User
from broker.fence import Gatekeeper, TopicFence
from broker.identity import SERVICE_USERNAME, Identity, Role
from protocol import topics

log = logging.getLogger("latch.broker_auth")

PUBLISH = "publish"
SUBSCRIBE = "subscribe"
ALL = "all"

SERVICE_FILTER = "latch/v1/#"      # the service identity's reach on an external broker

FENCE = TopicFence()


@dataclass(frozen=True, slots=True)
class Grant:
    """One thing an identity may do: `action` (publish / subscribe / all) on `topic` (exact, except
    the service's ``latch/v1/#``)."""

    action: str
    topic: str


def device_grants(name: str) -> list[Grant]:
    """A device's grants; `name` is its id, or a broker's placeholder for it (Mosquitto's ``%u``)."""
    base = topics.PREFIX + name + "/"
    return ([Grant(PUBLISH, base + kind) for kind in topics.DEVICE_PUBLISH_KINDS]
            + [Grant(SUBSCRIBE, base + kind) for kind in topics.DEVICE_SUBSCRIBE_KINDS])


def grants(identity: Identity) -> list[Grant]:
    """Everything `identity` may do on an external broker, as a list; anything not listed is refused."""
    if identity.role is Role.SERVICE:
        return [Grant(ALL, SERVICE_FILTER)]
    if not topics.valid_device_id(identity.name):
        return []
    if identity.role is Role.DEVICE:
        return device_grants(identity.name)
    if identity.role is Role.USER:
        return [Grant(SUBSCRIBE, topics.user_events_topic(identity.name))]
    return []


def _in_latch(topic: str) -> bool:
    return topic == "latch/v1" or topic.startswith("latch/v1/")


def may_publish(identity: Identity, topic: str) -> bool:
    if identity.role is Role.SERVICE:
        return _in_latch(topic)
    return identity.role is not Role.ANONYMOUS and FENCE.may_publish(identity, topic)


def may_subscribe(identity: Identity, topic_filter: str) -> bool:
    if identity.role is Role.SERVICE:
        return _in_latch(topic_filter)
    return identity.role is not Role.ANONYMOUS and FENCE.may_subscribe(identity, topic_filter)


# EMQX's '#' does not match topics starting with '$' (emqx_topic:match), and `$delayed/<s>/<topic>`
# publishes to <topic> later: the closing rules refuse those explicitly, whatever `no_match` says.
EMQX_DENY_REST = [{"permission": "deny", "action": ALL, "topic": t} for t in ("#", "$SYS/#", "$delayed/#")]


def emqx_acl(identity: Identity) -> list[dict[str, Any]]:
    """EMQX's ACL list (the "new format" of EMQX 5.5+, accepted in HTTP authentication answers since 5.8):
    exact topics as ``eq <topic>`` (no wildcard or placeholder reading), then deny everything else."""
    rules: list[dict[str, Any]] = []
    for g in grants(identity):
        wildcard = "+" in g.topic or "#" in g.topic
        rules.append({"permission": "allow", "action": g.action, "topic": g.topic if wildcard else "eq " + g.topic})
    return rules + EMQX_DENY_REST


def _str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


class BrokerAuth:
    """The answers for EMQX's and VerneMQ's HTTP hooks, from the registry and the fence."""

    def __init__(self, db: Database, service_secret: str, jwt_secret: str | None) -> None:
        self.credentials = SqlCredentialStore(db, service_secret, jwt_secret)
        self.gatekeeper = Gatekeeper(self.credentials, allow_anonymous=False)
        self._db = db
        self._jwt_secret = jwt_secret

    # ---- who is it ----------------------------------------------------------------

    async def login(self, client_id: str | None, username: str | None, password: str | None) -> Identity | None:
        """The identity a CONNECT with these credentials gets on Latch's own broker, or None (refused)."""
        if not username or client_id is None or password is None:
            return None
        secret = password.encode()
        answer = self.gatekeeper.check_now(client_id, username, secret, None)
        if answer is None:
            answer = await self.gatekeeper.check(client_id, username, secret, None)
        if not isinstance(answer, Identity) or answer.role is Role.ANONYMOUS:
            return None
        return answer

    async def identify(self, username: str | None, client_id: str | None) -> Identity | None:
        """Who a connection is when the broker asks about a topic (it sends no password: it checked that
        at login). The service by its name; a device that exists and is not revoked; a user that exists.
        The client-id rule is the gatekeeper's: a device's is its id, a user's is its id or starts with it
        and '-'."""
        if not username or client_id is None:
            return None
        if username == SERVICE_USERNAME:
            return Identity(Role.SERVICE, username)
        if not topics.valid_device_id(username):
            return None
        # the registry's "exists and not revoked" check, as for a client certificate naming the device
        device = await self.credentials.check_certificate(username)
        user = await self._user_exists(username)
        if device is not None and user:
            log.warning("%r is both a device id and a user id: refused on external brokers", username)
            return None
        if device is not None:
            return device if client_id == username else None
        if user and (client_id == username or client_id.startswith(username + "-")):
            return Identity(Role.USER, username)
        return None

    async def _user_exists(self, user_id: str) -> bool:
        return await self._db.read(lambda s: s.get(User, user_id) is not None)

    # ---- EMQX ---------------------------------------------------------------------

    async def emqx_authenticate(self, body: Any) -> dict[str, Any]:
        """EMQX 5.8+ HTTP authentication. Body (the template in docs/external-brokers.md):
        ``{"username": "${username}", "password": "${password}", "clientid": "${clientid}"}``."""
        deny = {"result": "deny", "is_superuser": False, "acl": EMQX_DENY_REST}
        if not isinstance(body, dict):
            return deny
        username, password, client_id = _str(body, "username"), _str(body, "password"), _str(body, "clientid")
        identity = await self.login(client_id, username, password)
        if identity is None:
            log.info("EMQX login refused for username %r (client id %r)", username, client_id)
            return deny
        answer: dict[str, Any] = {"result": "allow", "is_superuser": False, "acl": emqx_acl(identity)}
        if identity.role is Role.USER and self._jwt_secret is not None and password is not None:
            # EMQX disconnects the rider's app when its token expires (it must log in again)
            try:
                answer["expire_at"] = tokens.verify(self._jwt_secret, password).expires_at
            except tokens.TokenError:
                return deny
        return answer

    async def emqx_authorize(self, body: Any) -> dict[str, str]:
        """EMQX HTTP authorization. Body: ``{"username": "${username}", "clientid": "${clientid}",
        "topic": "${topic}", "action": "${action}"}``."""
        if not isinstance(body, dict):
            return {"result": "deny"}
        topic, action = _str(body, "topic"), _str(body, "action")
        identity = await self.identify(_str(body, "username"), _str(body, "clientid"))
        if identity is None or not topic or action not in (PUBLISH, SUBSCRIBE):
            return {"result": "deny"}
        allowed = may_publish(identity, topic) if action == PUBLISH else may_subscribe(identity, topic)
        return {"result": "allow" if allowed else "deny"}

    # ---- VerneMQ ------------------------------------------------------------------

    async def vernemq(self, hook: str, body: Any) -> dict[str, Any]:
        """The answer to one VerneMQ webhook call (`hook` from the ``vernemq-hook`` header)."""
        if not isinstance(body, dict):
            return _vmq_error("malformed request")
        if hook in ("auth_on_register", "auth_on_register_m5"):
            identity = await self.login(_str(body, "client_id"), _str(body, "username"), _str(body, "password"))
            if identity is None:
                log.info("VerneMQ login refused for username %r", body.get("username"))
                return _vmq_error("not_allowed")
            return {"result": "ok"}
        if hook in ("auth_on_publish", "auth_on_publish_m5"):
            identity = await self.identify(_str(body, "username"), _str(body, "client_id"))
            topic = _str(body, "topic")
            if identity is None or not topic or not may_publish(identity, topic):
                return _vmq_error("not_allowed")
            return {"result": "ok"}
        if hook in ("auth_on_subscribe", "auth_on_subscribe_m5"):
            return await self._vernemq_subscribe(hook, body)
        return _vmq_error(f"Latch does not answer the {hook!r} hook (register auth_on_register, "
                          "auth_on_subscribe and auth_on_publish, or their _m5 twins)")

    async def _vernemq_subscribe(self, hook: str, body: dict[str, Any]) -> dict[str, Any]:
        identity = await self.identify(_str(body, "username"), _str(body, "client_id"))
        wanted = body.get("topics")
        if identity is None or not isinstance(wanted, list) or not wanted:
            return _vmq_error("not_allowed")
        refused_qos = 135 if hook.endswith("_m5") else 128     # MQTT 5 "not authorized"; 3.1.1 "failure"
        answer: list[dict[str, Any]] = []
        allowed_any, refused_any = False, False
        for entry in wanted:
            topic = _str(entry, "topic") if isinstance(entry, dict) else None
            qos = entry.get("qos") if isinstance(entry, dict) else None
            if topic is None or qos not in (0, 1, 2):
                return _vmq_error("malformed topics")
            ok = may_subscribe(identity, topic)
            allowed_any |= ok
            refused_any |= not ok
            answer.append({**entry, "qos": qos if ok else refused_qos})   # keeps _m5's subscription options
        if not allowed_any:
            return _vmq_error("not_allowed")
        if not refused_any:
            return {"result": "ok"}
        # the rewritten topic list: top-level for auth_on_subscribe, under "modifiers" for the _m5 hook
        if hook.endswith("_m5"):
            return {"result": "ok", "modifiers": {"topics": answer}}
        return {"result": "ok", "topics": answer}


def _vmq_error(reason: str) -> dict[str, Any]:
    return {"result": {"error": reason}}

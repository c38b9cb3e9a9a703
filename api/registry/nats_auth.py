"""A NATS cluster as Latch's MQTT broker: this API answers the cluster's auth callout, and disconnects a
revoked or rotated device there (LATCH_NATS_AUTH_URL; the cluster's files: latch/nats_config.py).

Why a callout and not users written into the cluster's configuration (as Latch does for Mosquitto): Latch
keeps each device's MQTT secret only as a PBKDF2 hash (Mosquitto's ``$7$``), and nats-server reads bcrypt
hashes only, so generated NATS users would need every device's secret rotated; and every registration,
rotation and revocation would be a configuration reload on every node. With the callout, nats-server asks
Latch at each login; the answer is the registry's as it is now, and nothing is reloaded.

    MQTT CONNECT (username, password, client id) ─▶ a NATS node ─▶ $SYS.REQ.USER.AUTH (signed request JWT)
        ─▶ here: api/registry/broker_auth.py BrokerAuth.login — the gatekeeper of Latch's own broker, over the registry
        ◀─ a user JWT signed by the issuer (LATCH_NATS_ISSUER_SEED): account LATCH, and exactly the subjects
           api/registry/broker_auth.py grants() lists, as NATS subjects
           (``latch/v1/d/bike-1/cmd`` → ``latch.v1.d.bike-1.cmd``)

- A device may connect over MQTT only, with its id as client id; it may publish its uplink topics and
  subscribe to its command topic, nothing else (nats-server refuses anything else: a SUBACK 0x80, a dropped
  publish). A rider's app subscribes to its own events topic; its token's expiry is the JWT's, so the node
  disconnects it when the token runs out. The service identity (the API) gets ``latch.v1.>``.
- ``latch-sys`` (this API's second connection, with the callout's own secret) is placed in the system
  account, for two requests only: ``$SYS.REQ.SERVER.PING.CONNZ`` (which node holds a device's connection)
  and ``$SYS.REQ.SERVER.<id>.KICK`` (close it). A revocation or rotation kicks the device's connections on
  every node; its reconnect then meets the callout, which refuses the old secret.
- Every API replica subscribes in one queue group, from two connections to two different nodes: one
  subscription answers each login, and the death of one node leaves the other answering. With no API up, new logins
  fail (connections already made stay up); run at least two replicas where that matters.
- Refusals are answered (not left to time out), so a wrong secret costs the device one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
import orjson

from api import tokens
from api.db import Database
from api.registry import nats_jwt
from api.registry.broker_auth import ALL, PUBLISH, SUBSCRIBE, BrokerAuth, grants
from api.registry.devices import REVOKED, ROTATED
from broker.identity import SERVICE_USERNAME, Identity, Role
from foundation.settings import Settings

log = logging.getLogger("latch.nats_auth")

CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
QUEUE = "latch-auth"
AUTH_USER = "latch-auth"        # the callout's own user (account AUTH; bypasses the callout)
SYS_USER = "latch-sys"          # this API's system-account connection (authorized by the callout itself)
LATCH_ACCOUNT = "LATCH"         # where every device, rider and the API's MQTT connection is placed
SYS_ACCOUNT = "SYS"
MQTT = "mqtt"                   # client_info.type of an MQTT connection
MAX_CONCURRENT = 64             # logins decided at once (each is a registry read and a PBKDF2 check)
CONNZ_WAIT_S = 1.0              # how long the nodes' CONNZ answers are gathered
CONNECT_TIMEOUT_S = 5.0
CALLOUT_CONNECTIONS = 2         # subscriptions to the callout, each from a connection to another node


def nats_subject(topic: str) -> str:
    """An MQTT topic or filter as nats-server's MQTT listener names it: '/' → '.', '+' → '*', '#' → '>'.
    (Latch's topics hold no '.', space or empty level: device and user ids are [A-Za-z0-9_-].)"""
    return topic.replace("/", ".").replace("+", "*").replace("#", ">")


def permissions(identity: Identity) -> tuple[list[str], list[str]]:
    """(publish, subscribe) subjects for `identity`: api/registry/broker_auth.py's grants, in NATS's terms."""
    publish: list[str] = []
    subscribe: list[str] = []
    for g in grants(identity):
        subjects = [nats_subject(g.topic)]
        if g.topic.endswith("/#"):   # MQTT's a/# matches a itself too: nats-server subscribes to both a and a.>
            subjects.insert(0, nats_subject(g.topic[:-2]))
        if g.action in (PUBLISH, ALL):
            publish += subjects
        if g.action in (SUBSCRIBE, ALL):
            subscribe += subjects
    return publish, subscribe


class NatsAuth:
    """The callout responder and the kicker, over two NATS connections to the cluster."""

    def __init__(self, db: Database, settings: Settings) -> None:
        assert settings.nats_auth_secret and settings.nats_issuer_seed, "ensure_nats_auth_secrets() first"
        self.servers = settings.nats_auth_servers()
        self.auth = BrokerAuth(db, settings.service_secret or "", settings.jwt_secret)
        self._secret = settings.nats_auth_secret
        self._seed = settings.nats_issuer_seed.encode()
        self._jwt_secret = settings.jwt_secret
        self._callouts: list[Any] = []  # nats.aio.client.Client (account AUTH), each on another node
        self._sys: Any = None          # nats.aio.client.Client (account SYS)
        self._busy = asyncio.Semaphore(MAX_CONCURRENT)
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_dropped: Callable[[str], None] | None = None   # a device was kicked (its will may not come)
        self.answered = 0
        self.refused = 0
        self.kicked = 0

    async def start(self) -> None:
        """Connect, subscribe to the callout, then connect the system user (whose login this subscription
        answers). Raises RuntimeError naming the servers when the cluster cannot be reached."""
        common: dict[str, Any] = dict(servers=self.servers, connect_timeout=CONNECT_TIMEOUT_S, allow_reconnect=True,
                                      max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                      error_cb=self._on_error)
        try:
            for k in range(min(CALLOUT_CONNECTIONS, len(self.servers))):
                # each on another node first: a login a node sends while no answerer is subscribed is dropped,
                # and the node then waits out its whole auth timeout (10 s) before refusing it; with one
                # connection, the death of its node would cost every login in the cluster that wait (measured:
                # bench/tiers.py, ~10.7 s without a successful unlock after a node was killed)
                order = self.servers[k:] + self.servers[:k]
                nc = await nats.connect(**{**common, "servers": order}, dont_randomize=True, user=AUTH_USER,
                                        password=self._secret, name=f"latch-auth-{k + 1}")
                self._callouts.append(nc)
                await nc.subscribe(CALLOUT_SUBJECT, queue=QUEUE, cb=self._on_request)
                await nc.flush(timeout=CONNECT_TIMEOUT_S)
            self._sys = await nats.connect(user=SYS_USER, password=self._secret, name="latch-sys", **common)
        except Exception as e:
            await self.stop()
            raise RuntimeError(f"cannot reach the NATS cluster's auth callout at {','.join(self.servers)} "
                               f"(LATCH_NATS_AUTH_URL; its files: `latch broker-config nats`): {e!r}") from e
        log.info("answering the NATS auth callout at %s", ",".join(self.servers))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for nc in (self._sys, *self._callouts):
            if nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), CONNECT_TIMEOUT_S)
        self._sys, self._callouts = None, []

    async def _on_error(self, e: Exception) -> None:
        log.warning("NATS auth callout connection: %r", e)

    # ---- the callout ----------------------------------------------------------------

    async def _on_request(self, msg: Any) -> None:
        # nats-py runs one subscription's callbacks one after another: each login gets its own task, so one
        # slow registry read does not hold the others (bounded by MAX_CONCURRENT)
        task = asyncio.get_running_loop().create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Any) -> None:
        async with self._busy:
            try:
                request = nats_jwt.decode(msg.data.decode(errors="replace"), nats_jwt.AUTH_REQUEST, "N")
            except nats_jwt.JwtError as e:   # not from a server: nobody to answer in its terms
                log.warning("auth callout: ignored a request that is not a server's: %s", e)
                return
            body = request.get("nats") or {}
            user_nkey, server_id = str(body.get("user_nkey", "")), str((body.get("server_id") or {}).get("id", ""))
            try:
                user = await self.decide(body)
            except Exception:   # a broken registry read must not leave the node waiting: refuse, log
                log.exception("auth callout: deciding a login failed")
                user = None
            if user is None:
                self.refused += 1
                answer = nats_jwt.auth_response(self._seed, user_nkey, server_id, error="not authorized")
            else:
                self.answered += 1
                answer = nats_jwt.auth_response(self._seed, user_nkey, server_id, user=user)
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(answer.encode())

    async def decide(self, body: dict[str, Any]) -> str | None:
        """The user JWT for this authorization request's client, or None (refused)."""
        info, opts = body.get("client_info") or {}, body.get("connect_opts") or {}
        user_nkey = str(body.get("user_nkey", ""))
        username, password = opts.get("user"), opts.get("pass")
        if not isinstance(username, str) or not isinstance(password, str):
            return None
        if info.get("type") != MQTT:
            if username == SYS_USER and _same(password, self._secret):   # this API's system connection
                return nats_jwt.user_jwt(self._seed, user_nkey, SYS_ACCOUNT, SYS_USER,
                                         ["$SYS.REQ.SERVER.>"], ["_INBOX.>"])
            service = await self.auth.login("", username, password) if username == SERVICE_USERNAME else None
            if service is not None and service.role is Role.SERVICE:
                # the API's event stream on the same cluster (LATCH_NATS_URL, api/push/nats_bus.py): JetStream in the
                # LATCH account, as the service, which may do everything there
                return nats_jwt.user_jwt(self._seed, user_nkey, LATCH_ACCOUNT, username, [">"], [">"],
                                         connection_types=["STANDARD"])
            return None   # devices and riders use MQTT only
        identity = await self.auth.login(str(info.get("mqtt_id", "")), username, password)
        if identity is None:
            log.info("NATS MQTT login refused for username %r (client id %r)", username, info.get("mqtt_id"))
            return None
        publish, subscribe = permissions(identity)
        expires = None
        if identity.role is Role.USER and self._jwt_secret is not None:
            # the node disconnects a rider's app when its token runs out (it must log in again)
            with contextlib.suppress(tokens.TokenError):
                expires = tokens.verify(self._jwt_secret, password).expires_at
        return nats_jwt.user_jwt(self._seed, user_nkey, LATCH_ACCOUNT, username, publish, subscribe, expires,
                                 connection_types=["MQTT"])

    # ---- keeping the cluster in step with the registry -------------------------------

    async def device_changed(self, device_id: str, change: str) -> None:
        """After a registration, rotation or revocation (DeviceRegistry.after_change): a rotated or revoked
        device's open connections are closed on every node; registering needs nothing (the next login asks)."""
        if change in (ROTATED, REVOKED):
            if await self.disconnect(device_id) and self.on_dropped is not None:
                self.on_dropped(device_id)

    async def disconnect(self, mqtt_client_id: str) -> int:
        """Close every connection with this MQTT client id on every node; how many were closed."""
        if self._sys is None or not self._sys.is_connected:
            log.warning("cannot disconnect %r on the NATS cluster: no system connection", mqtt_client_id)
            return 0
        found = await self._gather("$SYS.REQ.SERVER.PING.CONNZ", {"mqtt_client": mqtt_client_id})
        kicked = 0
        for answer in found:
            server_id = (answer.get("server") or {}).get("id")
            for conn in ((answer.get("data") or {}).get("connections") or []):
                if conn.get("mqtt_client") != mqtt_client_id or not server_id:
                    continue
                with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                    await self._sys.request(f"$SYS.REQ.SERVER.{server_id}.KICK",
                                            orjson.dumps({"cid": conn["cid"]}), timeout=CONNECT_TIMEOUT_S)
                    kicked += 1
        self.kicked += kicked
        log.info("disconnected %d connection(s) of %r on the NATS cluster", kicked, mqtt_client_id)
        return kicked

    async def _gather(self, subject: str, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Every node's answer to a $SYS PING request: until every node the connection knows of has answered,
    or CONNZ_WAIT_S."""
        inbox = self._sys.new_inbox()
        sub = await self._sys.subscribe(inbox)
        answers: list[dict[str, Any]] = []
        nodes = len(getattr(self._sys, "servers", ()) or ()) or 1   # the pool: configured and discovered nodes
        try:
            await self._sys.publish(subject, orjson.dumps(request), reply=inbox)
            deadline = time.monotonic() + CONNZ_WAIT_S
            for _ in range(1000):   # bounded: a cluster has far fewer nodes
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    break
                with contextlib.suppress(orjson.JSONDecodeError):
                    answers.append(orjson.loads(msg.data))
                if len(answers) >= nodes:
                    break
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return answers


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())

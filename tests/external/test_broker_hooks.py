"""The HTTP hooks EMQX and VerneMQ call, against the real API, with request bodies in the formats their
documentation gives:

* EMQX 5.8+ HTTP authentication, https://docs.emqx.com/en/emqx/latest/access-control/authn/http.html
  (POST body template ``{"username": "${username}", "password": "${password}", ...}``; answer 200
  ``{"result", "is_superuser", "acl"}``; a 4xx/5xx is treated as "ignore"), with the ACL in the format of
  https://docs.emqx.com/en/emqx/latest/access-control/authn/acl.html ("new format": permission, action,
  topic; ``eq`` for a literal topic; rules that match nothing fall through to the next authorizer).
* EMQX HTTP authorization, https://docs.emqx.com/en/emqx/latest/access-control/authz/http.html
  (body ``{"username", "topic", "action"}``; answer ``{"result": "allow"|"deny"|"ignore"}``).
* VerneMQ webhooks, https://docs.vernemq.com/plugin-development/webhookplugins (``vernemq-hook`` header;
  the auth_on_register / auth_on_subscribe / auth_on_publish payloads; ``{"result": "ok"}``,
  ``{"result": {"error": ...}}``, rewritten topics with QoS 128 for a refused one).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from api import tokens
from api.registry import broker_auth
from broker.fence import TopicFence
from broker.identity import SERVICE_USERNAME, Identity, Role
from protocol import topics
from tests.support import LiveStack


@dataclass
class Env:
    live: LiveStack
    hooks: httpx.AsyncClient          # the broker's side: sends the hook secret
    device: str
    password: str
    rider_id: str
    rider_token: str


@pytest.fixture
async def env(stack: LiveStack) -> AsyncIterator[Env]:
    creds = await stack.register("bike-a")
    await stack.register("bike-b")
    async with httpx.AsyncClient(base_url=stack.api_url) as anon:
        r = await anon.post("/v1/auth/signup", json={"email": "ada@example.org", "password": "correct horse"})
        assert r.status_code == 201, r.text
        body = r.json()
    secret = stack.settings.broker_hook_secret
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30,
                                 headers={"Authorization": f"Bearer {secret}"}) as hooks:
        yield Env(stack, hooks, "bike-a", creds["mqtt_password"], body["user"]["id"], body["access_token"])


def emqx_body(username: str | None, password: str | None, clientid: str | None) -> dict:
    """The request body EMQX builds from the template in docs/external-brokers.md."""
    return {"username": username, "password": password, "clientid": clientid}


async def emqx_authn(env: Env, body: object) -> dict:
    r = await env.hooks.post("/v1/broker/emqx/authn", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    return r.json()


# ---- the hook secret ----------------------------------------------------------------------------


async def test_every_hook_needs_the_shared_secret(env: Env) -> None:
    secret = env.live.settings.broker_hook_secret
    assert secret and (env.live.settings.data_dir / "broker-hook.secret").read_text().strip() == secret
    body = emqx_body("bike-a", env.password, "bike-a")
    async with httpx.AsyncClient(base_url=env.live.api_url) as bare:
        for path in ("/v1/broker/emqx/authn", "/v1/broker/emqx/authz", "/v1/broker/vernemq"):
            for headers in ({}, {"Authorization": "Bearer nope"}, {"X-Latch-Hook-Secret": "nope"},
                            {"Authorization": "Basic " + base64.b64encode(b"latch:nope").decode()},
                            {"Authorization": f"Bearer {env.live.settings.admin_token}"}):   # not the admin token
                r = await bare.post(path, json=body, headers={**headers, "vernemq-hook": "auth_on_register"})
                assert r.status_code == 401 and "hook secret" in r.json()["detail"], (path, headers, r.text)
        # the three ways a broker can send it; VerneMQ's HTTP client turns http://latch:SECRET@host/... into Basic
        for headers in ({"Authorization": f"Bearer {secret}"}, {"X-Latch-Hook-Secret": secret},
                        {"Authorization": "Basic " + base64.b64encode(f"latch:{secret}".encode()).decode()}):
            r = await bare.post("/v1/broker/emqx/authn", json=body, headers=headers)
            assert r.status_code == 200 and r.json()["result"] == "allow", (headers, r.text)


# ---- EMQX authentication --------------------------------------------------------------------------


async def test_emqx_authentication_allows_a_device_with_exactly_its_acl(env: Env) -> None:
    answer = await emqx_authn(env, emqx_body("bike-a", env.password, "bike-a"))
    d = "latch/v1/d/bike-a/"
    assert answer == {"result": "allow", "is_superuser": False, "acl": [
        {"permission": "allow", "action": "publish", "topic": f"eq {d}ack"},
        {"permission": "allow", "action": "publish", "topic": f"eq {d}state"},
        {"permission": "allow", "action": "publish", "topic": f"eq {d}presence"},
        {"permission": "allow", "action": "publish", "topic": f"eq {d}telemetry"},
        {"permission": "allow", "action": "publish", "topic": f"eq {d}sync"},
        {"permission": "allow", "action": "subscribe", "topic": f"eq {d}cmd"},
        {"permission": "deny", "action": "all", "topic": "#"},
        {"permission": "deny", "action": "all", "topic": "$SYS/#"},
        {"permission": "deny", "action": "all", "topic": "$delayed/#"},
    ]}
    assert_emqx_acl_is_the_fence(Identity(Role.DEVICE, "bike-a"), answer["acl"])


async def test_emqx_authentication_of_the_service_and_of_a_rider(env: Env) -> None:
    answer = await emqx_authn(env, emqx_body(SERVICE_USERNAME, env.live.settings.service_secret, "latch-api"))
    assert answer["result"] == "allow" and answer["is_superuser"] is False
    assert answer["acl"][0] == {"permission": "allow", "action": "all", "topic": "latch/v1/#"}
    assert_emqx_acl_is_the_fence(Identity(Role.SERVICE, SERVICE_USERNAME), answer["acl"])

    # a rider's app: username = user id, password = access token (client id = user id or "<user id>-...")
    answer = await emqx_authn(env, emqx_body(env.rider_id, env.rider_token, f"{env.rider_id}-phone"))
    assert answer["result"] == "allow" and answer["is_superuser"] is False
    assert answer["acl"][0] == {"permission": "allow", "action": "subscribe",
                                "topic": f"eq latch/v1/u/{env.rider_id}/events"}
    assert answer["expire_at"] == tokens.verify(env.live.settings.jwt_secret or "", env.rider_token).expires_at
    assert_emqx_acl_is_the_fence(Identity(Role.USER, env.rider_id), answer["acl"])


async def test_emqx_authentication_refuses_with_an_explicit_deny_never_a_4xx(env: Env) -> None:
    await env.live.register("bike-gone")
    gone = await env.live.http.post("/v1/devices/bike-gone/credentials")
    assert (await env.live.http.delete("/v1/devices/bike-gone")).status_code == 200
    refused = [
        emqx_body("bike-a", "wrong", "bike-a"),                          # wrong password
        emqx_body("bike-a", env.password, "bike-b"),                     # another device's client id
        emqx_body("bike-b", env.password, "bike-b"),                     # A's secret for B
        emqx_body("bike-zz", env.password, "bike-zz"),                   # unknown device
        emqx_body("bike-gone", gone.json()["mqtt_password"], "bike-gone"),   # revoked
        emqx_body(SERVICE_USERNAME, env.password, "latch-api"),          # not the service secret
        emqx_body("someone-else", env.rider_token, "someone-else"),      # a rider's token under another name
        emqx_body(env.rider_id, env.rider_token, "bike-a"),              # a rider squatting a lock's client id
        emqx_body("", "", ""), emqx_body(None, None, None),              # EMQX's empty placeholders
        {"username": "bike-a", "password": env.password},                # no clientid in the template
        {"username": "bike-a", "password": 12, "clientid": "bike-a"},
        [], "bike-a", None, {},
    ]
    for body in refused:
        answer = await emqx_authn(env, body)
        assert answer["result"] == "deny" and answer["is_superuser"] is False, (body, answer)
        assert all(rule["permission"] == "deny" for rule in answer["acl"])
    for raw, ctype in ((b"{not json", "application/json"), (b"\xff\xfe", "application/json"), (b"", "text/plain")):
        r = await env.hooks.post("/v1/broker/emqx/authn", content=raw, headers={"Content-Type": ctype})
        assert r.status_code == 200 and r.json()["result"] == "deny", r.text
    # EMQX can also send the body form-encoded
    r = await env.hooks.post("/v1/broker/emqx/authn", data={"username": "bike-a", "password": env.password,
                                                            "clientid": "bike-a"})
    assert r.status_code == 200 and r.json()["result"] == "allow", r.text


# ---- EMQX authorization ---------------------------------------------------------------------------


async def test_emqx_authorization_answers_from_the_fence(env: Env) -> None:
    async def authz(username: str | None, clientid: str | None, topic: str | None, action: str | None) -> str:
        # the body template of EMQX's documentation, plus ${clientid}
        r = await env.hooks.post("/v1/broker/emqx/authz",
                                 json={"username": username, "clientid": clientid, "topic": topic, "action": action})
        assert r.status_code == 200, r.text
        return r.json()["result"]

    a, u = "latch/v1/d/bike-a/", f"latch/v1/u/{env.rider_id}/events"
    cases = [
        ("bike-a", "bike-a", a + "ack", "publish", "allow"),
        ("bike-a", "bike-a", a + "state", "publish", "allow"),
        ("bike-a", "bike-a", a + "cmd", "subscribe", "allow"),
        ("bike-a", "bike-a", a + "cmd", "publish", "deny"),
        ("bike-a", "bike-a", a + "ack", "subscribe", "deny"),
        ("bike-a", "bike-a", "latch/v1/d/bike-b/ack", "publish", "deny"),
        ("bike-a", "bike-a", "latch/v1/d/bike-b/cmd", "subscribe", "deny"),
        ("bike-a", "bike-a", "latch/v1/d/+/cmd", "subscribe", "deny"),
        ("bike-a", "bike-a", "#", "subscribe", "deny"),
        ("bike-a", "bike-a", "$SYS/#", "subscribe", "deny"),
        ("bike-a", "bike-b", a + "ack", "publish", "deny"),               # wrong client id
        (env.rider_id, env.rider_id, u, "subscribe", "allow"),
        (env.rider_id, f"{env.rider_id}-tab", u, "subscribe", "allow"),
        (env.rider_id, env.rider_id, u, "publish", "deny"),
        (env.rider_id, env.rider_id, "latch/v1/u/+/events", "subscribe", "deny"),
        (env.rider_id, "bike-a", u, "subscribe", "deny"),
        (SERVICE_USERNAME, "latch-api", "latch/v1/d/bike-b/cmd", "publish", "allow"),
        (SERVICE_USERNAME, "latch-api", "latch/v1/d/+/ack", "subscribe", "allow"),
        (SERVICE_USERNAME, "latch-api", "elsewhere/x", "publish", "deny"),
        ("bike-zz", "bike-zz", "latch/v1/d/bike-zz/ack", "publish", "deny"),   # unknown
        ("bike-a", "bike-a", a + "ack", "all", "deny"),                      # not an action EMQX asks about
        ("bike-a", "bike-a", None, "publish", "deny"),
        (None, None, None, None, "deny"),
    ]
    for username, clientid, topic, action, want in cases:
        assert await authz(username, clientid, topic, action) == want, (username, clientid, topic, action)
    assert (await env.live.http.delete("/v1/devices/bike-a")).status_code == 200
    assert await authz("bike-a", "bike-a", a + "ack", "publish") == "deny"          # revoked
    r = await env.hooks.post("/v1/broker/emqx/authz", content=b"[1,2")
    assert r.status_code == 200 and r.json() == {"result": "deny"}


# ---- VerneMQ ------------------------------------------------------------------------------------


async def vmq(env: Env, hook: str, body: object) -> dict:
    r = await env.hooks.post("/v1/broker/vernemq", json=body, headers={"vernemq-hook": hook})
    assert r.status_code == 200, r.text
    return r.json()


async def test_vernemq_auth_on_register(env: Env) -> None:
    def register(username: str | None, password: str | None, client_id: str) -> dict:
        return {"peer_addr": "127.0.0.1", "peer_port": 8888, "username": username, "password": password,
                "mountpoint": "", "client_id": client_id, "clean_session": False}

    assert await vmq(env, "auth_on_register", register("bike-a", env.password, "bike-a")) == {"result": "ok"}
    assert await vmq(env, "auth_on_register", register(env.rider_id, env.rider_token, env.rider_id)) == {"result": "ok"}
    for body in (register("bike-a", "wrong", "bike-a"), register("bike-a", env.password, "bike-b"),
                 register(None, None, "bike-a"), register("bike-zz", env.password, "bike-zz")):
        assert await vmq(env, "auth_on_register", body) == {"result": {"error": "not_allowed"}}, body
    m5 = {"peer_addr": "127.0.0.1", "peer_port": 8888, "mountpoint": "", "client_id": "bike-a", "username": "bike-a",
          "password": env.password, "clean_start": True, "properties": {}}
    assert await vmq(env, "auth_on_register_m5", m5) == {"result": "ok"}
    assert await vmq(env, "auth_on_register_m5", {**m5, "password": "x"}) == {"result": {"error": "not_allowed"}}


async def test_vernemq_auth_on_subscribe_and_publish(env: Env) -> None:
    def subscribe(*wanted: tuple[str, int]) -> dict:
        return {"client_id": "bike-a", "mountpoint": "", "username": "bike-a",
                "topics": [{"topic": t, "qos": q} for t, q in wanted]}

    own, other = topics.cmd_topic("bike-a"), topics.cmd_topic("bike-b")
    assert await vmq(env, "auth_on_subscribe", subscribe((own, 1))) == {"result": "ok"}
    # partly refused: the allowed topic stays, the other gets QoS 128 (rewritten topics, top level for this hook)
    assert await vmq(env, "auth_on_subscribe", subscribe((own, 1), (other, 2))) == {
        "result": "ok", "topics": [{"topic": own, "qos": 1}, {"topic": other, "qos": 128}]}
    assert await vmq(env, "auth_on_subscribe", subscribe((other, 1), ("#", 0))) == {"result": {"error": "not_allowed"}}
    # the MQTT 5 hook: rewritten topics under "modifiers", 135 (not authorized), subscription options kept
    m5 = {"username": "bike-a", "mountpoint": "", "client_id": "bike-a", "properties": {},
          "topics": [{"topic": own, "qos": 1, "no_local": False, "rap": False, "retain_handling": "send_retain"},
                     {"topic": other, "qos": 1}]}
    assert await vmq(env, "auth_on_subscribe_m5", m5) == {"result": "ok", "modifiers": {"topics": [
        {"topic": own, "qos": 1, "no_local": False, "rap": False, "retain_handling": "send_retain"},
        {"topic": other, "qos": 135}]}}

    def publish(topic: str, username: str = "bike-a", client_id: str = "bike-a") -> dict:
        # VerneMQ base64-encodes the payload by default
        return {"username": username, "client_id": client_id, "mountpoint": "", "qos": 1, "topic": topic,
                "payload": base64.b64encode(b"hello").decode(), "retain": False}

    assert await vmq(env, "auth_on_publish", publish(topics.ack_topic("bike-a"))) == {"result": "ok"}
    assert await vmq(env, "auth_on_publish_m5", {**publish(topics.state_topic("bike-a")), "properties": {}}) == \
        {"result": "ok"}
    for body in (publish(topics.ack_topic("bike-b")), publish(topics.cmd_topic("bike-a")),
                 publish(topics.ack_topic("bike-a"), client_id="bike-b"),
                 publish(topics.user_events_topic(env.rider_id), env.rider_id, env.rider_id)):
        assert await vmq(env, "auth_on_publish", body) == {"result": {"error": "not_allowed"}}, body
    service = publish(topics.cmd_topic("bike-b"), SERVICE_USERNAME, "latch-api")
    assert await vmq(env, "auth_on_publish", service) == {"result": "ok"}


async def test_vernemq_unknown_hooks_and_malformed_calls_are_refused(env: Env) -> None:
    assert "error" in (await vmq(env, "on_register", {"client_id": "bike-a", "mountpoint": ""}))["result"]
    for hook, body in (("auth_on_register", []), ("auth_on_subscribe", {"username": "bike-a", "client_id": "bike-a"}),
                       ("auth_on_subscribe", {"username": "bike-a", "client_id": "bike-a", "topics": [{"qos": 1}]}),
                       ("auth_on_publish", {"username": "bike-a", "client_id": "bike-a"})):
        assert "error" in (await vmq(env, hook, body))["result"], (hook, body)
    r = await env.hooks.post("/v1/broker/vernemq", json={"username": "bike-a"})     # no vernemq-hook header
    assert r.status_code == 200 and "vernemq-hook" in r.json()["result"]["error"]
    r = await env.hooks.post("/v1/broker/vernemq", content=b"{", headers={"vernemq-hook": "auth_on_register"})
    assert r.status_code == 200 and r.json() == {"result": {"error": "malformed request"}}


# ---- the ACL list means what the fence says ------------------------------------------------------


def _emqx_match(name: str, rule: str) -> bool:
    """emqx_topic:match/2 for plain topics: '+' and '#' in the rule; '$' topics match neither at level 1."""
    if name.startswith("$") and rule[:1] in ("+", "#"):
        return False
    n, r = name.split("/"), rule.split("/")
    for i, word in enumerate(r):
        if word == "#" and i == len(r) - 1:
            return True
        if i >= len(n) or word not in (n[i], "+"):
            return False
    return len(n) == len(r)


def emqx_allows(acl: list[dict], action: str, topic: str) -> bool | None:
    """EMQX's reading of an ACL list: the first rule whose action and topic match decides; None: no rule
    matched (EMQX goes on to its authorizers)."""
    for rule in acl:
        if rule["action"] not in ("all", action):
            continue
        t = rule["topic"]
        if t.startswith("eq ") and t[3:] == topic or not t.startswith("eq ") and _emqx_match(topic, t):
            return rule["permission"] == "allow"
    return None


TOPIC_CORPUS = [
    *(topics.topic(d, k) for d in ("bike-a", "bike-b") for k in topics.KINDS),
    "latch/v1/d/bike-a/+", "latch/v1/d/+/cmd", "latch/v1/d/bike-a/#", "latch/v1/d/bike-a", "latch/v1/d/bike-a/",
    "latch/v1/d/bike-a/cmd/x", "latch/#", "#", "+/#", "+", "latch/v1/#", "latch/v1/u/+/events", "latch/v2/x",
    "elsewhere", "$SYS/broker/uptime", "$SYS/#", "$delayed/5/latch/v1/d/bike-b/state",
]


def assert_emqx_acl_is_the_fence(identity: Identity, acl: list[dict]) -> None:
    corpus = TOPIC_CORPUS + ([topics.user_events_topic(identity.name)] if identity.role is Role.USER else [])
    corpus += [topics.user_events_topic("someone-else")]
    for topic in corpus:
        for action, fence in ((broker_auth.PUBLISH, broker_auth.may_publish),
                              (broker_auth.SUBSCRIBE, broker_auth.may_subscribe)):
            wildcard = "+" in topic or "#" in topic
            if action == broker_auth.PUBLISH and wildcard:
                continue                           # not a topic name anyone can publish to
            assert emqx_allows(acl, action, topic) is fence(identity, topic), (identity, action, topic)


def test_the_enumerated_grants_are_the_fence() -> None:
    """grants() (EMQX's list, Mosquitto's patterns) allows exactly what TopicFence allows, device and user,
    and the service exactly Latch's topics."""
    fence = TopicFence()
    corpus = TOPIC_CORPUS + [topics.user_events_topic("u1"), topics.user_events_topic("u2")]
    for identity in (Identity(Role.DEVICE, "bike-a"), Identity(Role.USER, "u1")):
        listed = broker_auth.grants(identity)
        for topic in corpus:
            assert (broker_auth.Grant("publish", topic) in listed) is fence.may_publish(identity, topic), topic
            assert (broker_auth.Grant("subscribe", topic) in listed) is fence.may_subscribe(identity, topic), topic
            assert broker_auth.may_publish(identity, topic) is fence.may_publish(identity, topic)
            assert broker_auth.may_subscribe(identity, topic) is fence.may_subscribe(identity, topic)
    service = Identity(Role.SERVICE, SERVICE_USERNAME)
    assert broker_auth.grants(service) == [broker_auth.Grant("all", "latch/v1/#")]
    for topic in corpus:
        assert broker_auth.may_publish(service, topic) is topic.startswith("latch/v1/")
    assert broker_auth.grants(Identity(Role.ANONYMOUS, "")) == []
    # Mosquitto's patterns are the device grants with %u for the device id
    from api.registry.mosquitto_config import acl_file_text
    patterns = [line.split(" ", 2)[1:] for line in acl_file_text().splitlines() if line.startswith("pattern ")]
    assert [(("publish" if m == "write" else "subscribe"), t.replace("%u", "bike-a")) for m, t in patterns] == \
        [(g.action, g.topic) for g in broker_auth.grants(Identity(Role.DEVICE, "bike-a"))]

"""The NATS auth callout's pieces without a server: the fence as NATS subjects, and the JWTs (api/registry/nats_jwt.py).
The callout against a real 3-node cluster: tests/external/test_nats_cluster.py."""

from __future__ import annotations

import pytest

from api.registry import nats_jwt
from api.registry.broker_auth import FENCE
from api.registry.nats_auth import nats_subject, permissions
from broker.identity import SERVICE_USERNAME, Identity, Role
from protocol import topics


def test_the_fence_as_nats_subjects() -> None:
    publish, subscribe = permissions(Identity(Role.DEVICE, "bike-1"))
    assert sorted(publish) == sorted(nats_subject(topics.PREFIX + "bike-1/" + k) for k in topics.DEVICE_PUBLISH_KINDS)
    assert subscribe == ["latch.v1.d.bike-1.cmd"]
    for subject in publish:   # every subject granted is a topic the fence lets the device publish
        assert FENCE.may_publish(Identity(Role.DEVICE, "bike-1"), subject.replace(".", "/"))
    assert permissions(Identity(Role.USER, "u-1")) == ([], ["latch.v1.u.u-1.events"])
    # MQTT's latch/v1/# matches latch/v1 too, and nats-server subscribes to both
    assert permissions(Identity(Role.SERVICE, SERVICE_USERNAME)) == (["latch.v1", "latch.v1.>"],
                                                                    ["latch.v1", "latch.v1.>"])
    assert permissions(Identity(Role.ANONYMOUS, "")) == ([], [])
    assert nats_subject("latch/v1/d/+/ack") == "latch.v1.d.*.ack"


def test_a_user_jwt_says_exactly_what_it_was_given_and_verifies() -> None:
    seed = nats_jwt.new_account_seed()
    token = nats_jwt.user_jwt(seed, "UXYZ", "LATCH", "bike-1", ["a.b"], [], 2_000_000_000, ["MQTT"])
    claims = nats_jwt.decode(token, nats_jwt.USER, "A")
    assert claims["iss"] == nats_jwt.public_key(seed) and claims["aud"] == "LATCH" and claims["sub"] == "UXYZ"
    assert claims["nats"]["pub"] == {"allow": ["a.b"]} and claims["nats"]["sub"] == {"deny": [">"]}
    assert claims["nats"]["allowed_connection_types"] == ["MQTT"] and claims["exp"] == 2_000_000_000
    head, body, sig = token.split(".")
    forged = nats_jwt._b64(nats_jwt._unb64(body).replace(b"a.b", b">>>"))
    with pytest.raises(nats_jwt.JwtError, match="signature"):
        nats_jwt.decode(".".join((head, forged, sig)), nats_jwt.USER, "A")
    with pytest.raises(nats_jwt.JwtError, match="not a authorization_request"):
        nats_jwt.decode(token, nats_jwt.AUTH_REQUEST, "A")
    with pytest.raises(nats_jwt.JwtError, match="issuer"):   # a server's request must be signed by a server key
        nats_jwt.decode(token, nats_jwt.USER, "N")
    with pytest.raises(nats_jwt.JwtError, match="not a JWT"):
        nats_jwt.decode("garbage", nats_jwt.USER, "A")
    expired = nats_jwt.user_jwt(seed, "UXYZ", "LATCH", "x", [], [], 1)
    with pytest.raises(nats_jwt.JwtError, match="expired"):
        nats_jwt.decode(expired, nats_jwt.USER, "A")

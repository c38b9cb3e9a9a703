"""The subscription index against the obvious definition (every filter checked against every topic)."""

from __future__ import annotations

import random

from broker.codec import valid_topic_filter
from broker.index import SubscriptionIndex, topic_matches

LEVELS = ["a", "b", "c", "$SYS", "", "latch"]


def _topic(rng: random.Random) -> str:
    return "/".join(rng.choice(LEVELS) for _ in range(rng.randint(1, 4)))


def _filter(rng: random.Random) -> str:
    parts = [rng.choice(LEVELS + ["+", "+"]) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        parts.append("#")
    return "/".join(parts)


def test_topic_matches_the_spec_examples() -> None:
    assert topic_matches("sport/tennis/player1/#", "sport/tennis/player1")
    assert topic_matches("sport/tennis/player1/#", "sport/tennis/player1/ranking/wimbledon")
    assert topic_matches("sport/#", "sport")
    assert topic_matches("+/+", "/finance") and topic_matches("/+", "/finance")
    assert not topic_matches("+", "/finance")
    assert not topic_matches("#", "$SYS/x") and not topic_matches("+/monitor/Clients", "$SYS/monitor/Clients")
    assert topic_matches("$SYS/#", "$SYS/monitor/Clients") and topic_matches("$SYS/monitor/+", "$SYS/monitor/Clients")


def test_index_agrees_with_brute_force_through_adds_and_removes() -> None:
    rng = random.Random(11)
    index = SubscriptionIndex()
    subs: dict[tuple[str, int], int] = {}
    for step in range(3000):
        flt, who = _filter(rng), rng.randint(0, 20)
        if not valid_topic_filter(flt):
            continue
        if rng.random() < 0.3 and subs:
            flt, who = rng.choice(list(subs))
            index.remove(flt, who)
            del subs[(flt, who)]
        else:
            qos = rng.randint(0, 2)
            index.add(flt, who, qos)
            subs[(flt, who)] = qos
        if step % 10 == 0:
            for _ in range(20):
                topic = _topic(rng) or "x"
                want: dict[int, int] = {}
                for (f, w), q in subs.items():
                    if topic_matches(f, topic):
                        want[w] = max(want.get(w, 0), q)
                assert dict(index.match(topic)) == want, (topic, want)
    for flt, who in list(subs):
        index.remove(flt, who)
    assert index.wildcards == 0 and not index.exact and not index.root.children

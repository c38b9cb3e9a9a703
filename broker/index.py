"""The subscription index: which sessions want a topic, without scanning every filter.

amqtt matched every PUBLISH against every subscription filter in a Python
loop (formatting a debug string per miss): ~63 % of its CPU. Here:

* filters without wildcards live in a dict keyed by the filter itself: one
  lookup per PUBLISH, whatever the number of devices;
* filters with ``+`` or ``#`` live in a trie of topic levels, walked once per
  PUBLISH along the topic's levels (cost grows with the topic depth and the
  number of wildcard branches taken, not with the number of subscriptions).

A session with several matching filters appears once, at the highest QoS it
was granted among them (what Mosquitto 2.0 does; [MQTT-3.3.5-1] allows it).
Topics starting with ``$`` are not matched by a wildcard in the first level
[MQTT-4.7.2-1].
"""

from __future__ import annotations

from typing import Any

_EMPTY: dict[Any, int] = {}


class _Node:
    __slots__ = ("children", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subs: dict[Any, int] = {}


def is_wildcard(flt: str) -> bool:
    return "+" in flt or "#" in flt


def topic_matches(flt: str, topic: str) -> bool:
    """Does the (valid) filter match the (valid) topic name?"""
    if not is_wildcard(flt):
        return flt == topic
    if topic.startswith("$") and flt[0] in "+#":
        return False
    f = flt.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


class SubscriptionIndex:
    def __init__(self) -> None:
        self.exact: dict[str, dict[Any, int]] = {}
        self.root = _Node()
        self.wildcards = 0   # number of (filter, session) wildcard entries

    def add(self, flt: str, who: Any, qos: int) -> None:
        if not is_wildcard(flt):
            self.exact.setdefault(flt, {})[who] = qos
            return
        node = self.root
        for level in flt.split("/"):
            nxt = node.children.get(level)
            if nxt is None:
                nxt = node.children[level] = _Node()
            node = nxt
        if who not in node.subs:
            self.wildcards += 1
        node.subs[who] = qos

    def remove(self, flt: str, who: Any) -> None:
        if not is_wildcard(flt):
            subs = self.exact.get(flt)
            if subs is not None and subs.pop(who, None) is not None and not subs:
                del self.exact[flt]
            return
        path = [self.root]
        levels = flt.split("/")
        for level in levels:
            nxt = path[-1].children.get(level)
            if nxt is None:
                return
            path.append(nxt)
        if path[-1].subs.pop(who, None) is None:
            return
        self.wildcards -= 1
        for i in range(len(levels) - 1, -1, -1):   # prune empty branches
            node = path[i + 1]
            if node.subs or node.children:
                break
            del path[i].children[levels[i]]

    def match(self, topic: str) -> dict[Any, int]:
        """{session: highest granted QoS} for `topic`. The result may be an internal dict:
        callers must not modify it."""
        exact = self.exact.get(topic)
        if not self.wildcards:
            return exact if exact is not None else _EMPTY
        res: dict[Any, int] = dict(exact) if exact else {}
        levels = topic.split("/")
        n = len(levels)
        dollar = topic[:1] == "$"
        stack = [(self.root, 0)]
        while stack:
            node, i = stack.pop()
            children = node.children
            if i == n:
                _merge(res, node.subs)
                h = children.get("#")
                if h is not None:
                    _merge(res, h.subs)
                continue
            if not children:
                continue
            if not (i == 0 and dollar):
                h = children.get("#")
                if h is not None:
                    _merge(res, h.subs)
                p = children.get("+")
                if p is not None:
                    stack.append((p, i + 1))
            c = children.get(levels[i])
            if c is not None:
                stack.append((c, i + 1))
        return res


def _merge(res: dict[Any, int], subs: dict[Any, int]) -> None:
    for who, qos in subs.items():
        if res.get(who, -1) < qos:
            res[who] = qos

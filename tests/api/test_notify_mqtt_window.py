"""A notification's MQTT copies are paced by the link's unacknowledged messages (LATCH_NOTIFY_MQTT_WINDOW):
one QoS 1 message per rider on the API's one connection ran gmqtt out of MQTT's 65,535 packet ids at a large
audience (issue 14), and then every publish failed, commands included. With a window of 2, a notification to
6 riders goes out in batches of 2, each sent only once the one before was acknowledged, and none is lost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from api.clock import now_ms
from api.riders.models import User
from protocol import topics
from tests.api.test_notifications import detail, send
from tests.support import LiveStack, eventually, live_stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LiveStack]:
    async with live_stack(tmp_path, notify_tick_s=0.1, notify_mqtt_window=2) as live:
        yield live


async def test_copies_wait_for_room_and_all_go_out(stack: LiveStack, users) -> None:  # type: ignore[no-untyped-def]
    riders = [await users() for _ in range(6)]
    # as if each rider's app had logged into the broker (copies go only to those: test_notifications.py
    # test_mqtt_copies_only_to_riders_on_mqtt); the window is what this test is about
    ids = [r.id for r in riders]

    def logged_in(s: Any) -> None:
        s.connection().execute(update(User.__table__).where(User.__table__.c.id.in_(ids)).values(  # type: ignore[attr-defined]
            mqtt_login_at=now_ms()))
        s.commit()

    await stack.runtime.db.write(logged_in)
    link = stack.runtime.link
    seen: list[int] = []   # unacknowledged messages on the link as each copy is handed to it
    publish = link.publish

    def recording(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if topic.startswith(topics.USER_PREFIX):
            seen.append(link.client.in_flight)
        publish(topic, payload, qos, retain)

    link.publish = recording  # type: ignore[method-assign]
    sent = await send(stack, audience={"users": [r.id for r in riders]}, category="transactional")

    await eventually(lambda: len(seen) == 6 and link.client.in_flight == 0, timeout=20,
                     what="six MQTT copies published and acknowledged")
    assert (await detail(stack, sent["id"]))["counts"]["mqtt_published"] == 6
    assert max(seen) <= 1, seen   # a batch of 2 starts only below 1 unacknowledged: never more than 2 in flight
    assert seen[0::2] == [0, 0, 0], seen   # each batch began once the previous one was acknowledged

"""GET /metrics on the API (in-process stack, embedded broker): the families move with the traffic, labels stay
bounded, and the endpoint is protected as docs/observability.md says (operator or metrics token; public only
when LATCH_METRICS_PUBLIC is set)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.ops.scrape import Scrape, parse
from tests.support import LiveStack, eventually, live_stack


async def _scrape(stack: LiveStack) -> Scrape:
    r = await stack.http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


async def test_an_unlock_moves_the_command_http_db_and_broker_families(stack: LiveStack) -> None:
    before = await _scrape(stack)
    assert before.value("latch_commands_created_total") == 0
    await stack.lock("bike-7001")
    r = await stack.command("bike-7001", "unlock")
    assert r.json()["status"] == "succeeded", r.text
    command_id = r.json()["id"]
    # the command's last transition is applied before ?wait= is woken, so it is counted by now
    m = await _scrape(stack)
    assert m.value("latch_commands_created_total", action="unlock") == 1
    assert m.value("latch_commands_finished_total", action="unlock", status="succeeded") == 1
    assert m.value("latch_command_stage_seconds_count", stage="accepted_to_sent") == 1
    into_final = sum(m.value("latch_command_stage_seconds_count", stage=f"{s}_to_final")
                     for s in ("accepted", "sent", "received"))
    assert into_final == 1
    assert m.value("latch_command_final_seconds_count", action="unlock") == 1
    assert m.value("latch_api_events_total", event="commands_created") == 1
    assert m.value("latch_api_events_total", event="commands_succeeded") == 1
    assert m.value("latch_http_request_duration_seconds_count", method="POST",
                   route="/v1/devices/{device_id}/commands", status="2xx") == 1
    assert m.value("latch_db_transaction_seconds_count", end="commit") > before.value(
        "latch_db_transaction_seconds_count", end="commit")
    assert m.value("latch_devices_online") == 1
    assert m.value("latch_broker_link_connected") == 1
    # `latch serve` (Stack with its embedded broker): the broker's families on the same page
    assert m.value("latch_broker_devices_connected") == 1
    assert m.value("latch_broker_connections", role="service") >= 1
    assert m.value("latch_broker_messages_received_total", qos="1") > before.value(
        "latch_broker_messages_received_total", qos="1")
    assert m.value("latch_broker_messages_sent_total") > before.value("latch_broker_messages_sent_total")
    # no device id, no command id as a label value anywhere
    assert not any("bike-7001" in v or command_id in v for v in m.label_values())
    assert (await stack.http.get("/v1/no-such-thing")).status_code == 404
    m = await _scrape(stack)
    assert m.value("latch_http_request_duration_seconds_count", route="unmatched", status="4xx") == 1
    assert not any("no-such-thing" in v for v in m.label_values())


async def test_push_subscribers_and_held_requests_are_gauged(stack: LiveStack) -> None:
    head = (await stack.http.get("/v1/events", params={"after": 0})).json()["cursor"]
    poll = asyncio.create_task(stack.http.get("/v1/events", params={"after": head, "wait": 20}))
    try:
        async def one_subscriber() -> bool:
            return (await _scrape(stack)).value("latch_push_subscribers") == 1
        await eventually(one_subscriber, what="the held poll counted as a push subscriber")
        assert (await _scrape(stack)).has("latch_push_buffered_events")
    finally:
        poll.cancel()
    await asyncio.gather(poll, return_exceptions=True)


async def test_metrics_need_an_operator_or_the_metrics_token(tmp_path: Path) -> None:
    async with live_stack(tmp_path, metrics_token="scrape-only-token") as stack:
        async with httpx.AsyncClient(base_url=stack.api_url) as anon:
            assert (await anon.get("/metrics")).status_code == 401
            wrong = {"Authorization": "Bearer not-the-token"}
            assert (await anon.get("/metrics", headers=wrong)).status_code == 401
            scrape = {"Authorization": "Bearer scrape-only-token"}
            r = await anon.get("/metrics", headers=scrape)
            assert r.status_code == 200 and "latch_commands_created_total" in r.text
            # the metrics token is for scraping only: it is no operator
            assert (await anon.get("/v1/devices", headers=scrape)).status_code == 401
        assert (await stack.http.get("/metrics")).status_code == 200   # the operator token


async def test_public_metrics_need_no_token(tmp_path: Path) -> None:
    async with live_stack(tmp_path, metrics_public=True) as stack:
        async with httpx.AsyncClient(base_url=stack.api_url) as anon:
            r = await anon.get("/metrics")
            assert r.status_code == 200 and "latch_http_request_duration_seconds" in r.text
            assert (await anon.get("/v1/devices")).status_code == 401


async def test_serve_with_a_metrics_port_gives_the_broker_its_own_page(tmp_path: Path) -> None:
    """LATCH_METRICS_PORT with the embedded broker: its families on their own listener, not twice."""
    async with live_stack(tmp_path, metrics_port=0) as stack:
        broker = stack.stack.broker
        assert broker is not None
        await stack.lock("bike-7201")
        api = await _scrape(stack)
        assert "latch_commands_created" in api.families and not api.has("latch_broker_devices_connected")
        async with httpx.AsyncClient() as anon:
            r = await anon.get(f"http://127.0.0.1:{broker.ports['metrics']}/metrics")
            assert r.status_code == 200
            own = parse(r.text)
            assert own.value("latch_broker_devices_connected") == 1
            assert "latch_commands_created" not in own.families and own.has("process_cpu_seconds_total")
            assert (await anon.post(f"http://127.0.0.1:{broker.ports['metrics']}/metrics")).status_code == 405

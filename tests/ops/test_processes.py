"""Prometheus's view of a split deployment: `latch broker --metrics-port 0` and `latch api` as real processes,
one simulated lock, one unlock; both /metrics pages scraped over HTTP and parsed with prometheus_client's parser,
and the named families must move with that traffic."""

from __future__ import annotations

from pathlib import Path

import httpx

from device_sim.lock import Behaviour, Credentials, SimulatedLock
from tests.dbs import run_database_url
from tests.ops.scrape import Scrape, parse
from tests.procs import drain, read_until, run_to_end, running
from tests.support import eventually

ADMIN = "ops-admin-token"
SCRAPER = "ops-scrape-token"


async def _scrape(url: str, token: str | None = None) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == 200, r.text
    return parse(r.text)


async def test_prometheus_scrapes_a_broker_process_and_an_api_process(tmp_path: Path) -> None:
    env = {"LATCH_ADMIN_TOKEN": ADMIN, "LATCH_METRICS_TOKEN": SCRAPER}
    url = run_database_url()   # the run's database: None = SQLite in the data dir
    if url:
        env["LATCH_DATABASE_URL"] = url
    else:
        code, out = await run_to_end("db", "upgrade", "--data-dir", str(tmp_path), env=env)
        assert code == 0, out
    async with running("broker", "--data-dir", str(tmp_path), "--mqtt-port", "0", "--metrics-port", "0",
                       env=env) as broker:
        m, _ = await read_until(broker, r"default 127\.0\.0\.1:(\d+).* metrics 127\.0\.0\.1:(\d+)")
        mqtt_port, broker_metrics = int(m.group(1)), f"http://127.0.0.1:{m.group(2)}/metrics"
        drain(broker)
        async with running("api", "--data-dir", str(tmp_path), "--mqtt-port", str(mqtt_port),
                           "--http-port", "0", env=env) as api:
            m, _ = await read_until(api, r"API:\s+(http\S+)")
            api_url = m.group(1)
            drain(api)
            api_metrics = f"{api_url}/metrics"
            async with httpx.AsyncClient(base_url=api_url, timeout=30,
                                         headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                async with httpx.AsyncClient(timeout=10) as anon:
                    assert (await anon.get(api_metrics)).status_code == 401
                    assert (await anon.get(broker_metrics.replace("/metrics", "/other"))).status_code == 404
                reg = await http.post("/v1/devices", json={"id": "ops-0001"})
                assert reg.status_code == 201, reg.text
                b0, a0 = await _scrape(broker_metrics), await _scrape(api_metrics, SCRAPER)
                lock = SimulatedLock(Credentials.from_registration(reg.json()), Behaviour(actuation_delay_s=0.01))
                await lock.start("127.0.0.1", mqtt_port)
                try:
                    async def online() -> bool:
                        return (await http.get("/v1/devices/ops-0001")).json()["online"] is True
                    await eventually(online, what="ops-0001 online")
                    r = await http.post("/v1/devices/ops-0001/commands", params={"wait": 10},
                                        json={"action": "unlock"})
                    assert r.json()["status"] == "succeeded", r.text
                    b1, a1 = await _scrape(broker_metrics), await _scrape(api_metrics, SCRAPER)
                finally:
                    await lock.stop()

    # the API process
    assert a1.value("latch_commands_created_total", action="unlock") == a0.value(
        "latch_commands_created_total", action="unlock") + 1
    assert a1.value("latch_commands_finished_total", action="unlock", status="succeeded") == 1
    assert a1.value("latch_command_stage_seconds_count", stage="accepted_to_sent") == 1
    assert a1.value("latch_command_final_seconds_count", action="unlock") == 1
    assert a1.value("latch_http_request_duration_seconds_count", method="POST",
                    route="/v1/devices/{device_id}/commands", status="2xx") == 1
    assert a1.value("latch_db_transaction_seconds_count") > a0.value("latch_db_transaction_seconds_count")
    assert a1.value("latch_devices_online") == 1 and a0.value("latch_devices_online") == 0
    assert a1.value("latch_broker_link_connected") == 1
    assert a1.has("process_cpu_seconds_total")
    assert not a1.has("latch_broker_devices_connected"), "`latch api`: the broker is another process"
    # the broker process
    assert b0.value("latch_broker_devices_connected") == 0 and b1.value("latch_broker_devices_connected") == 1
    assert b1.value("latch_broker_connections", role="service") == 1
    assert b1.value("latch_broker_connections_opened_total") >= b0.value("latch_broker_connections_opened_total") + 1
    for qos in ("1",):   # the command (API -> broker) and the lock's answers are QoS 1
        assert b1.value("latch_broker_messages_received_total", qos=qos) > b0.value(
            "latch_broker_messages_received_total", qos=qos)
        assert b1.value("latch_broker_messages_sent_total", qos=qos) > b0.value(
            "latch_broker_messages_sent_total", qos=qos)
    assert b1.value("latch_broker_retained") > b0.value("latch_broker_retained")   # the lock's presence
    assert b1.value("latch_broker_store_commits_total") > b0.value("latch_broker_store_commits_total")
    assert b1.has("latch_broker_messages_dropped_total") and b1.has("process_resident_memory_bytes")
    for scrape in (a1, b1):
        assert not any("ops-0001" in v for v in scrape.label_values()), "no device id as a label"

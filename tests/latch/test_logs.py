"""Structured logs of a real `latch serve`: JSON lines with their fields, a trace per command, no secret anywhere.

The process runs at DEBUG with every secret it knows set to a known value; the test registers a device,
runs a lock with its credentials, creates an operator login, logs in, unlocks (one succeeds, one times out
because its lock never answers) and then searches the process's whole output for each secret.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

import httpx

from device_sim.lock import Behaviour, Credentials, SimulatedLock
from tests.dbs import run_database_url
from tests.procs import LATCH
from tests.support import eventually

SECRETS = {
    "LATCH_ADMIN_TOKEN": "admin-token-never-logged-7f3a9c",
    "LATCH_SERVICE_SECRET": "service-secret-never-logged-51be02",
    "LATCH_JWT_SECRET": "jwt-secret-never-logged-c0ffee99",
    "LATCH_COMMAND_KEY_SECRET": "command-key-secret-never-logged-ab12",
    "LATCH_BROKER_HOOK_SECRET": "hook-secret-never-logged-9d8e7f",
}
PASSWORD = "operator-password-never-logged-1234"


async def test_serve_logs_json_traces_commands_and_never_a_secret(tmp_path: Path) -> None:
    env = {**SECRETS, "LATCH_SETTLE_GRACE_S": "0.2", "LATCH_LOG_FORMAT": "json"}
    if url := run_database_url():
        env["LATCH_DATABASE_URL"] = url
    import os
    proc = await asyncio.create_subprocess_exec(
        *LATCH, "serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", "0", "--demo-fleet", "2",
        "--log-level", "debug", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env})
    assert proc.stdout is not None and proc.stderr is not None
    banner = ""
    while "Ctrl-C stops it." not in banner:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, f"latch serve exited early: {banner}"
        banner += line.decode()
    err_task = asyncio.ensure_future(proc.stderr.read())
    out_task = asyncio.ensure_future(proc.stdout.read())
    api = re.search(r"API:\s+(http\S+)", banner).group(1)            # type: ignore[union-attr]
    mqtt_port = int(re.search(r"mqtt://127\.0\.0\.1:(\d+)", banner).group(1))  # type: ignore[union-attr]
    found: list[str] = []   # secrets this run handed out, searched for in the output below
    lock: SimulatedLock | None = None
    try:
        async with httpx.AsyncClient(base_url=api, timeout=30,
                                     headers={"Authorization": f"Bearer {SECRETS['LATCH_ADMIN_TOKEN']}"}) as http:
            reg = (await http.post("/v1/devices", json={"id": "quiet-lock"})).json()
            found += [reg["mqtt_password"], reg["command_key"]]
            # a lock that takes its commands and never answers: its unlock times out
            lock = SimulatedLock(Credentials.from_registration(reg), Behaviour(drop_rate=1.0))
            await lock.start("127.0.0.1", mqtt_port)
            r = await http.post("/v1/users", json={"email": "op@example.org", "password": PASSWORD,
                                                   "role": "operator"})
            assert r.status_code == 201, r.text
            r = await http.post("/v1/auth/login", json={"email": "op@example.org", "password": PASSWORD})
            assert r.status_code == 200, r.text
            jwt = r.json()["access_token"]
            found.append(jwt)
            as_op = {"Authorization": f"Bearer {jwt}", "X-Request-ID": "req-unlock-1"}
            ok = await http.post("/v1/devices/bike-0001/commands", params={"wait": 5}, headers=as_op,
                                 json={"action": "unlock"})
            assert ok.json()["status"] == "succeeded", ok.text
            assert ok.headers["x-request-id"] == "req-unlock-1"

            async def online() -> bool:
                return (await http.get("/v1/devices/quiet-lock")).json()["online"]
            await eventually(online, timeout=10, what="quiet-lock online")
            r = await http.post("/v1/devices/quiet-lock/commands", json={"action": "unlock", "ttl_s": 1})
            timed_out_id = r.json()["id"]

            async def final() -> str | None:
                body = (await http.get(f"/v1/commands/{timed_out_id}")).json()
                return body["status"] if body["final"] else None
            assert await eventually(final, timeout=15, what="the quiet lock's unlock final") == "timed_out"
            r = await http.post("/v1/auth/stream-token")
            found.append(r.json()["token"])
            found.append(json.dumps(
                json.loads((tmp_path / "demo-fleet.json").read_text())["bike-0001"]["mqtt_password"]).strip('"'))
    finally:
        if lock is not None:
            await lock.stop()
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    err = (await err_task).decode()
    out = banner + (await out_task).decode()
    assert code == 0, out + err

    for value in [*SECRETS.values(), PASSWORD, *found]:
        assert value not in out and value not in err, f"a secret ({value[:6]}...) is in the log"

    events = [json.loads(line) for line in err.splitlines()]   # every stderr line is one JSON event
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in events)
    mine = [e for e in events if e.get("command_id") == ok.json()["id"]]
    assert [e["level"] for e in mine if e["level"] == "INFO"] == ["INFO", "INFO"], mine
    assert "created" in mine[0]["msg"] and "succeeded after" in mine[-1]["msg"], mine
    assert all(e["device_id"] == "bike-0001" for e in mine)
    assert any(e["level"] == "DEBUG" and ": sent" in e["msg"] for e in mine), mine   # the states between
    trace = [e for e in events if e.get("command_id") == timed_out_id and e["level"] == "INFO"]
    assert len(trace) == 2 and "timed_out after" in trace[1]["msg"], trace
    # the HTTP request's own line carries the id the client sent
    assert any(e.get("request_id") == "req-unlock-1" and "POST /v1/devices/bike-0001/commands" in e["msg"]
               for e in events), [e for e in events if e["logger"] == "latch.http"][:5]

"""The `latch` command as a user runs it: real processes, real ports, curl-like requests."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import httpx

from api.schema import head_revision
from tests.dbs import ON_POSTGRES, empty_postgres_url, run_database_url
from tests.procs import LATCH, read_until, run_to_end, running


async def test_serve_with_demo_fleet_unlocks_a_bike(tmp_path: Path) -> None:
    async with running("serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", "0",
                       "--demo-fleet", "3") as proc:
        m, out = await read_until(proc, r"Try:")
        api = re.search(r"API:\s+(http\S+)", out).group(1)          # type: ignore[union-attr]
        token = re.search(r"Operator token:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
        assert token == (tmp_path / "admin.token").read_text().strip()
        async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"}) as http:
            devices = (await http.get("/v1/devices")).json()
            assert [d["id"] for d in devices] == ["bike-0001", "bike-0002", "bike-0003"]
            r = await http.post("/v1/devices/bike-0002/commands", params={"wait": 5}, json={"action": "unlock"})
            assert r.json()["status"] == "succeeded"
            assert (await http.get("/v1/devices/bike-0002")).json()["reported"]["locked"] is False
            assert (await http.get("/docs")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_broker_api_and_sim_as_separate_processes(tmp_path: Path) -> None:
    env = {"LATCH_ADMIN_TOKEN": "split-token"}
    url = run_database_url()   # the run's database: None = SQLite in the data dir
    if url:
        env["LATCH_DATABASE_URL"] = url
    else:   # a fresh SQLite database: migrated first, as in any split deployment
        code, out = await run_to_end("db", "upgrade", "--data-dir", str(tmp_path), env=env)
        assert code == 0 and "upgraded empty -> " in out, out
    async with running("broker", "--data-dir", str(tmp_path), "--mqtt-port", "0", env=env) as broker:
        m, _ = await read_until(broker, r"default 127\.0\.0\.1:(\d+)")
        mqtt_port = m.group(1)
        async with running("api", "--data-dir", str(tmp_path), "--mqtt-port", mqtt_port, "--http-port", "0",
                           env=env) as api:
            m, _ = await read_until(api, r"API:\s+(http\S+)")
            api_url = m.group(1)
            async with running("sim", "--devices", "2", "--broker", f"127.0.0.1:{mqtt_port}", "--api", api_url,
                               "--data-dir", str(tmp_path), env=env) as sim:
                await read_until(sim, r"2 simulated locks online")
                async with httpx.AsyncClient(base_url=api_url,
                                             headers={"Authorization": "Bearer split-token"}) as http:
                    for _ in range(100):  # presence is processed asynchronously: bounded poll
                        if (await http.get("/v1/devices/sim-0002")).json()["online"]:
                            break
                        await asyncio.sleep(0.05)
                    r = await http.post("/v1/devices/sim-0002/commands", params={"wait": 5},
                                        json={"action": "unlock"})
                    assert r.json()["status"] == "succeeded"


async def test_api_refuses_an_unmigrated_database_and_db_upgrade_fixes_it(tmp_path: Path) -> None:
    """PostgreSQL (shared by replicas) is migrated on purpose only; a database behind the code is refused on
    either; a fresh SQLite data dir is created at the code's revision (the next test)."""
    url = empty_postgres_url() if ON_POSTGRES else f"sqlite:///{tmp_path / 'fresh.db'}"
    env = {"LATCH_DATABASE_URL": url, "LATCH_ADMIN_TOKEN": "t"}
    if not ON_POSTGRES:   # behind the code: at the first revision
        code, out = await run_to_end("db", "upgrade", "--data-dir", str(tmp_path), env=env)
        assert code == 0, out
        from api import schema as _schema
        from api.db import Database
        db = Database(url)
        try:
            await db.run_sync(lambda e: _schema.downgrade_engine(e, "0001"))
        finally:
            await db.close()
    refused = ("has no Latch schema (never migrated)" if ON_POSTGRES
               else f"is at revision 0001, this Latch needs {head_revision()}")
    commands = [["api", "--http-port", "0", "--mqtt-port", "1"], ["broker", "--mqtt-port", "0"], ["db", "check"]]
    for command in commands:
        code, out = await run_to_end(*command, "--data-dir", str(tmp_path), env=env)
        assert code == 1, out
        assert f"{refused}: run `latch db upgrade --database-url" in out, out
    code, out = await run_to_end("db", "upgrade", "--data-dir", str(tmp_path), env=env)
    assert code == 0 and f"-> {head_revision()}" in out, out
    code, out = await run_to_end("db", "upgrade", "--data-dir", str(tmp_path), env=env)
    assert code == 0 and "(already)" in out, out
    code, out = await run_to_end("db", "check", "--data-dir", str(tmp_path), env=env)
    assert code == 0 and f"at {head_revision()}, as this Latch needs" in out, out


async def test_broker_on_a_fresh_sqlite_data_dir_creates_its_database(tmp_path: Path) -> None:
    # SQLite in both passes: the default a newcomer runs (PostgreSQL is never migrated implicitly: the test above)
    env = {"LATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'latch.db'}"}
    async with running("broker", "--mqtt-port", "0", "--data-dir", str(tmp_path), "--allow-anonymous",
                       env=env) as proc:
        m, out = await read_until(proc, r"Latch broker listening")
        assert f"created a new Latch database at revision {head_revision()}" in out, out
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    code, out = await run_to_end("db", "check", "--data-dir", str(tmp_path), env=env)
    assert code == 0, out


async def test_bad_options_give_a_clear_error(tmp_path: Path) -> None:
    # ephemeral ports: the check must not depend on 8000/1883 being free (./run serve may be running)
    proc = await asyncio.create_subprocess_exec(*LATCH, "serve", "--broker", "nonsense", "--data-dir", str(tmp_path),
                                                "--http-port", "0", "--mqtt-port", "0",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert b"mqtt://HOST:PORT" in out
    assert out.count(b"\n") <= 2 and b"Traceback" not in out, out   # one line naming the option, no traceback

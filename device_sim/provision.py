"""`latch sim`: register simulated locks through the API (once) and run them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path

import httpx

from device_sim.fleet import Fleet
from device_sim.lock import Behaviour, Credentials
from latch.settings import Settings, broker_tls_context, parse_broker_url


async def ensure_registered(api_url: str, token: str, ids: list[str], cache: Path) -> list[Credentials]:
    """Credentials for `ids`, registering (or rotating) through the API what `cache` does not hold."""
    saved: dict[str, dict] = json.loads(cache.read_text()) if cache.exists() else {}
    out: list[Credentials] = []
    async with httpx.AsyncClient(base_url=api_url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=30) as http:
        for device_id in ids:
            entry = saved.get(device_id)
            if entry is None:
                r = await http.post("/v1/devices", json={"id": device_id, "name": f"Simulated {device_id}"})
                if r.status_code == 409:
                    r = await http.post(f"/v1/devices/{device_id}/credentials")
                r.raise_for_status()
                body = r.json()
                entry = {"id": device_id, "mqtt_password": body["mqtt_password"], "command_key": body["command_key"]}
                saved[device_id] = entry
            out.append(Credentials.from_registration(entry))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.touch(mode=0o600)
    cache.write_text(json.dumps(saved, indent=1))
    return out


def sim_dir(data_dir: Path) -> Path:
    """Where `latch sim` keeps its locks' state files and actuation records (device_sim/__init__.py)."""
    return data_dir / "sim"


async def run_sim(api_url: str, token: str, broker: str, n: int, prefix: str, behaviour: Behaviour,
                  data_dir: Path, broker_ca: Path | None = None) -> None:
    """`broker` is HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS, verified against `broker_ca`,
    default LATCH_BROKER_CA, else the system's trust store)."""
    ids = [f"{prefix}{i:04d}" for i in range(1, n + 1)]
    host, port = parse_broker_url(broker)
    tls = broker_tls_context(broker, broker_ca if broker_ca is not None else Settings().broker_ca)
    creds = await ensure_registered(api_url, token, ids, data_dir / f"sim-fleet-{prefix.strip('-') or 'sim'}.json")
    # each lock's persisted record (once-only across restarts) and this process's actuation record
    fleet = Fleet(creds, behaviour, data_dir=sim_dir(data_dir))
    await fleet.start(host, port, tls=tls)
    print(f"{len(fleet)} simulated locks online ({ids[0]}..{ids[-1]}) on {host}:{port}"
          + (" (TLS)" if tls is not None else ""), flush=True)
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await fleet.stop()

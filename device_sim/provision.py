"""`latch sim`: register simulated locks through the API (once) and run them; remove them again.

Progress (registering, connecting, removing) is a rich progress bar on stderr. The credentials of the
locks it registered are kept in DATA_DIR/sim-fleet-<prefix>.json: `latch sim --cleanup` revokes exactly
those devices through the API (DELETE /v1/devices/{id}: refused at the broker from then on; the record
and its history stay, as for any revoked lock) and forgets them; `latch sim --ephemeral` does so when it
stops. A later `latch sim` with the same prefix issues them new credentials."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from device_sim.fleet import Fleet
from device_sim.lock import Behaviour, Credentials
from foundation.settings import Settings, broker_tls_context, parse_brokers

T = TypeVar("T")


def _progress() -> Any:
    """A rich progress bar on stderr (a plain final line when stderr is no terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)


def _save(cache: Path, saved: dict[str, dict]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.touch(mode=0o600)
    cache.write_text(json.dumps(saved, indent=1))


async def ensure_registered(api_url: str, token: str, ids: list[str], cache: Path,
                            progress: Any = None) -> list[Credentials]:
    """Credentials for `ids`, registering (or rotating) through the API what `cache` does not hold.
    `cache` also records which ids this simulator registered, for `latch sim --cleanup`."""
    saved: dict[str, dict] = json.loads(cache.read_text()) if cache.exists() else {}
    out: list[Credentials] = []
    task = progress.add_task("registering locks", total=len(ids)) if progress is not None else None
    async with httpx.AsyncClient(base_url=api_url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=30) as http:
        try:
            for device_id in ids:
                entry = saved.get(device_id)
                if entry is None:
                    r = await http.post("/v1/devices", json={"id": device_id, "name": f"Simulated {device_id}"})
                    if r.status_code == 409:
                        r = await http.post(f"/v1/devices/{device_id}/credentials")
                    _raise_for(r, f"registering {device_id}")
                    body = r.json()
                    entry = {"id": device_id, "mqtt_password": body["mqtt_password"],
                             "command_key": body["command_key"]}
                    saved[device_id] = entry
                out.append(Credentials.from_registration(entry))
                if task is not None:
                    progress.advance(task)
        finally:   # what was registered before an error or Ctrl-C stays known (and removable)
            _save(cache, saved)
    return out


def _raise_for(r: httpx.Response, what: str) -> None:
    if r.status_code >= 400:
        detail = r.text[:200]
        raise SimError(f"{what}: the API answered {r.status_code} {detail}")


class SimError(Exception):
    """Something the operator must fix (a wrong token, an unreachable API): one line, no traceback."""


async def cleanup(api_url: str, token: str, cache: Path, prefix: str, progress: Any = None) -> int:
    """Revoke through the API every device this simulator registered with `prefix` (the ids in `cache`),
    and forget them; the number revoked (a device already gone counts too)."""
    saved: dict[str, dict] = json.loads(cache.read_text()) if cache.exists() else {}
    ids = sorted(d for d in saved if d.startswith(prefix))
    task = progress.add_task("revoking locks", total=len(ids)) if progress is not None else None
    revoked = 0
    async with httpx.AsyncClient(base_url=api_url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=30) as http:
        try:
            for device_id in ids:
                r = await http.delete(f"/v1/devices/{device_id}")
                if r.status_code != 404:
                    _raise_for(r, f"revoking {device_id}")
                saved.pop(device_id)
                revoked += 1
                if task is not None:
                    progress.advance(task)
        finally:
            _save(cache, saved)
    return revoked


def cache_file(data_dir: Path, prefix: str) -> Path:
    """Where `latch sim` keeps the credentials of the locks it registered with `prefix`."""
    return data_dir / f"sim-fleet-{prefix.strip('-') or 'sim'}.json"


def sim_dir(data_dir: Path) -> Path:
    """Where `latch sim` keeps its locks' state files and actuation records (device_sim/__init__.py)."""
    return data_dir / "sim"


async def run_sim(api_url: str, token: str, broker: str, n: int, prefix: str, behaviour: Behaviour,
                  data_dir: Path, broker_ca: Path | None = None, ephemeral: bool = False) -> None:
    """`broker` is HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS, verified against `broker_ca`,
    default LATCH_BROKER_CA, else the system's trust store); several, comma-separated, are one clustered broker's
    nodes (each lock moves to the next when its node goes away). `ephemeral`: revoke the registered locks
    through the API when the simulator stops."""
    from foundation.logs import shutting_down

    ids = [f"{prefix}{i:04d}" for i in range(1, n + 1)]
    (host, port), *others = [(b.host, b.port) for b in parse_brokers(broker)]   # a cluster's nodes: comma-separated
    tls = broker_tls_context(broker, broker_ca if broker_ca is not None else Settings().broker_ca)
    cache = cache_file(data_dir, prefix)
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(sig, done.set)
    fleet: Fleet | None = None
    try:
        with _progress() as progress:
            creds = await _unless(done, ensure_registered(api_url, token, ids, cache, progress))
            if creds is not STOPPED:
                # each lock's persisted record (once-only across restarts) and this process's actuation record
                fleet = Fleet(creds, behaviour, data_dir=sim_dir(data_dir))
                task = progress.add_task("connecting locks", total=len(fleet))
                started = await _unless(done, fleet.start(host, port, tls=tls, fallbacks=others,
                                                          on_started=lambda: progress.advance(task)))
                if started is STOPPED:
                    creds = STOPPED
        if creds is not STOPPED and fleet is not None:
            print(f"{len(fleet)} simulated locks online ({ids[0]}..{ids[-1]}) on {host}:{port}"
                  + (" (TLS)" if tls is not None else "")
                  + (": revoked through the API when this stops" if ephemeral else ""), flush=True)
            await done.wait()
    finally:
        with shutting_down():
            if fleet is not None:
                await fleet.stop()
            if ephemeral:
                with _progress() as progress:
                    removed = await cleanup(api_url, token, cache, prefix, progress)
                print(f"revoked {removed} simulated locks ({prefix}*) through the API", flush=True)
        print("latch sim stopped", flush=True)


STOPPED: Any = object()   # what _unless returns when the simulator was told to stop first


async def _unless(stop: asyncio.Event, work: Awaitable[T]) -> T:
    """`work`'s result, or STOPPED when `stop` is set first (the work is cancelled)."""
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if job.done():
        return job.result()
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job
    return STOPPED

"""One suite, both ways events travel between API replicas: PostgreSQL NOTIFY under the ordering lock
(api/pg_bus.py, the default with PostgreSQL) and NATS JetStream (api/push/nats_bus.py, LATCH_NATS_URL). Real
processes on loopback: `latch broker`, two `latch api`, PostgreSQL, and for NATS a real nats-server.

- a rider whose stream drops from replica A and who reconnects to replica B with its cursor, while
  notifications keep coming from both replicas, gets every one once: nothing lost, nothing repeated;
- NATS only: nats-server killed (SIGKILL) and restarted while commands go on: the events committed while it
  was away were kept in the outbox and relayed when it came back, and every stream shows each event once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.dbs import postgres_url
from tests.natsserver import NatsServer
from tests.scale.cluster import ADMIN, Cluster, cluster
from tests.support import eventually

_emails = itertools.count(1)


async def outbox_rows(url: str) -> int:
    """Events committed and not yet acknowledged by JetStream (api/push/nats_bus.py's outbox)."""
    import psycopg

    from api.pg_bus import libpq_dsn

    async with await psycopg.AsyncConnection.connect(libpq_dsn(url)) as conn:
        row = await (await conn.execute("SELECT count(*) FROM event_outbox")).fetchone()
    return int(row[0]) if row else 0


@dataclass
class Rider:
    id: str
    token: str


async def sign_up(url: str) -> Rider:
    email, password = f"mover{next(_emails)}@example.org", "correct horse"
    async with httpx.AsyncClient(base_url=url, timeout=30) as anon:
        r = await anon.post("/v1/auth/signup", json={"email": email, "password": password, "name": "Mover"})
        assert r.status_code == 201, r.text
        r = await anon.post("/v1/auth/login", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
    return Rider(r.json()["user"]["id"], r.json()["access_token"])


async def read_stream(url: str, token: str, after: int | None, out: list[tuple[int, dict]],
                      stop: "asyncio.Future[None] | None" = None, until: int | None = None,
                      opened: asyncio.Event | None = None) -> int:
    """Collect (id, data) of an SSE stream's notifications into `out`: until `stop` is done (then the
    connection is dropped, as a phone losing its network does) or `until` notifications were collected.
    Returns the id of the last event read (the cursor to resume from)."""
    headers = {"Authorization": f"Bearer {token}"}
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    last = after or 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as h:
        async with h.stream("GET", "/v1/events/stream", headers=headers) as r:
            assert r.status_code == 200
            if opened is not None:
                opened.set()
            event_id, kind = None, None
            lines = r.aiter_lines()
            for _ in range(100_000):   # bounded
                line = await asyncio.wait_for(lines.__anext__(), 60)
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and event_id is not None:
                    last = event_id
                    if kind == "notification":
                        out.append((event_id, json.loads(line[6:])["data"]))
                    if until is not None and len(out) >= until:
                        return last
                    if stop is not None and stop.done():
                        return last
    raise AssertionError(f"stream ended after {len(out)} notifications")


async def notify(c: Cluster, rider: Rider, n: int, sent: list[str], half: asyncio.Future[None]) -> None:
    """n notifications to the rider, sent alternately through each replica, one after the other."""
    for i in range(n):
        rep = c.replicas[i % len(c.replicas)]
        r = await rep.http.post("/v1/notifications", json={
            "title": f"n{i}", "body": "your ride", "category": "transactional", "ttl_s": 600,
            "audience": {"users": [rider.id]}})
        assert r.status_code == 201, r.text
        sent.append(r.json()["id"])
        if i == n // 2 and not half.done():
            half.set_result(None)


async def test_a_rider_moving_between_replicas_mid_stream_loses_and_repeats_nothing(
        tmp_path: Path, bus: dict[str, str]) -> None:
    async with cluster(tmp_path, postgres_url(), 2, extra_env=bus) as c:
        a, b = c.replicas
        rider = await sign_up(a.url)
        n = 30
        sent: list[str] = []
        on_a: list[tuple[int, dict]] = []
        on_b: list[tuple[int, dict]] = []
        half: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        opened = asyncio.Event()
        reader = asyncio.ensure_future(read_stream(a.url, rider.token, None, on_a, stop=half, opened=opened))
        await asyncio.wait_for(opened.wait(), 30)
        sender = asyncio.ensure_future(notify(c, rider, n, sent, half))
        # the phone loses replica a once half were sent (mid-stream: more keep coming meanwhile) and comes
        # back on replica b with the id of the last event it read
        cursor = await asyncio.wait_for(reader, 60)
        assert on_a, "nothing arrived on replica a before the move"
        await asyncio.wait_for(sender, 60)
        rest = n - len(on_a)
        if rest:
            await asyncio.wait_for(read_stream(b.url, rider.token, cursor, on_b, until=rest), 60)
        got = [d["notification_id"] for _, d in on_a + on_b]
        assert Counter(got) == Counter(sent), (len(got), len(sent))   # every one, once
        ids = [i for i, _ in on_a + on_b]
        assert ids == sorted(set(ids))                                # one cursor order across both replicas
        # the same order on both replicas: b's view of the whole stream agrees with what the rider saw
        async with httpx.AsyncClient(base_url=b.url, timeout=30,
                                     headers={"Authorization": f"Bearer {rider.token}"}) as h:
            page = (await h.get("/v1/events", params={"after": 0, "limit": 1000})).json()
        truth = [e["data"]["notification_id"] for e in page["events"] if e["kind"] == "notification"]
        assert truth == got


async def test_nats_killed_and_restarted_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    server = await NatsServer(tmp_path / "nats").start()
    try:
        async with cluster(tmp_path, postgres_url(), 2, ingest=[False, True],
                           extra_env={"LATCH_NATS_URL": server.url}) as c:
            a, b = c.replicas
            await c.lock("bike-n1")
            streamed: list[dict] = []
            commands: list[str] = []

            async def operator_stream() -> None:
                async with httpx.AsyncClient(base_url=a.url, timeout=60,
                                             headers={"Authorization": f"Bearer {ADMIN}"}) as h:
                    async with h.stream("GET", "/v1/events/stream") as r:
                        lines = r.aiter_lines()
                        for _ in range(100_000):   # bounded
                            line = await asyncio.wait_for(lines.__anext__(), 90)
                            if line.startswith("data: "):
                                streamed.append(json.loads(line[6:]))

            def ours() -> list[dict]:   # the commands' events as the stream carried them
                return [e["data"] for e in streamed
                        if e.get("kind") == "command" and e["data"]["command_id"] in commands]

            def finals() -> int:
                return sum(1 for d in ours() if d["final"])

            stream = asyncio.ensure_future(operator_stream())
            await eventually(lambda: a.proc.returncode is None, what="replica a running")

            async def run(rep_index: int) -> None:
                r = await c.replicas[rep_index].http.post("/v1/devices/bike-n1/commands", params={"wait": 15},
                                                          json={"action": "locate"})
                assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
                commands.append(r.json()["id"])

            for i in range(3):
                await run(i % 2)
            await eventually(lambda: finals() >= 3, timeout=30, what="the first commands on a's stream")
            server.kill()
            await server.proc.wait()   # type: ignore[union-attr]
            for i in range(4):         # NATS is away: commands still work; their events wait in the outbox
                await run(i % 2)
            assert await outbox_rows(c.database_url) >= 4 * 3   # at least queued, sent, succeeded of each: kept
            await server.start()       # the same port and store: a restart
            for i in range(2):
                await run(i % 2)
            # waited for here, not in the reader: a command's final event can stream in before its POST's answer
            # adds its id to `commands` (the reader then waited for a tenth that never came: CI)
            try:
                await eventually(lambda: finals() >= 9 or stream.done(), timeout=90, what="9 final events")
            except AssertionError:   # say where it stopped: each replica's relay and feed, the outbox
                raise AssertionError(
                    f"a's stream stopped at {finals()} of 9 final events; outbox rows: "
                    f"{await outbox_rows(c.database_url)}; a: {await a.metrics()}; b: {await b.metrics()}") from None
            if stream.done():
                stream.result()   # the stream ended early: its error
            stream.cancel()
            # a's waits on answers b applied could not be woken through NATS while it was away: they re-read
            # the command instead (api/commands/service.py wait_on), and none ran to its 15 s timeout
            assert (await a.metrics())["counts"].get("waits_timed_out", 0) == 0

            async def relayed() -> bool:
                return await outbox_rows(c.database_url) == 0
            await eventually(relayed, timeout=30, what="every outbox row relayed")
            per_status = Counter((d["command_id"], d["status"]) for d in ours())
            assert len(commands) == 9
            assert all(per_status[(cid, "succeeded")] == 1 for cid in commands), per_status   # nothing lost
            assert max(per_status.values()) == 1, per_status                                  # nothing twice
            ids = [e["id"] for e in streamed if "id" in e]
            assert ids == sorted(set(ids))   # one order, each cursor once
    finally:
        await server.stop()

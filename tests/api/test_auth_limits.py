"""Login and sign-up limits (issue 12, defect 6): per client address and per account (429 + Retry-After), and
argon2 on a bounded pool (503 + Retry-After past it), so a login flood cannot take the CPU. Real stack, HTTP."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from latch.stack import Stack
from tests.support import LiveStack, eventually, live_stack, make_settings

WRONG = {"password": "not the password"}


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[LiveStack]:
    """A stack behind a (pretend) reverse proxy: the client address is X-Forwarded-For's last hop."""
    async with Stack(make_settings(tmp_path, trust_forwarded_for=True)) as st:
        async with httpx.AsyncClient(base_url=st.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {st.settings.admin_token}"}) as http:
            yield LiveStack(st, http)


def _is_429(r: httpx.Response, what: str) -> None:
    assert r.status_code == 429, r.text
    assert what in r.json()["detail"]
    assert int(r.headers["retry-after"]) >= 1


async def _burst(anon: httpx.AsyncClient, n: int, email: str, xff: list[str] | None = None) -> list[httpx.Response]:
    """n logins sent at once (distinct accounts, so only the address limit applies): the limit is checked
    when each arrives, before any is hashed, so the answer does not depend on how fast argon2 runs here."""
    async def one(i: int) -> httpx.Response:
        headers = {"X-Forwarded-For": xff[i]} if xff else {}
        return await anon.post("/v1/auth/login", json={"email": email.format(i=i), **WRONG}, headers=headers)
    return list(await asyncio.gather(*(one(i) for i in range(n))))


def _limited(answers: list[httpx.Response], over: int, what: str) -> None:
    codes = [r.status_code for r in answers]
    assert over - 1 <= codes.count(429) <= over, codes     # -1: a token may refill while they arrive
    assert set(codes) <= {401, 429, 503}, codes            # 503: past the argon2 pool (api/hashing.py)
    _is_429(next(r for r in answers if r.status_code == 429), what)


async def test_logins_from_one_address_are_limited(stack: LiveStack) -> None:
    burst = stack.settings.login_burst_per_address
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as anon:
        _limited(await _burst(anon, burst + 5, "guess{i}@example.org"), 5, "from your address")


async def test_logins_for_one_account_are_limited_from_any_address(proxied: LiveStack) -> None:
    stack = proxied
    rider = {"email": "ada@example.org", "password": "correct horse"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as anon:
        assert (await anon.post("/v1/auth/signup", json=rider)).status_code == 201
        burst = stack.settings.login_burst_per_account
        for i in range(burst):                       # a different address each time: only the account limit
            r = await anon.post("/v1/auth/login", json={"email": rider["email"], **WRONG},
                                headers={"X-Forwarded-For": f"198.51.100.{i + 1}"})
            assert r.status_code == 401, (i, r.text)
        # the right password does not get past it either: the limit is on guesses, whoever makes them
        r = await anon.post("/v1/auth/login", json=rider, headers={"X-Forwarded-For": "203.0.113.9"})
        _is_429(r, "for this account")
        # an account that does not exist is limited the same way (the limit tells nothing about which exist)
        for i in range(burst):
            r = await anon.post("/v1/auth/login", json={"email": "nobody@example.org", **WRONG},
                                headers={"X-Forwarded-For": f"198.51.100.{100 + i}"})
            assert r.status_code == 401
        r = await anon.post("/v1/auth/login", json={"email": "Nobody@Example.org ", **WRONG},
                            headers={"X-Forwarded-For": "203.0.113.10"})
        _is_429(r, "for this account")


async def test_an_ipv6_64_counts_as_one_address(proxied: LiveStack) -> None:
    stack = proxied
    burst = stack.settings.login_burst_per_address
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as anon:
        xff = [f"10.0.0.1, 2001:db8:1:2::{i + 1:x}" for i in range(burst + 5)]   # a new address of one /64 each
        _limited(await _burst(anon, burst + 5, "v6-{i}@example.org", xff), 5, "from your address")
        r = await anon.post("/v1/auth/login", json={"email": "v6-more@example.org", **WRONG},
                            headers={"X-Forwarded-For": "2001:db8:1:3::1"})     # the next /64 is someone else
        assert r.status_code == 401


async def test_sign_ups_from_one_address_are_limited(stack: LiveStack) -> None:
    burst = stack.settings.signup_burst_per_address
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as anon:
        for i in range(burst):
            r = await anon.post("/v1/auth/signup", json={"email": f"new{i}@example.org", "password": "correct horse"})
            assert r.status_code == 201, (i, r.text)
        r = await anon.post("/v1/auth/signup", json={"email": "spam@example.org", "password": "correct horse"})
        _is_429(r, "sign-up")


class _CountingHasher:
    """The real argon2 hasher, counting how many hashes run at once."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.running = self.peak = 0

    def _count(self, fn: Any, *args: Any) -> Any:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return fn(*args)
        finally:
            with self.lock:
                self.running -= 1

    def hash(self, password: str) -> str:
        return self._count(self.inner.hash, password)

    def verify(self, password: str, password_hash: str) -> bool:
        return self._count(self.inner.verify, password, password_hash)


@pytest.fixture
async def flood_stack(tmp_path: Path) -> AsyncIterator[LiveStack]:
    """Limits out of the way (a flood from many addresses), a pool of 1 hash + 4 waiting."""
    async with live_stack(tmp_path, login_rate_per_address_per_s=1e6, login_burst_per_address=10**6,
                          login_rate_per_account_per_s=1e6, login_burst_per_account=10**6,
                          password_hash_workers=1, password_hash_queue=4) as live:
        yield live


async def _unlock_ms(stack: LiveStack, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await stack.command("bike-1", "locate", wait=5)
        assert r.json()["status"] == "succeeded", r.text
        out.append((time.perf_counter() - t0) * 1000)
    return out


FLOODER = r"""
import asyncio, json, sys, time
import httpx

async def main(url, clients, seconds):
    counts, retry, stop = {}, set(), time.monotonic() + seconds
    async def one(client, i):
        n = 0
        while time.monotonic() < stop and n < 2000:          # bounded in time and count
            n += 1
            try:
                r = await client.post("/v1/auth/login", json={"email": f"flood{i}-{n}@example.org",
                                                              "password": "not the password"})
            except httpx.TransportError:   # a keep-alive connection closed as the next request went out
                counts["transport_error"] = counts.get("transport_error", 0) + 1
                continue
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            if r.status_code == 503:
                retry.add(r.headers.get("retry-after", ""))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)) as c:
        print("started", flush=True)
        await asyncio.gather(*(one(c, i) for i in range(clients)))
    print(json.dumps({"counts": counts, "retry_after": sorted(retry)}), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


async def test_a_login_flood_runs_a_bounded_number_of_hashes_and_commands_keep_flowing(flood_stack: LiveStack) -> None:
    """32 clients in another process log in as fast as they are answered (ignoring Retry-After) while a
    lock is commanded: at most one argon2 hash runs at a time, the excess is refused at once with 503, and
    the commands keep their round trip (figures printed; on this 2-core host shared with other work)."""
    stack = flood_stack
    await stack.lock("bike-1")
    pool = stack.runtime.users.hashes
    counting = pool.hasher = _CountingHasher(pool.hasher)
    idle = await _unlock_ms(stack, 10)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOODER, stack.api_url, "32", "8",
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"started"
        busy = await _unlock_ms(stack, 20)
        result = json.loads(await asyncio.wait_for(proc.stdout.readline(), 90))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    transport_errors = result["counts"].pop("transport_error", 0)
    counts = {int(k): v for k, v in result["counts"].items()}
    # the flood tool's own client may race a keep-alive close now and then (seen once in CI); a rare one is
    # not what this test is about, a server dropping connections under the flood would be
    assert transport_errors <= max(1, sum(counts.values()) // 100), (transport_errors, counts)
    assert counting.peak == 1                                       # never more than the pool's one hash at once
    assert counts.get(503, 0) > 0 and result["retry_after"] == ["1"]   # the rest refused at once, told when
    assert counts.get(401, 0) > 0 and set(counts) <= {401, 503}
    await eventually(lambda: pool.pending == 0, what="the pool drained")
    print(f"\nlocate round trip idle p50 {statistics.median(idle):.1f} ms; during a 32-client login flood "
          f"p50 {statistics.median(busy):.1f} ms, max {max(busy):.1f} ms; logins answered 401: "
          f"{counts.get(401, 0)}, 503: {counts.get(503, 0)}")
    assert statistics.median(busy) < 2000     # served during the flood (before the pool: 30 s timeouts)

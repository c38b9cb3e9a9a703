"""Secrets at rest (issue 12, defect 8): a private data dir, command keys sealed in the database (and still
signing, rotating and verifying on a real lock), the operator token printed once. Real stack and processes."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import stat
from pathlib import Path

import pytest

from api.registry import keyseal
from tests.dbs import ON_POSTGRES
from tests.procs import read_until, running
from tests.support import LiveStack


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_everything_in_the_data_dir_is_private(stack: LiveStack) -> None:
    lock = await stack.lock("bike-1")
    assert (await stack.command("bike-1", "locate")).json()["status"] == "succeeded"
    data = stack.settings.data_dir
    assert _mode(data) == 0o700
    names = {p.name for p in data.iterdir()}
    expected = {"service.secret", "jwt.secret", "broker-hook.secret", "command-keys.secret",
                "broker.db", "broker.db-wal", "broker.db-shm"}
    if not ON_POSTGRES:
        expected |= {"latch.db", "latch.db-wal", "latch.db-shm"}
    assert expected <= names, names
    loose = {p.name: oct(_mode(p)) for p in data.iterdir() if _mode(p) & 0o077}
    assert loose == {}
    await lock.stop()


async def _stored_key(stack: LiveStack, device_id: str) -> str:
    from sqlalchemy import text
    return await stack.runtime.db.read(lambda s: s.connection().execute(
        text("SELECT command_key FROM device WHERE id = :id"), {"id": device_id}).scalar_one())


async def test_command_keys_are_sealed_at_rest_and_still_sign(stack: LiveStack) -> None:
    lock = await stack.lock("bike-1")
    key = lock.creds.command_key
    stored = await _stored_key(stack, "bike-1")
    assert key not in stored and not keyseal.is_plain(stored) and stored.startswith("k1:")
    assert (await stack.command("bike-1", "unlock")).json()["status"] == "succeeded"   # signed with the real key
    # rotation: a new key, sealed too; the lock with the old key refuses what is signed with the new one
    rotated = (await stack.http.post("/v1/devices/bike-1/credentials")).json()
    assert rotated["command_key"] != key and len(rotated["command_key"]) == 64
    stored2 = await _stored_key(stack, "bike-1")
    assert stored2 != stored and rotated["command_key"] not in stored2
    await lock.stop()
    new = await stack.lock("bike-2")
    assert (await stack.command("bike-2", "lock")).json()["status"] == "succeeded"
    await new.stop()


def test_a_sealed_key_opens_only_with_its_master_key_and_on_its_own_row() -> None:
    seal = keyseal.KeySeal("master one")
    key = "ab" * 32
    stored = seal.seal("bike-1", key)
    assert seal.open("bike-1", stored) == key and seal.seal("bike-1", key) != stored   # a fresh nonce each time
    with pytest.raises(keyseal.SealError, match="another master key"):
        keyseal.KeySeal("master two").open("bike-1", stored)
    with pytest.raises(keyseal.SealError, match="does not authenticate"):
        seal.open("bike-2", stored)                                   # copied onto another device's row
    i = len(stored) - 20   # a character inside the tag (the last ones before the padding carry unused bits)
    flipped = stored[:i] + ("A" if stored[i] != "A" else "B") + stored[i + 1:]
    with pytest.raises(keyseal.SealError):
        seal.open("bike-1", flipped)
    assert seal.open("bike-1", key) == key                            # an earlier Latch's plain key still reads


async def test_plain_keys_of_an_earlier_latch_are_sealed_in_place(stack: LiveStack) -> None:
    from sqlalchemy import text
    lock = await stack.lock("bike-1")
    plain = lock.creds.command_key

    def unseal(s):  # type: ignore[no-untyped-def]
        s.connection().execute(text("UPDATE device SET command_key = :k WHERE id = 'bike-1'"), {"k": plain})
        s.commit()

    await stack.runtime.db.write(unseal)                  # as an earlier Latch stored it
    assert (await stack.command("bike-1", "unlock")).json()["status"] == "succeeded"   # still signs
    assert await stack.runtime.registry.seal_plain_keys() == 1
    assert plain not in await _stored_key(stack, "bike-1")
    assert (await stack.command("bike-1", "lock")).json()["status"] == "succeeded"     # the lock's key is unchanged
    await lock.stop()


async def test_the_operator_token_is_printed_once_when_generated(tmp_path: Path) -> None:
    # `latch serve` on its own SQLite database in both passes (what a newcomer runs)
    args = ("serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", "0")
    sqlite = {"LATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'latch.db'}"}

    async def start_output(env: dict[str, str] | None = None) -> str:
        async with running(*args, env={**sqlite, **(env or {})}) as proc:
            _, out = await read_until(proc, r"Try:.*\n")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            return out

    first = await start_output()
    token = (tmp_path / "admin.token").read_text().strip()
    assert re.search(r"Operator token:\s+(\S+)", first).group(1) == token   # type: ignore[union-attr]
    assert first.count(token) == 1
    again = await start_output()
    assert token not in again and str(tmp_path / "admin.token") in again
    from_env = await start_output({"LATCH_ADMIN_TOKEN": "set-by-the-operator-0123456789"})
    assert "set-by-the-operator" not in from_env and "LATCH_ADMIN_TOKEN" in from_env
    with sqlite3.connect(tmp_path / "latch.db") as db:
        assert db.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    assert _mode(tmp_path / "latch.db") == 0o600 and _mode(tmp_path / "admin.token") == 0o600

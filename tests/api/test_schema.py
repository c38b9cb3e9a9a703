"""The schema comes from the Alembic migrations, the same on SQLite and PostgreSQL, and a server checks it."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from api import schema
from api.db import Database
from tests.dbs import ON_POSTGRES, empty_postgres_url


@pytest.fixture
async def empty_db(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = Database(empty_postgres_url() if ON_POSTGRES else f"sqlite:///{tmp_path / 'm.db'}")
    try:
        yield db
    finally:
        await db.close()


def _diff(engine) -> list:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, schema.target_metadata())


async def test_migrations_build_exactly_the_models_schema(empty_db: Database) -> None:
    with pytest.raises(schema.SchemaNotReady, match="never migrated"):
        await schema.check(empty_db, empty_db.url)
    await schema.upgrade(empty_db)
    assert await schema.check(empty_db) == schema.head_revision()
    assert await empty_db.run_sync(_diff) == []   # the migrations and the models agree, column by column


async def test_every_migration_goes_down_and_up_again(empty_db: Database) -> None:
    await schema.upgrade(empty_db)
    revisions = [s.revision for s in schema.ScriptDirectory.from_config(schema.alembic_config()).walk_revisions()]
    await empty_db.run_sync(lambda e: schema.downgrade_engine(e, "base"))
    assert await empty_db.run_sync(schema.current_revision) is None
    for rev in reversed(revisions):            # oldest first, one step at a time
        await schema.upgrade(empty_db, rev)
        assert await empty_db.run_sync(schema.current_revision) == rev
    assert await empty_db.run_sync(_diff) == []


async def test_a_database_behind_the_code_is_refused_with_what_to_run(empty_db: Database) -> None:
    revisions = [s.revision for s in schema.ScriptDirectory.from_config(schema.alembic_config()).walk_revisions()]
    if len(revisions) < 2:
        await schema.upgrade(empty_db)
        await empty_db.run_sync(lambda e: _stamp(e, "0000unknown"))
        with pytest.raises(schema.SchemaNotReady, match="does not know"):
            await schema.check(empty_db)
        return
    await schema.upgrade(empty_db, revisions[-1])   # the oldest revision only
    with pytest.raises(schema.SchemaNotReady) as e:
        await schema.check(empty_db, empty_db.url)
    assert f"is at revision {revisions[-1]}, this Latch needs {schema.head_revision()}" in str(e.value)
    assert "run `latch db upgrade --database-url" in str(e.value)
    # a revision from a newer Latch
    await empty_db.run_sync(lambda e: _stamp(e, "9999future"))
    with pytest.raises(schema.SchemaNotReady, match="does not know"):
        await schema.check(empty_db)


def _stamp(engine, revision: str) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})

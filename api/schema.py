"""The database schema's version: Alembic migrations (api/migrations), applied and checked.

`latch db upgrade` applies them; `latch serve` (one process owning its own database) applies them
at start; every other server (`latch api`, `latch broker`) only checks, and refuses to start on a
database that is not at the code's revision, saying what to run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData

from api.db import Database

MIGRATIONS = Path(__file__).with_name("migrations")


log = logging.getLogger("latch.schema")


class SchemaNotReady(RuntimeError):
    """The database is not at the revision this code needs; str(e) says what to run."""


def target_metadata() -> MetaData:
    from sqlmodel import SQLModel

    from api import models  # noqa: F401  (registers the tables)
    from api.push import event_models  # noqa: F401
    try:
        from api.fleet import models as fleet_models  # noqa: F401
    except ImportError:
        pass
    from api.notifications import models as notification_models  # noqa: F401
    return SQLModel.metadata


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "api/migrations has no revisions"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade_engine(engine: Engine, revision: str) -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def check_engine(engine: Engine, url_hint: str = "") -> str:
    """The current revision; SchemaNotReady unless it is the head."""
    head, current = head_revision(), current_revision(engine)
    if current == head:
        return current
    run = "latch db upgrade" + (f" --database-url '{display_url(url_hint)}'" if url_hint else "")
    if current is None:
        problem = "has no Latch schema (never migrated)"
    elif current in {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}:
        problem = f"is at revision {current}, this Latch needs {head}"
    else:
        problem = f"is at revision {current}, which this Latch does not know (a newer Latch migrated it?)"
    raise SchemaNotReady(f"the database {problem}: run `{run}` first")


async def upgrade(db: Database, revision: str = "head") -> None:
    await db.run_sync(lambda engine: upgrade_engine(engine, revision))


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Database]:
    """The database at `url`, checked to be at the code's revision (SchemaNotReady otherwise), closed after: for a
    command that reads the registry once (`latch broker-config`)."""
    db = Database(url)
    try:
        await check(db, url)
        yield db
    finally:
        await db.close()


async def check(db: Database, url_hint: str = "") -> str:
    return await db.run_sync(lambda engine: check_engine(engine, url_hint))


def _empty(engine: Engine) -> bool:
    from sqlalchemy import inspect

    return current_revision(engine) is None and not inspect(engine).get_table_names()


async def prepare(db: Database, url_hint: str = "") -> str:
    """What `latch broker` and `latch api` do at start: an empty SQLite database (a first start on a fresh
    data dir) is created at the code's revision, with one log line; anything else must already be at it
    (SchemaNotReady with the command to run). PostgreSQL is never migrated implicitly: a shared database
    is upgraded once, on purpose (`latch db upgrade`), not by whichever replica starts first."""
    if not db.is_postgres and await db.run_sync(_empty):
        try:
            await upgrade(db)
            log.info("created a new Latch database at revision %s: %s", head_revision(), display_url(url_hint))
        except Exception:   # another process (the broker or the API beside it) created it at the same moment
            log.debug("creating the database raced another process; checking it", exc_info=True)
    return await check(db, url_hint)


def display_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 — a message helper; never the reason a message is lost
        return url

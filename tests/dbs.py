"""Which database the tests run on, and a fresh one per test.

`./run test` runs the suite once per database it can (LATCH_TEST_DATABASE=sqlite, then =postgresql).
PostgreSQL comes from LATCH_TEST_PG_URL, a superuser URL of a throwaway cluster (./run starts one
with pg_createcluster when it can). Each test gets its own database, cloned from a template that
was migrated once with the real migrations (CREATE DATABASE ... TEMPLATE: a few ms, not a migration
per test), and dropped when the test ends.
"""

from __future__ import annotations

import itertools
import os
import threading

from sqlalchemy.engine import make_url

from tests.support import require

TEST_DATABASE = os.environ.get("LATCH_TEST_DATABASE", "sqlite")
PG_URL = os.environ.get("LATCH_TEST_PG_URL")
# The driver the PostgreSQL pass drives its databases with: Latch's default for postgresql:// URLs
# (asyncpg, api/db.py) unless LATCH_TEST_PG_DRIVER names another (postgresql+psycopg).
PG_DRIVER = os.environ.get("LATCH_TEST_PG_DRIVER", "postgresql+asyncpg")
ON_POSTGRES = TEST_DATABASE == "postgresql"

_lock = threading.Lock()
_template: str | None = None
_names = itertools.count(1)
created: list[str] = []   # databases made since the last drop_created()


def _admin():  # type: ignore[no-untyped-def]
    import psycopg

    assert PG_URL
    return psycopg.connect(make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False),
                           autocommit=True)


def _url(dbname: str, driver: str | None = None) -> str:
    return make_url(PG_URL or "").set(drivername=driver or PG_DRIVER, database=dbname).render_as_string(
        hide_password=False)


def _ensure_template() -> str:
    global _template
    with _lock:
        if _template is None:
            from api.db import make_engine
            from api.schema import upgrade_engine

            name = f"latch_tpl_{os.getpid()}"
            with _admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
            engine = make_engine(_url(name))
            try:
                upgrade_engine(engine)   # the real migrations, once
            finally:
                engine.dispose()
            _template = name
        return _template


def postgres_url(driver: str | None = None) -> str:
    """A new, migrated PostgreSQL database for this test (requires LATCH_TEST_PG_URL), for `driver`
    (a SQLAlchemy driver name; default PG_DRIVER)."""
    require(bool(PG_URL), "PostgreSQL (LATCH_TEST_PG_URL, set by ./run test)")
    template = _ensure_template()
    name = f"latch_t{os.getpid()}_{next(_names)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    created.append(name)
    return _url(name, driver)


def empty_postgres_url() -> str:
    """A new PostgreSQL database with no schema at all."""
    require(bool(PG_URL), "PostgreSQL (LATCH_TEST_PG_URL, set by ./run test)")
    name = f"latch_e{os.getpid()}_{next(_names)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    created.append(name)
    return _url(name)


def run_database_url() -> str | None:
    """The database a test's stack uses: None (SQLite in its data dir) or a fresh PostgreSQL one."""
    return postgres_url() if ON_POSTGRES else None


def drop_created() -> None:
    if not created or not PG_URL:
        return
    with _admin() as conn:
        while created:
            conn.execute(f'DROP DATABASE IF EXISTS "{created.pop()}" WITH (FORCE)')


def drop_template() -> None:
    global _template
    if _template is not None and PG_URL:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{_template}" WITH (FORCE)')
        _template = None

"""Alembic's entry point: migrations run on a connection api/schema.py hands over (or on alembic's own URL).

SQLite cannot ALTER most things in place, so migrations run in batch mode there (copy-and-move of
the table); on PostgreSQL batch operations are plain ALTERs.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from api.schema import target_metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata(),
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
elif context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata(),
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    from api.db import sync_url

    engine = create_engine(sync_url(config.get_main_option("sqlalchemy.url") or ""), poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)

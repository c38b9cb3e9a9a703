"""Alembic migrations of Latch's database (SQLite and PostgreSQL). Applied by `latch db upgrade` (api/schema.py)."""

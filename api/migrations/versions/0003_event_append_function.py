"""event append in one round trip (PostgreSQL)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 (api/push/events.py: on PostgreSQL a transaction's events are inserted by
latch_append_events(), which takes the event-order lock, inserts them in order and sends NOTIFY — one
statement, so the lock that orders every replica's events is held for one round trip and the COMMIT,
not for three). SQLite has no functions and needs none (one writer): nothing changes there.
"""

from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# NOTIFY's payload limit is 8,000 bytes: a commit's events go in it when they fit (other replicas then
# publish them without reading them back), else only the newest id (they read the rows).
APPEND_EVENTS = r"""
CREATE FUNCTION latch_append_events(order_lock bigint, channel text, events json) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    e json;
    new_id bigint;
    parts text[] := '{}';
    payload text;
BEGIN
    PERFORM pg_advisory_xact_lock(order_lock);
    FOR e IN SELECT t.value FROM json_array_elements(events) WITH ORDINALITY AS t(value, n) ORDER BY t.n LOOP
        INSERT INTO event (at, kind, audience, data)
            VALUES ((e->>'at')::bigint, e->>'kind', e->>'audience', e->'data')
            RETURNING id INTO new_id;
        parts := parts || json_build_array(new_id, e->'at', e->'kind', e->'audience', e->'data')::text;
        RETURN NEXT new_id;
    END LOOP;
    IF new_id IS NOT NULL THEN
        payload := '[' || array_to_string(parts, ',') || ']';
        IF octet_length(payload) > 7900 THEN
            payload := new_id::text;
        END IF;
        PERFORM pg_notify(channel, payload);
    END IF;
    RETURN;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(APPEND_EVENTS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS latch_append_events(bigint, text, json)")

"""notifications

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 (issue 14, section 1: api/notifications). `notification`: one row per notification
whatever its audience (the audience as sent, resolved at send time for "riding"; its first event id; the
counts each API process flushes); `notification_pref`: a user's opt-outs, quiet hours and time zone (no row =
the defaults); `notification_receipt`: a row only for a rider who reported it seen or pressed an action.
The notification's positions in the stream are ordinary `event` rows (kind "notification", audience "*").
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('notification',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('title', sqlmodel.sql.sqltypes.AutoString(length=120), nullable=True),
    sa.Column('body', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=True),
    sa.Column('actions', sa.JSON(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('audience', sa.JSON(), nullable=False),
    sa.Column('audience_size', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('delivered', sa.Integer(), nullable=False),
    sa.Column('mqtt_published', sa.Integer(), nullable=False),
    sa.Column('held_opted_out', sa.Integer(), nullable=False),
    sa.Column('held_quiet_hours', sa.Integer(), nullable=False),
    sa.Column('held_capped', sa.Integer(), nullable=False),
    sa.Column('expired', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_notification_created', 'notification', ['created_at'], unique=False)
    op.create_table('notification_pref',
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('opt_out', sa.JSON(), nullable=False),
    sa.Column('quiet_start_s', sa.Integer(), nullable=True),
    sa.Column('quiet_end_s', sa.Integer(), nullable=True),
    sa.Column('timezone', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('user_id')
    )
    op.create_index('ix_notification_pref_updated_at', 'notification_pref', ['updated_at'], unique=False)
    op.create_table('notification_receipt',
    sa.Column('notification_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('seen_at', sa.BigInteger(), nullable=True),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('action_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['notification_id'], ['notification.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('notification_id', 'user_id')
    )


def downgrade() -> None:
    op.drop_table('notification_receipt')
    op.drop_index('ix_notification_pref_updated_at', table_name='notification_pref')
    op.drop_table('notification_pref')
    op.drop_index('ix_notification_created', table_name='notification')
    op.drop_table('notification')

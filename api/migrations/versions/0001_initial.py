"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 (the schema of Latch 0.1: devices, commands and their history, users, rides, the event log)
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('secret_hash', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('command_key', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('online', sa.Boolean(), nullable=False),
    sa.Column('last_seen', sa.BigInteger(), nullable=True),
    sa.Column('reported', sa.JSON(), nullable=False),
    sa.Column('reported_at', sa.BigInteger(), nullable=True),
    sa.Column('zone', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_zone'), ['zone'], unique=False)

    op.create_table('event',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', sa.BigInteger(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('audience', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.create_index('ix_event_audience_id', ['audience', 'id'], unique=False)

    op.create_table('user',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=254), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('password_hash', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('email')
    )
    op.create_table('command',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('request_hash', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.Column('deadline_ms', sa.BigInteger(), nullable=True),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('owner', 'idempotency_key', name='uq_command_idempotency')
    )
    with op.batch_alter_table('command', schema=None) as batch_op:
        batch_op.create_index('ix_command_created', ['created_at'], unique=False)
        batch_op.create_index('ix_command_deadline', ['deadline_ms'], unique=False)
        batch_op.create_index('ix_command_device_created', ['device_id', 'created_at'], unique=False)
        batch_op.create_index('ix_command_owner_created', ['owner', 'created_at'], unique=False)

    op.create_table('device_tag',
    sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tag', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.PrimaryKeyConstraint('device_id', 'tag')
    )
    with op.batch_alter_table('device_tag', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_tag_tag'), ['tag'], unique=False)

    op.create_table('ride',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('unlock_command_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('end_command_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('started_at', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.Column('ended_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('ride', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ride_unlock_command_id'), ['unlock_command_id'], unique=False)
        batch_op.create_index('ix_ride_user_started', ['user_id', 'started_at'], unique=False)
        batch_op.create_index('uq_ride_open_device', ['device_id'], unique=True,
                              sqlite_where=sa.text("status IN ('starting', 'active')"),
                              postgresql_where=sa.text("status IN ('starting', 'active')"))
        batch_op.create_index('uq_ride_open_user', ['user_id'], unique=True,
                              sqlite_where=sa.text("status IN ('starting', 'active')"),
                              postgresql_where=sa.text("status IN ('starting', 'active')"))

    op.create_table('commandevent',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('command_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('at', sa.BigInteger(), nullable=False),
    sa.Column('event', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('from_status', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('to_status', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('applied', sa.Boolean(), nullable=False),
    sa.Column('detail', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.ForeignKeyConstraint(['command_id'], ['command.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('commandevent', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commandevent_command_id'), ['command_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('commandevent', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commandevent_command_id'))

    op.drop_table('commandevent')
    with op.batch_alter_table('ride', schema=None) as batch_op:
        batch_op.drop_index('uq_ride_open_user', sqlite_where=sa.text("status IN ('starting', 'active')"),
                            postgresql_where=sa.text("status IN ('starting', 'active')"))
        batch_op.drop_index('uq_ride_open_device', sqlite_where=sa.text("status IN ('starting', 'active')"),
                            postgresql_where=sa.text("status IN ('starting', 'active')"))
        batch_op.drop_index('ix_ride_user_started')
        batch_op.drop_index(batch_op.f('ix_ride_unlock_command_id'))

    op.drop_table('ride')
    with op.batch_alter_table('device_tag', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_tag_tag'))

    op.drop_table('device_tag')
    with op.batch_alter_table('command', schema=None) as batch_op:
        batch_op.drop_index('ix_command_owner_created')
        batch_op.drop_index('ix_command_device_created')
        batch_op.drop_index('ix_command_deadline')
        batch_op.drop_index('ix_command_created')

    op.drop_table('command')
    op.drop_table('user')
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.drop_index('ix_event_audience_id')

    op.drop_table('event')
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_zone'))

    op.drop_table('device')

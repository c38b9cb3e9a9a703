"""events on NATS JetStream

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 (issue 14, section 3: api/push/nats_bus.py). `event.seq`: an event's JetStream sequence
once relayed (the cursor when LATCH_NATS_URL is set; NULL without NATS); `event_outbox`: with NATS, the events
committed but not yet acknowledged by JetStream, written in the transaction of the change and deleted once
relayed, so nothing committed is lost while NATS is away.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('event', sa.Column('seq', sa.BigInteger(), nullable=True))
    op.create_index('ix_event_seq', 'event', ['seq'], unique=True)
    op.create_table('event_outbox',
    sa.Column('event_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('origin', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.PrimaryKeyConstraint('event_id')
    )


def downgrade() -> None:
    op.drop_table('event_outbox')
    op.drop_index('ix_event_seq', table_name='event')
    op.drop_column('event', 'seq')

"""riders' MQTT logins

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 (issue 14). `user.mqtt_login_at`: when the rider's app last logged into the broker
(recorded at most hourly by the login check, api/registry/credentials.py). A notification's MQTT copies go only to
riders who logged in within LATCH_NOTIFY_MQTT_SESSION_S: a copy on the topic of a rider with no session on
the broker is dropped by it, and at 10,000 riders one notification to all was 10,000 such publishes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('user', sa.Column('mqtt_login_at', sa.BigInteger(), nullable=True))
    op.create_index('ix_user_mqtt_login_at', 'user', ['mqtt_login_at'])


def downgrade() -> None:
    op.drop_index('ix_user_mqtt_login_at', table_name='user')
    op.drop_column('user', 'mqtt_login_at')

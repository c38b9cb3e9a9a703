"""revocable sessions

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 (issue 12, defect 7: api/riders/users.py Sessions). `user_session`: one row per login,
named by the access token's `sid` claim, refused once revoked (logout, password change) or once its user is
deleted; `user.deleted_at` marks a deleted account (the row stays: rides and commands still name it).
Tokens issued before this revision carry no `sid` and are refused: everyone logs in once again.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('user_session',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.Column('revoked_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_user_session_user_expires', 'user_session', ['user_id', 'expires_at'], unique=False)
    with op.batch_alter_table('user') as batch:
        batch.add_column(sa.Column('deleted_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('user') as batch:
        batch.drop_column('deleted_at')
    op.drop_index('ix_user_session_user_expires', table_name='user_session')
    op.drop_table('user_session')

"""the platform fee (issue 15): spend_requests.fee_micros and the platform's own ledger

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 15:40:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('spend_requests') as batch:
        batch.add_column(sa.Column('fee_micros', sa.BigInteger(), nullable=True))
    op.create_table('platform_ledger',
    sa.Column('id', sa.String(length=40), nullable=False, comment='pfl_'),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('amount_micros', sa.BigInteger(), nullable=False),
    sa.Column('ref', sa.String(length=120), nullable=True),
    sa.Column('project_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_platform_ledger'))
    )
    op.create_index(op.f('ix_platform_ledger_project_id'), 'platform_ledger', ['project_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_platform_ledger_project_id'), table_name='platform_ledger')
    op.drop_table('platform_ledger')
    with op.batch_alter_table('spend_requests') as batch:
        batch.drop_column('fee_micros')

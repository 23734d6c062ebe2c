"""the platform fee (issue 15): spend_requests.fee_micros (the fee itself is booked on platform_ledger, 0007)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 15:40:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('spend_requests') as batch:
        batch.add_column(sa.Column('fee_micros', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('spend_requests') as batch:
        batch.drop_column('fee_micros')

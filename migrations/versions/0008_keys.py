"""keys: virtual-key limits — expiry, allowed models, scopes, rate limits — and budgets scoped to a key (issue 15)

Keys made before this revision get no scopes: like every key they may call the gateway and read their own
requests and usage; a key that must read more (the audit log, budgets, the wallet…) is granted it anew.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 15:20:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('api_keys') as batch:
        batch.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('allowed_models', JSON, nullable=True))
        batch.add_column(sa.Column('scopes', JSON, nullable=False, server_default='[]'))
        batch.add_column(sa.Column('rate_limits', JSON, nullable=False, server_default='{}'))
    with op.batch_alter_table('budgets') as batch:
        batch.add_column(sa.Column('key_id', sa.String(length=40), nullable=True))
        batch.create_foreign_key('fk_budgets_key_id_api_keys', 'api_keys', ['key_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('budgets') as batch:
        batch.drop_constraint('fk_budgets_key_id_api_keys', type_='foreignkey')
        batch.drop_column('key_id')
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_column('rate_limits')
        batch.drop_column('scopes')
        batch.drop_column('allowed_models')
        batch.drop_column('expires_at')

"""catalog: aliases and the upstream's own model name (issue 15); seeded Anthropic ids get their dated names

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 15:20:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')

# Frozen copy of domain.catalog.SEED's Anthropic names at this revision.
DATED = {
    "anthropic/claude-3-5-haiku": ("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"),
    "anthropic/claude-3-5-sonnet": ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet-latest"),
    "anthropic/claude-sonnet-4": ("claude-sonnet-4-20250514",),
    "anthropic/claude-sonnet-4-5": ("claude-sonnet-4-5-20250929",),
    "anthropic/claude-haiku-4-5": ("claude-haiku-4-5-20251001",),
    "anthropic/claude-opus-4": ("claude-opus-4-20250514",),
    "anthropic/claude-3-opus": ("claude-3-opus-20240229", "claude-3-opus-latest"),
    "anthropic/claude-3-sonnet": ("claude-3-sonnet-20240229",),
    "anthropic/claude-3-haiku": ("claude-3-haiku-20240307",),
}


def upgrade() -> None:
    with op.batch_alter_table('catalog_models') as batch:
        batch.add_column(sa.Column('aliases', JSON, server_default='[]', nullable=False))
        batch.add_column(sa.Column('upstream_model', sa.String(length=200), nullable=True))
    # Rows seeded before this revision: the real API rejects the short Anthropic names.
    table = sa.table('catalog_models', sa.column('id', sa.String), sa.column('aliases', JSON),
                     sa.column('upstream_model', sa.String))
    for id_, (upstream, *aliases) in DATED.items():
        op.execute(table.update().where(table.c.id == id_).where(table.c.upstream_model.is_(None))
                   .values(upstream_model=upstream, aliases=[upstream, *aliases]))


def downgrade() -> None:
    with op.batch_alter_table('catalog_models') as batch:
        batch.drop_column('upstream_model')
        batch.drop_column('aliases')

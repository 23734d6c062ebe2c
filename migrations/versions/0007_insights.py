"""insights: the brain's findings (one open per kind and subject), evaluation runs, the platform ledger (issue 11)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 14:30:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('insights',
    sa.Column('id', sa.String(length=40), nullable=False, comment='ins_'),
    sa.Column('project_id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('subject_key', sa.String(length=300), nullable=False),
    sa.Column('subject', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('severity', sa.String(length=10), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('evidence', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('note', sa.String(length=500), nullable=True),
    sa.Column('acted_by', sa.String(length=100), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_insights_project_id_projects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_insights'))
    )
    with op.batch_alter_table('insights', schema=None) as batch_op:
        batch_op.create_index('uq_insights_open_slot', ['project_id', 'kind', 'subject_key'], unique=True,
                              sqlite_where=sa.text('resolved_at IS NULL'),
                              postgresql_where=sa.text('resolved_at IS NULL'))
        batch_op.create_index('ix_insights_project_id', ['project_id', 'id'], unique=False)

    op.create_table('insight_runs',
    sa.Column('project_id', sa.String(length=40), nullable=False),
    sa.Column('evaluated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_insight_runs_project_id_projects')),
    sa.PrimaryKeyConstraint('project_id', name=op.f('pk_insight_runs'))
    )
    with op.batch_alter_table('insight_runs', schema=None) as batch_op:
        batch_op.create_index('ix_insight_runs_evaluated_at', ['evaluated_at'], unique=False)

    op.create_table('platform_ledger',
    sa.Column('id', sa.String(length=40), nullable=False, comment='pld_'),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('amount_micros', sa.BigInteger(), nullable=False),
    sa.Column('project_id', sa.String(length=40), nullable=False),
    sa.Column('ref', sa.String(length=120), nullable=True),
    sa.Column('memo', sa.String(length=500), server_default='', nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_platform_ledger_project_id_projects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_platform_ledger'))
    )
    with op.batch_alter_table('platform_ledger', schema=None) as batch_op:
        batch_op.create_index('ix_platform_ledger_project_created', ['project_id', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('platform_ledger', schema=None) as batch_op:
        batch_op.drop_index('ix_platform_ledger_project_created')
    op.drop_table('platform_ledger')
    with op.batch_alter_table('insight_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_insight_runs_evaluated_at')
    op.drop_table('insight_runs')
    with op.batch_alter_table('insights', schema=None) as batch_op:
        batch_op.drop_index('ix_insights_project_id')
        batch_op.drop_index('uq_insights_open_slot')
    op.drop_table('insights')

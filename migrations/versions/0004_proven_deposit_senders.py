"""deposit senders need proof of ownership (issue 9 item 4): forget the ones registered without it

Until this revision anyone could register any address as their project's deposit sender, and so be
credited with that wallet's transfers to the shared treasury. Every row present now was registered
without a signature; none can be trusted. They are deleted: the rightful owners register again with the
challenge + signature flow (a deposit they claim meanwhile is refused and stays claimable afterwards).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 14:45:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM deposit_senders")


def downgrade() -> None:
    pass  # the unproven registrations are not restored

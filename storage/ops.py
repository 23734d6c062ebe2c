"""Cheap reads for operators (/metrics): no project scoping, aggregates only."""

from __future__ import annotations

import sqlalchemy as sa

from storage.db import Database
from storage.models import spend_requests

# The statuses that hold a reservation (domain.spend.OPEN_STATUSES), read through ix_spend_requests_status_expiry.
HOLDING = ("pending_approval", "approved", "executing")


async def open_reservations(db: Database) -> dict[str, tuple[int, int]]:
    """status → (requests, reserved micro-USDC) over every open spend request; every holding status present."""
    s = spend_requests.c
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(s.status, sa.func.count(), sa.func.coalesce(sa.func.sum(s.reserved_micros), 0))
            .where(s.status.in_(HOLDING)).group_by(s.status))
        found = {status: (int(n), int(micros)) for status, n, micros in rows}
    return {status: found.get(status, (0, 0)) for status in HOLDING}

"""Usage: what a project spent over a window, from its settled requests and its ledger.

Totals and breakdowns by model, agent and UTC day, each with the estimate-vs-actual variance
(``variance_micros = estimated - actual``: positive means the reservation over-estimated, which is
the safe direction; ``variance_pct`` is that over the estimate).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import msgspec

from domain.base import utcnow
from domain.errors import InvalidRequest

if TYPE_CHECKING:
    from domain.scope import Scope

DEFAULT_WINDOW = timedelta(days=30)
MAX_WINDOW = timedelta(days=366)


class UsageRow(msgspec.Struct, kw_only=True):
    key: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    estimated_cost_micros: int  # the worst cases reserved (platform fee included)
    fee_micros: int = 0  # the platform fee paid on top of cost_micros
    variance_micros: int = 0
    variance_pct: float | None = None

    def __post_init__(self) -> None:
        self.variance_micros = self.estimated_cost_micros - self.cost_micros - self.fee_micros
        self.variance_pct = (round(self.variance_micros * 100 / self.estimated_cost_micros, 2)
                             if self.estimated_cost_micros else None)


class UsageReport(msgspec.Struct, kw_only=True):
    project_id: str
    since: datetime
    until: datetime
    totals: UsageRow
    by_model: list[UsageRow]
    by_agent: list[UsageRow]
    by_day: list[UsageRow]
    requests_by_status: dict[str, int]
    ledger: dict[str, int]  # sum of ledger entries by kind over the window (debits negative)
    # Set when the report covers one API key's requests only (a key without the usage:read scope);
    # the project's ledger is then left out.
    key_id: str | None = None


class Usage:
    """``scope.usage``: GET /projects/{id}/usage (viewers and up)."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def report(self, project_id: str, since: datetime | None = None,
                     until: datetime | None = None) -> UsageReport:
        await self.scope.projects.require(project_id, "viewer")
        until = until or utcnow()
        since = since or until - DEFAULT_WINDOW
        if since.tzinfo is None or until.tzinfo is None:
            raise InvalidRequest("since and until must be RFC 3339 times with a zone (e.g. 2026-11-01T00:00:00Z)")
        if since >= until:
            raise InvalidRequest("since must be before until", {"since": since.isoformat(), "until": until.isoformat()})
        if until - since > MAX_WINDOW:
            raise InvalidRequest("the window can be at most 366 days")
        repo = self.scope.store.spend_requests
        actor = self.scope.actor
        key_id = None if actor.may("usage:read") else actor.id
        totals = await repo.usage(project_id, since, until, "total", key_id=key_id)
        return UsageReport(
            project_id=project_id, since=since, until=until,
            totals=totals[0] if totals else UsageRow(key="total", requests=0, input_tokens=0, output_tokens=0,
                                                     cost_micros=0, estimated_cost_micros=0),
            by_model=await repo.usage(project_id, since, until, "model", key_id=key_id),
            by_agent=await repo.usage(project_id, since, until, "agent", key_id=key_id),
            by_day=await repo.usage(project_id, since, until, "day", key_id=key_id),
            requests_by_status=await repo.status_counts(project_id, since, until, key_id=key_id),
            ledger={} if key_id else await self.scope.store.wallets.ledger_totals(project_id, since, until),
            key_id=key_id)

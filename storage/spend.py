"""Spend requests: status transitions as conditional UPDATEs, the sweeper's pick of stale
reservations (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), and the usage aggregates."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from domain.base import Page, PageRequest
from domain.spend import OPEN_STATUSES, SpendRequest
from domain.usage import UsageRow
from storage.base import Repository
from storage.models import catalog_models, spend_requests

s = spend_requests.c


def transition_stmt(id_: Any, from_statuses: tuple[str, ...], returning: tuple[Any, ...] = (spend_requests,),
                    **values: Any) -> sa.Update:
    """Update iff the request is still in one of ``from_statuses``: exactly one writer wins a race. Shared
    by the repository and both hot paths (storage/hot.py, storage/sqlite_hot.py)."""
    return (sa.update(spend_requests).where(s.id == id_, s.status.in_(from_statuses)).values(**values)
            .returning(*returning))


class SpendRequests(Repository[SpendRequest]):
    table = spend_requests
    entity = SpendRequest

    async def transition(self, id_: str, from_statuses: tuple[str, ...], **values: Any) -> SpendRequest | None:
        """Update iff the request is still in one of ``from_statuses``: exactly one writer wins a race."""
        row = (await self.conn.execute(transition_stmt(id_, from_statuses, **values))).first()
        return self.to_entity(row) if row else None

    async def list(self, project_id: str, page: PageRequest, status: str | None = None, *,
                   key_id: str | None = None) -> Page[SpendRequest]:
        where = [s.project_id == project_id]
        if status:
            where.append(s.status == status)
        if key_id is not None:
            where.append(s.key_id == key_id)
        return await self.paginate(page, *where)

    async def stale(self, now: datetime, limit: int) -> builtins.list[SpendRequest]:
        """Open requests whose reservation (or approval window) has run out, locked for this sweeper;
        rows another sweeper (another process) holds are skipped, not waited for."""
        stmt = (sa.select(spend_requests)
                .where(s.status.in_(OPEN_STATUSES), s.reservation_expires_at < now)
                .order_by(s.project_id, s.id).limit(limit))
        if self.conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        return [self.to_entity(r) for r in await self.conn.execute(stmt)]

    async def by_idempotency_key(self, project_id: str, key: str, since: datetime) -> SpendRequest | None:
        """The latest request made with this Idempotency-Key since ``since``."""
        row = (await self.conn.execute(sa.select(spend_requests).where(
            s.project_id == project_id, s.idempotency_key == key, s.created_at >= since)
            .order_by(s.created_at.desc(), s.id.desc()).limit(1))).first()
        return self.to_entity(row) if row else None

    async def prices(self, model_id: str) -> tuple[int, int] | None:
        c = catalog_models.c
        row = (await self.conn.execute(sa.select(c.input_micros_per_mtok, c.output_micros_per_mtok)
                                       .where(c.id == model_id))).first()
        return (int(row[0]), int(row[1])) if row else None

    async def usage(self, project_id: str, since: datetime, until: datetime, by: str, *,
                    key_id: str | None = None) -> builtins.list[UsageRow]:
        """Settled (or partly charged) requests in [since, until), by ``model``, ``agent``, ``key`` or ``day``;
        only one key's with ``key_id``."""
        if by == "model":
            key: Any = s.model
        elif by == "agent":
            key = s.agent_id
        elif by == "key":
            key = s.key_id
        elif by == "day":
            key = (sa.func.to_char(s.settled_at, "YYYY-MM-DD") if self.conn.dialect.name == "postgresql"
                   else sa.func.strftime("%Y-%m-%d", s.settled_at))
        else:
            key = sa.literal("total")
        charged = sa.and_(s.project_id == project_id, s.settled_at.is_not(None), s.settled_at >= since,
                          s.settled_at < until, sa.true() if key_id is None else s.key_id == key_id)
        stmt = (sa.select(key.label("key"), sa.func.count().label("requests"),
                          sa.func.coalesce(sa.func.sum(s.input_tokens), 0).label("input_tokens"),
                          sa.func.coalesce(sa.func.sum(s.output_tokens), 0).label("output_tokens"),
                          sa.func.coalesce(sa.func.sum(s.cost_micros), 0).label("cost_micros"),
                          sa.func.coalesce(sa.func.sum(s.estimated_cost_micros), 0).label("estimated_cost_micros"),
                          sa.func.coalesce(sa.func.sum(s.fee_micros), 0).label("fee_micros"))
                .where(charged).group_by(key).order_by(key))
        return [UsageRow(key=r.key, requests=int(r.requests), input_tokens=int(r.input_tokens),
                         output_tokens=int(r.output_tokens), cost_micros=int(r.cost_micros),
                         estimated_cost_micros=int(r.estimated_cost_micros), fee_micros=int(r.fee_micros))
                for r in await self.conn.execute(stmt)]

    async def status_counts(self, project_id: str, since: datetime, until: datetime, *,
                            key_id: str | None = None) -> dict[str, int]:
        rows = await self.conn.execute(
            sa.select(s.status, sa.func.count()).where(
                s.project_id == project_id, s.created_at >= since, s.created_at < until,
                sa.true() if key_id is None else s.key_id == key_id).group_by(s.status))
        return {r[0]: int(r[1]) for r in rows}

"""Budget rows. Reservations, releases and settlements are single conditional UPDATE … RETURNING
statements: on PostgreSQL the UPDATE takes the row lock and re-checks its WHERE clause against the
committed row, so concurrent reservations from any number of processes can never exceed the limit."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from domain.base import Page, PageRequest
from domain.budgets import Budget
from storage.base import Repository
from storage.models import budgets

b = budgets.c


class Budgets(Repository[Budget]):
    table = budgets
    entity = Budget

    async def _one(self, stmt: Any) -> Budget | None:
        row = (await self.conn.execute(stmt.returning(budgets))).first()
        return self.to_entity(row) if row else None

    async def list(self, project_id: str, page: PageRequest, agent_id: str | None = None) -> Page[Budget]:
        where = [b.project_id == project_id, b.active.is_(True)]
        if agent_id is not None:
            where.append(b.agent_id == agent_id)
        return await self.paginate(page, *where)

    async def applicable(self, project_id: str, agent_id: str | None) -> builtins.list[Budget]:
        scope = b.agent_id.is_(None) if agent_id is None else sa.or_(b.agent_id.is_(None), b.agent_id == agent_id)
        rows = await self.conn.execute(sa.select(budgets).where(
            b.project_id == project_id, b.active.is_(True), scope).order_by(b.id))
        return [self.to_entity(r) for r in rows]

    async def roll(self, id_: str, new_start: datetime, now: datetime) -> Budget | None:
        return await self._one(sa.update(budgets).where(b.id == id_, b.period_start < new_start).values(
            period_start=new_start, spent_micros=0, alerted=[], updated_at=now))

    async def reserve(self, id_: str, amount: int, now: datetime) -> Budget | None:
        return await self._one(
            sa.update(budgets)
            .where(b.id == id_, b.active.is_(True), b.spent_micros + b.reserved_micros + amount <= b.limit_micros)
            .values(reserved_micros=b.reserved_micros + amount, updated_at=now))

    async def release(self, id_: str, amount: int, now: datetime) -> Budget | None:
        return await self._one(
            sa.update(budgets).where(b.id == id_, b.reserved_micros >= amount)
            .values(reserved_micros=b.reserved_micros - amount, updated_at=now))

    async def settle(self, id_: str, held: int, cost: int, now: datetime) -> Budget | None:
        """reserved -= held, spent += cost. cost <= held keeps spent + reserved <= limit."""
        return await self._one(
            sa.update(budgets).where(b.id == id_, b.reserved_micros >= held)
            .values(reserved_micros=b.reserved_micros - held, spent_micros=b.spent_micros + cost, updated_at=now))

    async def set_limit(self, id_: str, limit: int, now: datetime) -> Budget | None:
        return await self._one(
            sa.update(budgets).where(b.id == id_, b.spent_micros + b.reserved_micros <= limit)
            .values(limit_micros=limit, updated_at=now))

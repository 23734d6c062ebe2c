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


def applies_to(agent_id: str | sa.ColumnElement[str] | None,
               key_id: str | sa.ColumnElement[str] | None) -> sa.ColumnElement[bool]:
    """THE applicability rule, in one expression: an active budget applies to a request if it is
    project-wide or the request's agent's, and project-wide or the request's key's. ``agent_id`` /
    ``key_id``: values, or bound parameters (a None value matches only the unscoped budgets)."""
    agent = agent_id if isinstance(agent_id, sa.ColumnElement) else sa.bindparam("agent_id", agent_id, sa.String)
    key = key_id if isinstance(key_id, sa.ColumnElement) else sa.bindparam("key_id", key_id, sa.String)
    return sa.and_(b.active.is_(True), sa.or_(b.agent_id.is_(None), b.agent_id == agent),
                   sa.or_(b.key_id.is_(None), b.key_id == key))


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

    async def applicable(self, project_id: str, agent_id: str | None,
                         key_id: str | None = None) -> builtins.list[Budget]:
        rows = await self.conn.execute(sa.select(budgets).where(
            b.project_id == project_id, applies_to(agent_id, key_id)).order_by(b.id))
        return [self.to_entity(r) for r in rows]

    async def by_ids(self, ids: builtins.list[str]) -> builtins.list[Budget]:
        rows = await self.conn.execute(sa.select(budgets).where(b.id.in_(ids), b.active.is_(True)).order_by(b.id))
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

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


# ---------------------------------------------------------------- the statements every path shares
# (the generic repository below, and storage/sqlite_hot.py on its writer's synchronous connection)
def applies(project_id: Any, agent_id: Any, key_id: Any) -> sa.ColumnElement[bool]:
    """The budgets a request of ``agent_id`` / ``key_id`` in ``project_id`` reserves on (``applies_to``).
    Values or bound parameters (storage/hot.py compiles it once with parameters)."""
    return sa.and_(b.project_id == project_id, applies_to(agent_id, key_id))


def has_room(amount: Any) -> sa.ColumnElement[bool]:
    """Budget room: reserving ``amount`` keeps spent + reserved within the limit."""
    return b.spent_micros + b.reserved_micros + amount <= b.limit_micros


def in_current_period(day: Any, week: Any, month: Any) -> sa.ColumnElement[bool]:
    """The budget's period has not ended (else it must roll first: ``domain.budgets.needs_roll``), given the
    current day, week and month starts (``domain.budgets.period_start``)."""
    return b.period_start >= sa.case((b.period == "day", day), (b.period == "week", week),
                                     (b.period == "month", month), else_=b.period_start)


def select_applicable(project_id: str, agent_id: str | None, key_id: str | None) -> sa.Select[Any]:
    return sa.select(budgets).where(applies(project_id, agent_id, key_id)).order_by(b.id)


def reserve_stmt(id_: str, amount: int, now: datetime) -> sa.Update:
    """reserved += amount iff the budget is active and has room: spent + reserved + amount <= limit."""
    return (sa.update(budgets)
            .where(b.id == id_, b.active.is_(True), has_room(amount))
            .values(reserved_micros=b.reserved_micros + amount, updated_at=now).returning(budgets))


def holds(held: Any) -> sa.ColumnElement[bool]:
    """The budget holds at least ``held`` in reservations."""
    return b.reserved_micros >= held


def settle_values(held: Any, cost: Any, now: Any) -> dict[str, Any]:
    """A settlement: the hold given back, ``cost`` (<= held, so spent + reserved stays within the limit) spent."""
    return {"reserved_micros": b.reserved_micros - held, "spent_micros": b.spent_micros + cost, "updated_at": now}


def settle_stmt(id_: str, held: int, cost: int, now: datetime) -> sa.Update:
    """reserved -= held, spent += cost."""
    return (sa.update(budgets).where(b.id == id_, holds(held)).values(**settle_values(held, cost, now))
            .returning(budgets))


def set_alerted_stmt(id_: Any, alerted: Any) -> sa.Update:
    return sa.update(budgets).where(b.id == id_).values(alerted=alerted)


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
        rows = await self.conn.execute(select_applicable(project_id, agent_id, key_id))
        return [self.to_entity(r) for r in rows]

    async def by_ids(self, ids: builtins.list[str]) -> builtins.list[Budget]:
        rows = await self.conn.execute(sa.select(budgets).where(b.id.in_(ids), b.active.is_(True)).order_by(b.id))
        return [self.to_entity(r) for r in rows]

    async def roll(self, id_: str, new_start: datetime, now: datetime) -> Budget | None:
        return await self._one(sa.update(budgets).where(b.id == id_, b.period_start < new_start).values(
            period_start=new_start, spent_micros=0, alerted=[], updated_at=now))

    async def reserve(self, id_: str, amount: int, now: datetime) -> Budget | None:
        row = (await self.conn.execute(reserve_stmt(id_, amount, now))).first()
        return self.to_entity(row) if row else None

    async def release(self, id_: str, amount: int, now: datetime) -> Budget | None:
        return await self._one(
            sa.update(budgets).where(b.id == id_, b.reserved_micros >= amount)
            .values(reserved_micros=b.reserved_micros - amount, updated_at=now))

    async def settle(self, id_: str, held: int, cost: int, now: datetime) -> Budget | None:
        row = (await self.conn.execute(settle_stmt(id_, held, cost, now))).first()
        return self.to_entity(row) if row else None

    async def set_limit(self, id_: str, limit: int, now: datetime) -> Budget | None:
        return await self._one(
            sa.update(budgets).where(b.id == id_, b.spent_micros + b.reserved_micros <= limit)
            .values(limit_micros=limit, updated_at=now))

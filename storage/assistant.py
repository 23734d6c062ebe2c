"""The chat assistant's read-only view of the books (``domain.chat.ChatView``).

Opened by :func:`chat_view` on ``Database.read_only()`` — the same read-only sessions the brain's view
uses (PostgreSQL ``BEGIN … READ ONLY``, SQLite ``PRAGMA query_only``): the assistant's tools cannot
write even by mistake. Each method answers for the project it is given; the assistant checks the
asker's membership (:meth:`SqlChatView.role`) before asking about a project.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import PageRequest
from domain.budgets import Budget
from domain.payments import Deposit, Payment
from domain.spend import SpendRequest
from domain.usage import UsageRow
from domain.wallet import Wallet
from storage.budgets import Budgets
from storage.db import Database
from storage.models import agents, api_keys, budgets, catalog_models, memberships, projects, spend_requests
from storage.payments import PaymentStore
from storage.spend import SpendRequests
from storage.wallet import Wallets

INSIGHTS_TABLE = "insights"  # built by the insights evaluator (agentic/insights.py); absent before it lands
_INSIGHT_COLUMNS = ("id", "kind", "severity", "title", "message", "evidence", "subject", "created_at")


@contextlib.asynccontextmanager
async def chat_view(db: Database) -> AsyncIterator[SqlChatView]:
    async with db.read_only() as conn:
        yield SqlChatView(conn)


class SqlChatView:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._requests = SpendRequests(conn)
        self._payments = PaymentStore(conn)
        self._has_insights: bool | None = None

    async def role(self, project_id: str, user_id: str) -> str | None:
        return (await self.conn.execute(
            sa.select(memberships.c.role).join(projects, projects.c.id == memberships.c.project_id)
            .where(memberships.c.project_id == project_id, memberships.c.user_id == user_id,
                   projects.c.status != "deleted"))).scalar()

    async def project_name(self, project_id: str) -> str | None:
        return (await self.conn.execute(sa.select(projects.c.name).where(projects.c.id == project_id))).scalar()

    async def spend(self, project_id: str, since: datetime, until: datetime, by: str) -> list[UsageRow]:
        """Charged requests settled in [since, until): ``by`` total, model, agent or key."""
        return await self._requests.usage(project_id, since, until, by)

    async def names(self, project_id: str) -> dict[str, dict[str, str]]:
        """id → name of the project's agents, keys and budgets, and the chat models it may name."""
        out: dict[str, dict[str, str]] = {}
        for kind, table in (("agents", agents), ("keys", api_keys)):
            rows = await self.conn.execute(sa.select(table.c.id, table.c.name).where(table.c.project_id == project_id))
            out[kind] = {r.id: r.name for r in rows}
        rows = await self.conn.execute(sa.select(budgets.c.id, budgets.c.name).where(
            budgets.c.project_id == project_id, budgets.c.active.is_(True)))
        out["budgets"] = {r.id: r.name for r in rows}
        used = sa.select(spend_requests.c.model).where(spend_requests.c.project_id == project_id).distinct()
        rows = await self.conn.execute(sa.select(catalog_models.c.id, catalog_models.c.name).where(
            sa.or_(catalog_models.c.active.is_(True), catalog_models.c.id.in_(used))))
        out["models"] = {r.id: r.name for r in rows}
        return out

    async def budgets(self, project_id: str) -> list[Budget]:
        return (await Budgets(self.conn).list(project_id, PageRequest(limit=200))).items

    async def wallet(self, project_id: str) -> Wallet | None:
        return await Wallets(self.conn).get(project_id)

    async def request(self, project_id: str, request_id: str) -> SpendRequest | None:
        found = await self._requests.get(request_id)
        return found if found is not None and found.project_id == project_id else None

    async def requests(self, project_id: str, statuses: tuple[str, ...], limit: int) -> list[SpendRequest]:
        """The project's latest requests in ``statuses``, newest first."""
        s = spend_requests.c
        rows = await self.conn.execute(sa.select(spend_requests).where(
            s.project_id == project_id, s.status.in_(statuses)).order_by(s.created_at.desc(), s.id.desc()).limit(limit))
        return [self._requests.to_entity(r) for r in rows]

    async def payments(self, project_id: str, limit: int) -> list[Payment]:
        return (await self._payments.payments(project_id, PageRequest(limit=limit))).items

    async def deposits(self, project_id: str, limit: int) -> list[Deposit]:
        return (await self._payments.deposits(project_id, PageRequest(limit=limit))).items

    async def insights(self, project_id: str, limit: int) -> list[dict[str, Any]] | None:
        """The project's open insights, newest first; None when this database has no insights table."""
        if self._has_insights is None:
            self._has_insights = await self.conn.run_sync(lambda c: sa.inspect(c).has_table(INSIGHTS_TABLE))
        if not self._has_insights:
            return None
        table = sa.table(INSIGHTS_TABLE, *(sa.column(n) for n in (*_INSIGHT_COLUMNS, "project_id", "status")))
        rows = await self.conn.execute(
            sa.select(*(table.c[n] for n in _INSIGHT_COLUMNS))
            .where(table.c.project_id == project_id, table.c.status == "open")
            .order_by(table.c.created_at.desc()).limit(limit))
        return [{n: _json(r._mapping[n]) if n in ("evidence", "subject") else r._mapping[n] for n in _INSIGHT_COLUMNS}
                for r in rows]


def _json(value: Any) -> Any:
    """A JSON column read through a bare ``sa.table`` comes back as text on SQLite."""
    if isinstance(value, str | bytes):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            return value
    return value

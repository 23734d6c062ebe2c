"""Versioned policies: one row per (project, version); the newest version is the policy in force.

Adding a version is ``INSERT … SELECT max(version) + 1``; two concurrent PUTs on one project collide
on the primary key rather than overwrite each other (the loser gets a 409 ``conflict``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import Page, PageRequest
from domain.errors import Conflict, InvalidRequest
from storage.models import policies

Row = tuple[dict[str, Any], int, datetime, str]


class Policies:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def current(self, project_id: str) -> Row | None:
        row = (await self.conn.execute(
            sa.select(policies).where(policies.c.project_id == project_id)
            .order_by(policies.c.version.desc()).limit(1))).first()
        return (row.rules, row.version, row.created_at, row.created_by) if row else None

    async def add(self, project_id: str, rules: dict[str, Any], created_by: str, now: datetime) -> int:
        latest = (await self.conn.execute(
            sa.select(sa.func.coalesce(sa.func.max(policies.c.version), 0))
            .where(policies.c.project_id == project_id))).scalar_one()
        version = int(latest) + 1
        try:
            async with self.conn.begin_nested():
                await self.conn.execute(sa.insert(policies).values(
                    project_id=project_id, version=version, rules=rules, created_by=created_by, created_at=now))
        except IntegrityError:
            raise Conflict("the policy was changed concurrently; read it again and retry",
                           {"project_id": project_id}) from None
        return version

    async def history(self, project_id: str, page: PageRequest) -> Page[Row]:
        stmt = sa.select(policies).where(policies.c.project_id == project_id)
        if page.cursor:
            try:
                before = int(page.cursor)
            except ValueError:
                raise InvalidRequest("cursor is not one this API returned", {"cursor": page.cursor}) from None
            stmt = stmt.where(policies.c.version < before)
        rows = (await self.conn.execute(stmt.order_by(policies.c.version.desc()).limit(page.limit + 1))).all()
        more = len(rows) > page.limit
        rows = rows[:page.limit]
        items = [(r.rules, r.version, r.created_at, r.created_by) for r in rows]
        return Page(items=items, next_cursor=str(rows[-1].version) if more and rows else None)


"""The model catalog table: lookups, admin edits, and the idempotent start-up seed."""

from __future__ import annotations

import builtins
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import utcnow
from domain.catalog import PLATFORM_PROJECT, SEED, CatalogModel, ModelFilter, split_id
from domain.events import GENESIS_HASH
from storage.base import Repository
from storage.db import Database
from storage.models import catalog_models, event_heads
from storage.wallet import insert_ignore


class CatalogModels(Repository[CatalogModel]):
    table = catalog_models
    entity = CatalogModel

    async def list(self, f: ModelFilter) -> list[CatalogModel]:
        c = catalog_models.c
        stmt = sa.select(catalog_models)
        if not f.include_inactive:
            stmt = stmt.where(c.active.is_(True))
        if f.provider:
            stmt = stmt.where(c.provider == f.provider)
        if f.kind:
            stmt = stmt.where(c.kind == f.kind)
        if f.search:
            escaped = f.search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            stmt = stmt.where(sa.func.lower(c.id).like(f"%{escaped}%", escape="\\"))
        rows = (await self.conn.execute(stmt.order_by(c.provider, c.id))).all()
        return [self.to_entity(r) for r in rows]

    async def candidates(self, model_id: str) -> builtins.list[CatalogModel]:
        """The exact id if it exists, else every entry whose name is ``model_id``, else every entry with
        ``model_id`` (or its part after ``provider/``) among its aliases."""
        c = catalog_models.c
        rows = (await self.conn.execute(sa.select(catalog_models).where(c.id == model_id))).all()
        if not rows:
            _, name = split_id(model_id)
            rows = (await self.conn.execute(
                sa.select(catalog_models).where(sa.or_(c.name == model_id, c.name == name)).order_by(c.id)
            )).all()
            # A "provider/name" id whose provider differs is not a match for a bare name.
            provider, _ = split_id(model_id)
            rows = [r for r in rows if r.name == model_id or (provider is None)]
        if not rows:
            # Aliases are a JSON list: narrow with a text match on the quoted name, then match exactly.
            _, name = split_id(model_id)
            needle = msgspec.json.encode(name).decode()
            escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            found = (await self.conn.execute(sa.select(catalog_models).where(
                sa.cast(c.aliases, sa.Text).like(f"%{escaped}%", escape="\\")).order_by(c.id))).all()
            rows = [r for r in found if model_id in (r.aliases or []) or name in (r.aliases or [])]
        return [self.to_entity(r) for r in rows]

    async def update(self, id_: str, **values: Any) -> CatalogModel | None:
        return await super().update(id_, **values)

    async def ensure_platform_log(self) -> None:
        await ensure_head(self.conn, PLATFORM_PROJECT)


async def ensure_head(conn: AsyncConnection, project_id: str) -> None:
    """Create an event-log head row if missing (safe under concurrent start-ups)."""
    exists = (await conn.execute(
        sa.select(event_heads.c.project_id).where(event_heads.c.project_id == project_id))).first()
    if exists:
        return
    await conn.execute(insert_ignore(conn, event_heads, ["project_id"]).values(
        project_id=project_id, seq=0, hash=GENESIS_HASH))


async def seed_catalog(db: Database, models: tuple[CatalogModel, ...] = SEED) -> int:
    """Insert catalog entries whose ids are missing; existing rows (admin edits) are left alone.
    Also creates the platform event log's head row. Returns how many entries were inserted."""
    async with db.write() as conn:
        await ensure_head(conn, PLATFORM_PROJECT)
        have = set((await conn.execute(sa.select(catalog_models.c.id))).scalars())
        now = utcnow()
        rows = [{**msgspec.structs.asdict(m), "updated_at": now} for m in models if m.id not in have]
        if not rows:
            return 0
        await conn.execute(insert_ignore(conn, catalog_models, ["id"]), rows)
        return len(rows)

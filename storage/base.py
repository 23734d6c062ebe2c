"""The generic repository: get / insert / update / paginate, written once for every table."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import Page, PageRequest
from domain.errors import InvalidRequest

S = TypeVar("S", bound=msgspec.Struct)


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("cursor is not one this API returned", {"cursor": cursor}) from None
    if "\x00" in value:  # never one of ours, and PostgreSQL cannot compare it
        raise InvalidRequest("cursor is not one this API returned", {"cursor": cursor})
    return value


class Repository(Generic[S]):
    """Maps one table to one domain Struct. Subclasses set ``table`` and ``entity``."""

    table: ClassVar[sa.Table]
    entity: ClassVar[type[Any]]  # a msgspec Struct class
    _field_cache: ClassVar[tuple[str, ...]]  # set per subclass on first use
    _insert_stmt: ClassVar[sa.Insert]

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        fields = cls.__dict__.get("_field_cache")
        if fields is None:
            fields = tuple(f for f in cls.entity.__struct_fields__ if f in cls.table.c)
            cls._field_cache = fields
        return fields

    def to_entity(self, row: sa.Row[Any]) -> S:
        mapping = row._mapping
        return self.entity(**{f: mapping[f] for f in self._fields()})

    async def get(self, id_: str, *, for_update: bool = False) -> S | None:
        stmt = sa.select(self.table).where(self.table.c.id == id_)
        if for_update and self.conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        row = (await self.conn.execute(stmt)).first()
        return self.to_entity(row) if row else None

    async def insert(self, entity: S) -> S:
        values = {f: getattr(entity, f) for f in self._fields()}
        # The bare INSERT construct is built once per table; values go as parameters (no per-call
        # statement building, and the compiled form comes from SQLAlchemy's cache).
        stmt = self.__class__.__dict__.get("_insert_stmt")
        if stmt is None:
            stmt = self.__class__._insert_stmt = sa.insert(self.table)
        await self.conn.execute(stmt, values)
        return entity

    async def update(self, id_: str, **values: Any) -> S | None:
        stmt = sa.update(self.table).where(self.table.c.id == id_).values(**values).returning(self.table)
        row = (await self.conn.execute(stmt)).first()
        return self.to_entity(row) if row else None

    async def paginate(self, page: PageRequest, *where: sa.ColumnElement[bool],
                       key: sa.Column[Any] | None = None) -> Page[S]:
        """Newest first, keyset-paginated on a unique, time-sortable key (ids are)."""
        key = self.table.c.id if key is None else key
        stmt = sa.select(self.table).where(*where)
        if page.cursor:
            stmt = stmt.where(key < decode_cursor(page.cursor))
        rows = (await self.conn.execute(stmt.order_by(key.desc()).limit(page.limit + 1))).all()
        return self.page_of(rows, page.limit, key.name)

    def page_of(self, rows: Sequence[sa.Row[Any]], limit: int, key_name: str = "id") -> Page[S]:
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = encode_cursor(str(rows[-1]._mapping[key_name])) if more and rows else None
        return Page(items=[self.to_entity(r) for r in rows], next_cursor=cursor)

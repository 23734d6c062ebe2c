"""The event log: gap-free per-project seq, SHA-256 hash chain, appended in the writer's transaction.

Appending takes the project's head row with ``UPDATE … SET seq = seq + n RETURNING`` — on PostgreSQL
that row lock serialises writers of one project until commit, so seqs are gap-free and commit in
order; on SQLite the single writer (BEGIN IMMEDIATE) does the same. The chain hashes are computed
from the returned head, then one more statement stores the new head hash and inserts the rows (on
PostgreSQL a single ``WITH … UPDATE event_heads … INSERT INTO events SELECT … FROM unnest(…)``, the
rows as arrays, so the statement is compiled once): two round trips.
Events are appended at the very end of a unit of work to keep that lock short.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import groupby

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.audit import AuditFilter
from domain.base import Page, PageRequest, new_id, utcnow
from domain.errors import InvalidRequest, NotFound
from domain.events import GENESIS_HASH, Event, PendingEvent, chain_hash
from domain.inputs import without_nul
from storage.base import decode_cursor, encode_cursor
from storage.models import event_heads, events

_COLUMNS = (events.c.id, events.c.project_id, events.c.seq, events.c.type, events.c.ts, events.c.actor,
            events.c.data, events.c.prev_hash, events.c.hash)


def _event(row: sa.Row) -> Event:
    return Event(*row)


def rfc3339(ts: datetime) -> str:
    """The stored form; a naive time is taken as UTC, an aware one is converted to UTC first."""
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Any projects' events in one statement (a unit of work's append on PostgreSQL, storage/hot.py's batches):
# each head's new hash, every row, passed as arrays so the statement is prepared once. Arguments from
# append_arguments(); asyncpg parameters ($n), so SQLAlchemy sends it with exec_driver_sql.
PG_APPEND_MANY = (
    "WITH set_head_hash AS (UPDATE event_heads SET hash = h.hash "
    "FROM unnest($1::varchar[], $2::varchar[]) AS h(project_id, hash) WHERE event_heads.project_id = h.project_id) "
    "INSERT INTO events (id, project_id, seq, type, actor, data, ts, prev_hash, hash) "
    "SELECT t.id, t.project_id, t.seq, t.type, t.actor, t.data::jsonb, t.ts, t.prev_hash, t.hash "
    "FROM unnest($3::varchar[], $4::varchar[], $5::bigint[], $6::varchar[], $7::varchar[], $8::text[], "
    "$9::varchar[], $10::varchar[], $11::varchar[]) AS t(id, project_id, seq, type, actor, data, ts, prev_hash, hash)")


def link(batch: Sequence[PendingEvent], project_id: str, actor: str, seq: int, prev: str) -> list[Event]:
    """Chain ``batch`` (one project's) after its head ``(seq, prev)`` as it was before the batch took it:
    ids, consecutive seqs, one timestamp, hashes. Called with the head row locked, so ts never goes
    backwards as seq goes forwards."""
    ts = rfc3339(utcnow())
    out = []
    for item in batch:
        seq += 1
        data = item.data
        if b"\\u0000" in msgspec.json.encode(data):  # e.g. a provider's error text: stored (and hashed) storable
            data = without_nul(data)
        digest = chain_hash(prev, project_id, seq, item.type, ts, actor, data)
        out.append(Event(id=new_id("evt"), project_id=project_id, seq=seq, type=item.type, ts=ts, actor=actor,
                         data=data, prev_hash=prev, hash=digest))
        prev = digest
    return out


def _json(data: dict) -> str:
    return msgspec.json.encode(data).decode()


def append_arguments(chained: Sequence[Event]) -> tuple:
    """PG_APPEND_MANY's arguments: chained events of any projects, each project's in seq order."""
    heads = {e.project_id: e.hash for e in chained}  # the last event's hash of each project
    return (list(heads), list(heads.values()), [e.id for e in chained], [e.project_id for e in chained],
            [e.seq for e in chained], [e.type for e in chained], [e.actor for e in chained],
            [_json(e.data) for e in chained], [e.ts for e in chained], [e.prev_hash for e in chained],
            [e.hash for e in chained])


class EventLog:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def create_head(self, project_id: str) -> None:
        await self.conn.execute(sa.insert(event_heads).values(project_id=project_id, seq=0, hash=GENESIS_HASH))

    async def append(self, pending: Sequence[PendingEvent], actor: str) -> list[Event]:
        out: list[Event] = []
        # Sorted by project so two units of work touching the same projects lock them in one order.
        ordered = sorted(enumerate(pending), key=lambda p: (p[1].project_id, p[0]))
        for project_id, group in groupby(ordered, key=lambda p: p[1].project_id):
            batch = [p for _, p in group]
            row = (await self.conn.execute(
                sa.update(event_heads)
                .where(event_heads.c.project_id == project_id)
                .values(seq=event_heads.c.seq + len(batch))
                .returning(event_heads.c.seq, event_heads.c.hash)
            )).first()
            if row is None:
                raise NotFound("project has no event log", {"project_id": project_id})
            chained = link(batch, project_id, actor, row.seq - len(batch), row.hash)
            out.extend(chained)
            if self.conn.dialect.name == "postgresql":
                # One round trip, one fixed (compiled-once) statement: the head's new hash (a data-modifying
                # CTE runs exactly once) and every row, passed as arrays.
                await self.conn.exec_driver_sql(PG_APPEND_MANY, append_arguments(chained))
            else:
                await self.conn.execute(sa.update(event_heads).where(event_heads.c.project_id == project_id)
                                        .values(hash=chained[-1].hash))
                await self.conn.execute(sa.insert(events), [{c.name: getattr(e, c.name) for c in _COLUMNS}
                                                            for e in chained])
        out.sort(key=lambda e: (e.project_id, e.seq))
        return out

    async def since(self, project_id: str, seq: int, limit: int) -> list[Event]:
        rows = await self.conn.execute(
            sa.select(*_COLUMNS).where(events.c.project_id == project_id, events.c.seq > seq)
            .order_by(events.c.seq).limit(limit))
        return [_event(r) for r in rows]

    async def head(self, project_id: str) -> tuple[int, str] | None:
        row = (await self.conn.execute(sa.select(event_heads.c.seq, event_heads.c.hash).where(
            event_heads.c.project_id == project_id))).first()
        return (row.seq, row.hash) if row else None

    async def list(self, project_id: str, filters: AuditFilter, page: PageRequest) -> Page[Event]:
        """Newest first; the cursor is the last seq seen."""
        stmt = sa.select(*_COLUMNS).where(events.c.project_id == project_id)
        if filters.type:
            if filters.type.endswith("*"):
                stmt = stmt.where(events.c.type.startswith(filters.type[:-1], autoescape=True))
            else:
                stmt = stmt.where(events.c.type == filters.type)
        if filters.actor:
            stmt = stmt.where(events.c.actor == filters.actor)
        if filters.since:
            stmt = stmt.where(events.c.ts >= rfc3339(filters.since))
        if filters.until:
            stmt = stmt.where(events.c.ts < rfc3339(filters.until))
        if page.cursor:
            try:
                stmt = stmt.where(events.c.seq < int(decode_cursor(page.cursor)))
            except ValueError:
                raise InvalidRequest("cursor is not one this API returned") from None
        rows = (await self.conn.execute(stmt.order_by(events.c.seq.desc()).limit(page.limit + 1))).all()
        items = [_event(r) for r in rows[: page.limit]]
        cursor = encode_cursor(str(items[-1].seq)) if len(rows) > page.limit else None
        return Page(items=items, next_cursor=cursor)

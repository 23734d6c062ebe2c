"""Wallet rows and ledger entries. Every change is one conditional UPDATE … RETURNING (no read-then-write)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import Page, PageRequest
from domain.wallet import LedgerEntry, PlatformEntry, PlatformTotals, Wallet
from storage.base import Repository
from storage.models import ledger_entries, platform_ledger, wallets

w = wallets.c

# The two hot conditional UPDATEs of the spend path, built once (only parameters are bound per call); shared
# with storage/sqlite_hot.py. Parameters: hold_params() / capture_params().
def has_room(amount: Any) -> sa.ColumnElement[bool]:
    """Wallet room: ``amount`` is available (balance - reserved)."""
    return w.balance_micros - w.reserved_micros >= amount


HOLD = (sa.update(wallets)
         .where(w.project_id == sa.bindparam("p_project"),
                has_room(sa.bindparam("p_amount", type_=sa.BigInteger)))
         .values(reserved_micros=w.reserved_micros + sa.bindparam("p_amount", type_=sa.BigInteger),
                 updated_at=sa.bindparam("p_now"))
         .returning(wallets))
def holds(held: Any) -> sa.ColumnElement[bool]:
    """The wallet holds at least ``held`` in reservations (a capture or release of it is possible)."""
    return w.reserved_micros >= held


def capture_values(held: Any, charge: Any, now: Any) -> dict[str, Any]:
    """A capture: the hold given back, ``charge`` (<= held) taken from the balance."""
    return {"reserved_micros": w.reserved_micros - held, "balance_micros": w.balance_micros - charge,
            "updated_at": now}


CAPTURE = (sa.update(wallets)
           .where(w.project_id == sa.bindparam("p_project"), holds(sa.bindparam("p_held", type_=sa.BigInteger)))
           .values(**capture_values(sa.bindparam("p_held", type_=sa.BigInteger),
                                    sa.bindparam("p_charge", type_=sa.BigInteger), sa.bindparam("p_now")))
           .returning(wallets))


def hold_params(project_id: str, amount: int, now: datetime) -> dict[str, Any]:
    return {"p_project": project_id, "p_amount": amount, "p_now": now}


def capture_params(project_id: str, held: int, charge: int, now: datetime) -> dict[str, Any]:
    assert 0 <= charge <= held
    return {"p_project": project_id, "p_held": held, "p_charge": charge, "p_now": now}


def insert_ignore(conn: AsyncConnection, table: sa.Table, index: list[str]) -> Any:
    """INSERT … ON CONFLICT DO NOTHING on either dialect."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=index)


def to_wallet(row: sa.Row[Any]) -> Wallet:
    m = row._mapping
    return Wallet(project_id=m["project_id"], balance_micros=m["balance_micros"],
                  reserved_micros=m["reserved_micros"],
                  available_micros=m["balance_micros"] - m["reserved_micros"],
                  deposit_address=m["deposit_address"], updated_at=m["updated_at"])


class Ledger(Repository[LedgerEntry]):
    table = ledger_entries
    entity = LedgerEntry


class Wallets:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.ledger = Ledger(conn)

    async def _one(self, stmt: Any) -> Wallet | None:
        row = (await self.conn.execute(stmt.returning(wallets))).first()
        return to_wallet(row) if row else None

    async def ensure(self, project_id: str, now: datetime) -> None:
        await self.conn.execute(insert_ignore(self.conn, wallets, ["project_id"]).values(
            project_id=project_id, balance_micros=0, reserved_micros=0, updated_at=now))

    async def get(self, project_id: str, *, for_update: bool = False) -> Wallet | None:
        stmt = sa.select(wallets).where(w.project_id == project_id)
        if for_update and self.conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        row = (await self.conn.execute(stmt)).first()
        return to_wallet(row) if row else None

    async def add_balance(self, project_id: str, delta: int, now: datetime) -> Wallet | None:
        """balance += delta; a negative delta only if it leaves available >= 0."""
        stmt = sa.update(wallets).where(w.project_id == project_id)
        if delta < 0:
            stmt = stmt.where(w.balance_micros - w.reserved_micros + delta >= 0)
        return await self._one(stmt.values(balance_micros=w.balance_micros + delta, updated_at=now))

    async def hold(self, project_id: str, amount: int, now: datetime) -> Wallet | None:
        row = (await self.conn.execute(HOLD, hold_params(project_id, amount, now))).first()
        return to_wallet(row) if row else None

    async def release(self, project_id: str, amount: int, now: datetime) -> Wallet | None:
        return await self._one(
            sa.update(wallets)
            .where(w.project_id == project_id, w.reserved_micros >= amount)
            .values(reserved_micros=w.reserved_micros - amount, updated_at=now))

    async def capture(self, project_id: str, held: int, charge: int, now: datetime) -> Wallet | None:
        """reserved -= held, balance -= charge (charge <= held, so available never goes negative)."""
        row = (await self.conn.execute(CAPTURE, capture_params(project_id, held, charge, now))).first()
        return to_wallet(row) if row else None

    async def set_deposit_address(self, project_id: str, address: str, now: datetime) -> Wallet | None:
        return await self._one(sa.update(wallets).where(w.project_id == project_id)
                               .values(deposit_address=address, updated_at=now))

    async def deposit_addresses(self) -> list[tuple[str, str | None]]:
        """(project id, stored deposit address) of every wallet (the chain runtime's start-up check)."""
        rows = await self.conn.execute(sa.select(w.project_id, w.deposit_address))
        return [(row.project_id, row.deposit_address) for row in rows]

    async def append(self, entry: LedgerEntry) -> None:
        await self.ledger.insert(entry)

    async def book_platform(self, entry: PlatformEntry) -> None:
        await self.conn.execute(sa.insert(platform_ledger), [msgspec.structs.asdict(entry)])

    async def platform_totals(self) -> PlatformTotals:
        p = platform_ledger.c
        rows = (await self.conn.execute(sa.select(p.kind, sa.func.sum(p.amount_micros), sa.func.count())
                                        .group_by(p.kind))).all()
        by_kind = {r[0]: int(r[1]) for r in rows}
        return PlatformTotals(balance_micros=sum(by_kind.values()), entries=sum(int(r[2]) for r in rows),
                              by_kind=by_kind)

    async def entries(self, project_id: str, page: PageRequest) -> Page[LedgerEntry]:
        return await self.ledger.paginate(page, ledger_entries.c.project_id == project_id)

    async def ledger_totals(self, project_id: str, since: datetime, until: datetime) -> dict[str, int]:
        c = ledger_entries.c
        rows = await self.conn.execute(
            sa.select(c.kind, sa.func.sum(c.amount_micros)).where(
                c.project_id == project_id, c.created_at >= since, c.created_at < until).group_by(c.kind))
        return {r[0]: int(r[1]) for r in rows}

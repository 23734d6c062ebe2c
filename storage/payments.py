"""Payments, deposits, deposit senders, the per-sender nonce allocator and settlement batches.

Every status change is a conditional ``UPDATE … WHERE status IN (…) RETURNING``, so two workers (or two
processes) racing on one payment change it once. The nonce allocator is one row per (chain, sender):
``UPDATE … SET next_nonce = next_nonce + 1 … RETURNING`` — the row lock (PostgreSQL) or the single
writer (SQLite) serialises it, and a rolled-back payout rolls its nonce back with it: no gaps, no reuse.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import Page, PageRequest
from domain.errors import Conflict
from domain.payments import Deposit, DepositSender, Payment, SettlementBatch, UnbatchedCost
from storage.base import Repository
from storage.models import (
    chain_nonces,
    deposit_senders,
    deposits,
    payments,
    projects,
    settlement_batches,
    spend_requests,
)

p = payments.c
d = deposits.c
n = chain_nonces.c
sr = spend_requests.c


class _Payments(Repository[Payment]):
    table = payments
    entity = Payment


class _Deposits(Repository[Deposit]):
    table = deposits
    entity = Deposit


class _Batches(Repository[SettlementBatch]):
    table = settlement_batches
    entity = SettlementBatch


class PaymentStore:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._payments = _Payments(conn)
        self._deposits = _Deposits(conn)
        self._batches = _Batches(conn)

    async def _insert(self, stmt: Any, conflict: str, details: dict[str, Any]) -> None:
        try:
            async with self.conn.begin_nested():
                await self.conn.execute(stmt)
        except IntegrityError:
            raise Conflict(conflict, details) from None

    # ------------------------------------------------------------ payments
    async def insert_payment(self, payment: Payment, raw_tx: bytes, idempotency_key: str | None,
                             request_hash: str | None) -> None:
        values = {f: getattr(payment, f) for f in self._payments._fields()}
        values.update(raw_tx=raw_tx, idempotency_key=idempotency_key, request_hash=request_hash, attempts=0)
        await self._insert(sa.insert(payments).values(**values), "this payment collides with another one",
                           {"idempotency_key": idempotency_key, "nonce": payment.nonce})

    async def get_payment(self, payment_id: str) -> Payment | None:
        return await self._payments.get(payment_id)

    async def by_idempotency(self, project_id: str, key: str) -> tuple[Payment, str | None] | None:
        row = (await self.conn.execute(
            sa.select(payments).where(p.project_id == project_id, p.idempotency_key == key))).first()
        return (self._payments.to_entity(row), row.request_hash) if row else None

    async def payments(self, project_id: str, page: PageRequest) -> Page[Payment]:
        return await self._payments.paginate(page, p.project_id == project_id)

    async def unfinished(self, chain_id: int, sender: str, limit: int) -> list[tuple[Payment, bytes]]:
        rows = (await self.conn.execute(
            sa.select(payments)
            .where(p.chain_id == chain_id, p.from_address == sender, p.status.in_(("pending", "submitted")))
            .order_by(p.nonce).limit(limit))).all()
        return [(self._payments.to_entity(r), bytes(r.raw_tx)) for r in rows]

    async def unfinished_on_chain(self, chain_id: int, limit: int) -> list[Payment]:
        rows = (await self.conn.execute(
            sa.select(payments).where(p.chain_id == chain_id, p.status.in_(("pending", "submitted")))
            .order_by(p.created_at).limit(limit))).all()
        return [self._payments.to_entity(r) for r in rows]

    async def forget_nonces(self, chain_id: int) -> None:
        await self.conn.execute(sa.delete(chain_nonces).where(n.chain_id == chain_id))

    async def move_payment(self, payment_id: str, from_status: tuple[str, ...], **values: Any) -> Payment | None:
        row = (await self.conn.execute(
            sa.update(payments).where(p.id == payment_id, p.status.in_(from_status))
            .values(**values).returning(payments))).first()
        return self._payments.to_entity(row) if row else None

    async def record_attempt(self, payment_id: str, error: str, now: datetime) -> None:
        await self.conn.execute(sa.update(payments).where(p.id == payment_id)
                                .values(attempts=p.attempts + 1, error=error, updated_at=now))

    # ------------------------------------------------------------ the nonce allocator
    async def allocate_nonce(self, chain_id: int, address: str, seed: int | None, now: datetime) -> int | None:
        """The next nonce for ``address``, or None when the row does not exist and no ``seed`` is given."""
        if seed is not None:
            try:
                async with self.conn.begin_nested():
                    await self.conn.execute(sa.insert(chain_nonces).values(
                        chain_id=chain_id, address=address, next_nonce=seed, updated_at=now))
            except IntegrityError:
                pass  # seeded concurrently: the UPDATE below takes the row in turn
        row = (await self.conn.execute(
            sa.update(chain_nonces).where(n.chain_id == chain_id, n.address == address)
            .values(next_nonce=n.next_nonce + 1, updated_at=now)
            .returning(n.next_nonce))).first()
        return None if row is None else int(row.next_nonce) - 1

    async def raise_nonce(self, chain_id: int, address: str, at_least: int, now: datetime) -> None:
        await self.conn.execute(
            sa.update(chain_nonces).where(n.chain_id == chain_id, n.address == address, n.next_nonce < at_least)
            .values(next_nonce=at_least, updated_at=now))

    # ------------------------------------------------------------ deposits
    async def insert_deposit(self, deposit: Deposit) -> None:
        values = {f: getattr(deposit, f) for f in self._deposits._fields()}
        await self._insert(sa.insert(deposits).values(**values),
                           "this transfer has already been claimed as a deposit",
                           {"tx_hash": deposit.tx_hash, "log_index": deposit.log_index})

    async def deposits_for_tx(self, chain_id: int, tx_hash: str) -> list[Deposit]:
        rows = (await self.conn.execute(
            sa.select(deposits).where(d.chain_id == chain_id, d.tx_hash == tx_hash, d.status != "failed"))).all()
        return [self._deposits.to_entity(r) for r in rows]

    async def get_deposit(self, deposit_id: str) -> Deposit | None:
        return await self._deposits.get(deposit_id)

    async def deposits(self, project_id: str, page: PageRequest) -> Page[Deposit]:
        return await self._deposits.paginate(page, d.project_id == project_id)

    async def pending_deposits(self, chain_id: int, limit: int) -> list[Deposit]:
        rows = (await self.conn.execute(
            sa.select(deposits).where(d.chain_id == chain_id, d.status == "pending")
            .order_by(d.created_at).limit(limit))).all()
        return [self._deposits.to_entity(r) for r in rows]

    async def move_deposit(self, deposit_id: str, from_status: tuple[str, ...], **values: Any) -> Deposit | None:
        row = (await self.conn.execute(
            sa.update(deposits).where(d.id == deposit_id, d.status.in_(from_status))
            .values(**values).returning(deposits))).first()
        return self._deposits.to_entity(row) if row else None

    # ------------------------------------------------------------ deposit senders
    async def add_sender(self, sender: DepositSender) -> None:
        await self._insert(sa.insert(deposit_senders).values(
            chain_id=sender.chain_id, address=sender.address, project_id=sender.project_id,
            created_at=sender.created_at), "this sender address is already registered",
            {"address": sender.address})

    async def senders(self, chain_id: int, project_id: str) -> list[str]:
        rows = (await self.conn.execute(
            sa.select(deposit_senders.c.address).where(deposit_senders.c.chain_id == chain_id,
                                                       deposit_senders.c.project_id == project_id)
            .order_by(deposit_senders.c.created_at))).all()
        return [r.address for r in rows]

    # ------------------------------------------------------------ settlement batches
    async def unbatched_costs(self, limit: int) -> list[UnbatchedCost]:
        rows = (await self.conn.execute(
            sa.select(sr.id, sr.project_id, sr.cost_micros, sr.settled_at)
            .join(projects, projects.c.id == sr.project_id)
            .where(projects.c.settlement == "onchain", sr.status == "settled", sr.cost_micros > 0,
                   sr.settlement_batch_id.is_(None), sr.settled_at.is_not(None))
            .order_by(sr.settled_at, sr.id).limit(limit))).all()
        return [UnbatchedCost(r.id, r.project_id, int(r.cost_micros), r.settled_at) for r in rows]

    async def assign_batch(self, request_ids: list[str], batch_id: str, tx_hash: str) -> int:
        result = await self.conn.execute(
            sa.update(spend_requests).where(sr.id.in_(request_ids), sr.settlement_batch_id.is_(None))
            .values(settlement_batch_id=batch_id, tx_hash=tx_hash))
        return int(result.rowcount or 0)

    async def unassign_batch(self, batch_id: str) -> int:
        result = await self.conn.execute(
            sa.update(spend_requests).where(sr.settlement_batch_id == batch_id)
            .values(settlement_batch_id=None, tx_hash=None))
        return int(result.rowcount or 0)

    async def insert_batch(self, batch: SettlementBatch) -> None:
        await self._batches.insert(batch)

    async def batch_for_payment(self, payment_id: str) -> SettlementBatch | None:
        row = (await self.conn.execute(
            sa.select(settlement_batches).where(settlement_batches.c.payment_id == payment_id))).first()
        return self._batches.to_entity(row) if row else None

    async def move_batch(self, batch_id: str, status: str, now: datetime) -> None:
        await self.conn.execute(sa.update(settlement_batches).where(settlement_batches.c.id == batch_id)
                                .values(status=status, updated_at=now))

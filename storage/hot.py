"""The spend hot path on PostgreSQL: a request's two money transactions as fixed statements on a raw
asyncpg connection (``domain.spend.HotPath``), group-committed.

A reservation is one statement that holds the wallet, reserves every applicable budget, advances the
project's event head and inserts the request. Closing an executing request (settle or fail) is one
statement too: the status transition, the wallet capture and release, the ledger entry, the budgets
and the head. Operations that arrive together share a transaction: ``BEGIN``, one such statement per
operation, one statement appending every operation's events (``storage.events.PG_APPEND_MANY``),
``COMMIT`` — four round trips for a lone request, two plus one statement each for a batch. The
statements are fixed texts, prepared once per connection by asyncpg; the generic path (SQLAlchemy,
``domain.spend.Spending``) issues ~12 statements for the same work and spent most of a gateway
request's CPU doing it (bench/README.md).

Only the common case is handled here; anything else changes nothing and returns False so the
service runs its generic path, which knows every case and builds the exact error: a wallet or budget
without room (the rejection), a budget whose period has ended (it must roll first), a budget
deactivated meanwhile, a request no longer in the expected status, any database error.

The conditional UPDATEs are the same as the generic path's (``WHERE balance - reserved >= n``,
``WHERE spent + reserved + n <= limit``): on PostgreSQL each re-checks its condition against the
latest committed row under the row lock, so no concurrency can push a wallet or budget over its
limit — the CHECK constraints would refuse it anyway. Lock order is the generic path's: request row,
wallet, budgets, event head (each CTE depends on the one before, so PostgreSQL runs them in order).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import NamedTuple

import asyncpg

from domain.base import new_id
from domain.budgets import Budget, budget_updated, crossed_thresholds, period_start, threshold_reached
from domain.events import Event, PendingEvent
from domain.spend import CloseValues, Prepared, SpendRequest
from domain.wallet import LedgerEntry, Wallet, wallet_updated
from storage.db import Database
from storage.events import PG_APPEND_MANY, append_arguments, link

log = logging.getLogger("smartspace.hot")

_BUDGET_COLUMNS = ("id", "project_id", "agent_id", "name", "period", "limit_micros", "spent_micros",
                   "reserved_micros", "period_start", "alert_thresholds", "alerted", "active", "created_at",
                   "updated_at")
_B = ", ".join(f"b.{c} AS b_{c}" for c in _BUDGET_COLUMNS)
_RETURNING_BUDGET = ", ".join(f"budgets.{c}" for c in _BUDGET_COLUMNS)

_REQUEST_COLUMNS = ("id", "project_id", "agent_id", "key_id", "actor", "source", "operation", "model", "provider",
                    "status", "decision", "params", "metadata", "estimated_cost_micros", "reserved_micros",
                    "cost_micros", "input_tokens", "output_tokens", "risk_score", "error", "idempotency_key",
                    "response", "reservation_expires_at", "approval_expires_at", "resolved_by", "tx_hash",
                    "settlement_batch_id", "created_at", "settled_at")
_REQUEST_TYPES = {"decision": "jsonb", "params": "jsonb", "metadata": "jsonb", "error": "jsonb", "response": "jsonb",
                  "estimated_cost_micros": "bigint", "reserved_micros": "bigint", "cost_micros": "bigint",
                  "input_tokens": "integer", "output_tokens": "integer", "risk_score": "double precision",
                  "reservation_expires_at": "timestamptz", "approval_expires_at": "timestamptz",
                  "created_at": "timestamptz", "settled_at": "timestamptz"}
_FIRST_REQUEST_ARG = 9
_REQUEST_VALUES = ", ".join(f"${i}::{_REQUEST_TYPES.get(c, 'varchar')}"
                            for i, c in enumerate(_REQUEST_COLUMNS, start=_FIRST_REQUEST_ARG))

# $1 project, $2 amount, $3 now, $4 agent, $5/$6/$7 current day/week/month start, $8 events besides the
# budgets', $9… the request row. Budgets whose period has ended fail the period_start test (they must roll).
_RESERVE = f"""
WITH w AS (
    UPDATE wallets SET reserved_micros = reserved_micros + $2::bigint, updated_at = $3::timestamptz
    WHERE project_id = $1::varchar AND balance_micros - reserved_micros >= $2::bigint
    RETURNING project_id, balance_micros, reserved_micros, deposit_address, updated_at),
b AS (
    UPDATE budgets SET reserved_micros = reserved_micros + $2::bigint, updated_at = $3::timestamptz
    WHERE project_id = $1::varchar AND active AND (agent_id IS NULL OR agent_id = $4::varchar)
      AND EXISTS (SELECT 1 FROM w)
      AND spent_micros + reserved_micros + $2::bigint <= limit_micros
      AND period_start >= CASE period WHEN 'day' THEN $5::timestamptz WHEN 'week' THEN $6::timestamptz
                                      WHEN 'month' THEN $7::timestamptz ELSE period_start END
    RETURNING {_RETURNING_BUDGET}),
applicable AS (
    SELECT count(*) AS n FROM budgets
    WHERE project_id = $1::varchar AND active AND (agent_id IS NULL OR agent_id = $4::varchar)),
h AS (
    UPDATE event_heads SET seq = seq + $8::bigint + (SELECT count(*) FROM b)
    WHERE project_id = $1::varchar AND EXISTS (SELECT 1 FROM w)
    RETURNING seq, hash),
r AS (
    INSERT INTO spend_requests ({", ".join(_REQUEST_COLUMNS)}, budget_ids)
    VALUES ({_REQUEST_VALUES}, (SELECT coalesce(jsonb_agg(id ORDER BY id), '[]'::jsonb) FROM b)))
SELECT w.project_id AS w_project_id, w.balance_micros AS w_balance_micros, w.reserved_micros AS w_reserved_micros,
       w.deposit_address AS w_deposit_address, w.updated_at AS w_updated_at,
       (SELECT n FROM applicable) AS applicable, h.seq AS head_seq, h.hash AS head_hash, {_B}
FROM (SELECT 1) AS one LEFT JOIN w ON true LEFT JOIN h ON true LEFT JOIN b ON true
ORDER BY b.id
"""

# $1 request, $2 allowed current statuses, $3 new status, $4 cost, $5/$6 tokens, $7 response, $8 error,
# $9 settled_at, $10 now, $11 ledger entry id, $12 actor, $13 events besides the budgets'.
_CLOSE = f"""
WITH t AS (
    UPDATE spend_requests SET status = $3::varchar, cost_micros = $4::bigint, input_tokens = $5::integer,
        output_tokens = $6::integer, response = $7::jsonb, error = $8::jsonb, settled_at = $9::timestamptz,
        reservation_expires_at = NULL
    WHERE id = $1::varchar AND status = ANY($2::varchar[])
    RETURNING project_id, model, reserved_micros, budget_ids),
w AS (
    UPDATE wallets SET reserved_micros = wallets.reserved_micros - t.reserved_micros,
        balance_micros = wallets.balance_micros - $4::bigint, updated_at = $10::timestamptz
    FROM t
    WHERE wallets.project_id = t.project_id AND t.reserved_micros > 0
      AND wallets.reserved_micros >= t.reserved_micros
    RETURNING wallets.project_id, wallets.balance_micros, wallets.reserved_micros, wallets.deposit_address,
              wallets.updated_at),
l AS (
    INSERT INTO ledger_entries (id, project_id, kind, amount_micros, balance_after_micros, ref, memo, actor,
                                created_at)
    SELECT $11::varchar, w.project_id, 'spend', -$4::bigint, w.balance_micros, $1::varchar, left(t.model, 500),
           $12::varchar, $10::timestamptz
    FROM w, t WHERE $4::bigint > 0
    RETURNING memo),
b AS (
    UPDATE budgets SET reserved_micros = budgets.reserved_micros - t.reserved_micros,
        spent_micros = budgets.spent_micros + $4::bigint, updated_at = $10::timestamptz
    FROM t
    WHERE budgets.id IN (SELECT jsonb_array_elements_text(t.budget_ids)) AND EXISTS (SELECT 1 FROM w)
      AND budgets.reserved_micros >= t.reserved_micros
    RETURNING {_RETURNING_BUDGET}),
h AS (
    UPDATE event_heads SET seq = seq + $13::bigint + (SELECT count(*) FROM b)
    FROM t WHERE event_heads.project_id = t.project_id AND EXISTS (SELECT 1 FROM w)
    RETURNING event_heads.seq, event_heads.hash)
SELECT t.reserved_micros AS held, w.project_id AS w_project_id, w.balance_micros AS w_balance_micros,
       w.reserved_micros AS w_reserved_micros, w.deposit_address AS w_deposit_address,
       w.updated_at AS w_updated_at, (SELECT memo FROM l) AS memo, h.seq AS head_seq, h.hash AS head_hash, {_B}
FROM (SELECT 1) AS one LEFT JOIN t ON true LEFT JOIN w ON true LEFT JOIN h ON true LEFT JOIN b ON true
ORDER BY b.id
"""

_SET_ALERTED = "UPDATE budgets SET alerted = $2::jsonb WHERE id = $1::varchar"
_MORE_EVENTS = "UPDATE event_heads SET seq = seq + $2::bigint WHERE project_id = $1::varchar RETURNING seq, hash"


class _Decline(Exception):
    """The hot path does not handle this case: roll back, let the generic path run."""


def _wallet(row: asyncpg.Record) -> Wallet:
    return Wallet(project_id=row["w_project_id"], balance_micros=row["w_balance_micros"],
                  reserved_micros=row["w_reserved_micros"],
                  available_micros=row["w_balance_micros"] - row["w_reserved_micros"],
                  deposit_address=row["w_deposit_address"], updated_at=row["w_updated_at"])


def _budgets(rows: Sequence[asyncpg.Record]) -> list[Budget]:
    return [Budget(**{c: r["b_" + c] for c in _BUDGET_COLUMNS}) for r in rows if r["b_id"] is not None]


class _Done(NamedTuple):
    """One operation's part of a batch: its events, and the head as its statement left it."""

    pending: list[PendingEvent]
    actor: str
    head_seq: int  # the project's seq after this operation's events
    head_hash: str  # the head's hash as the statement read it (the batch writes the new hashes at the end)


class _Op(NamedTuple):
    kind: str  # "reserve" | "close"
    project_id: str
    ref: str
    work: Callable[[asyncpg.Connection], Awaitable[_Done]]
    future: asyncio.Future[bool]


class PgHotPath:
    """``domain.spend.HotPath`` for PostgreSQL. ``publish`` gets the committed events (the bus).

    Group commit: operations that arrive while a transaction is in flight wait and then run together
    — ordered by project, so every batch takes row locks in one global order — in ONE transaction
    with ONE event append (``PG_APPEND_MANY``) and one commit. Under load a hot project's wallet and
    event-head rows are then locked once per batch instead of once per request, and the commits'
    fsyncs are shared. If any operation of a batch declines or fails, the batch rolls back and each of
    its operations runs again alone, so one request's trouble is never another's."""

    def __init__(self, db: Database, publish: Callable[[list[Event]], Awaitable[None]], *, workers: int = 2,
                 max_batch: int = 64) -> None:
        self.db = db
        self.publish = publish
        self.workers = workers
        self.max_batch = max_batch
        # How often each happened: reserve, close, declined, error; batches committed; batches split after a failure.
        self.outcomes: Counter[str] = Counter()
        self._queue: list[_Op] = []
        self._active = 0
        self._tasks: set[asyncio.Task] = set()

    async def reserve(self, row: SpendRequest, actor: str, before: list[PendingEvent], after: list[PendingEvent],
                      now: datetime) -> bool:
        amount = row.reserved_micros
        starts = [period_start(p, now) for p in ("day", "week", "month")]
        args = [getattr(row, c) for c in _REQUEST_COLUMNS]

        async def work(conn: asyncpg.Connection) -> _Done:
            rows = await conn.fetch(_RESERVE, row.project_id, amount, now, row.agent_id, *starts,
                                    len(before) + 1 + len(after), *args)
            first = rows[0]
            if first["w_project_id"] is None:
                raise _Decline("the wallet has no room")
            budgets = _budgets(rows)
            if len(budgets) != first["applicable"]:
                raise _Decline("a budget has no room, or must roll into a new period")
            row.budget_ids = [b.id for b in budgets]
            money = [PendingEvent(row.project_id, "wallet.updated",
                                  wallet_updated(_wallet(first), "hold", amount, row.id))]
            money += [PendingEvent(row.project_id, "budget.updated",
                                   budget_updated(b, "reserved", amount=amount, ref=row.id)) for b in budgets]
            return _Done([*before, *money, *after], actor, first["head_seq"], first["head_hash"])

        return await self._submit("reserve", row.project_id, row.id, work)

    async def close(self, request: Prepared, from_statuses: tuple[str, ...], values: CloseValues, actor: str,
                    after: list[PendingEvent], now: datetime) -> bool:
        cost = values.cost_micros
        held = request.reserved_micros
        project_id = request.project_id
        entry_id = new_id("led")

        async def work(conn: asyncpg.Connection) -> _Done:
            rows = await conn.fetch(_CLOSE, request.request_id, list(from_statuses), values.status, cost,
                                    values.input_tokens, values.output_tokens, values.response, values.error,
                                    values.settled_at, now, entry_id, actor, 1 + len(after))
            first = rows[0]
            if first["held"] != held or first["w_project_id"] is None:
                raise _Decline("the request is not in the expected state")
            entry = None
            if cost:
                entry = LedgerEntry(id=entry_id, project_id=project_id, kind="spend", amount_micros=-cost,
                                    balance_after_micros=first["w_balance_micros"], ref=request.request_id,
                                    memo=first["memo"], actor=actor, created_at=now)
            events = [PendingEvent(project_id, "wallet.updated",
                                   wallet_updated(_wallet(first), "spend", -cost, request.request_id, entry=entry,
                                                  released_micros=held - cost))]
            alerts = 0
            for budget in _budgets(rows):
                events.append(PendingEvent(project_id, "budget.updated", budget_updated(
                    budget, "settled", amount=cost, released_micros=held - cost, ref=request.request_id)))
                crossed = crossed_thresholds(budget)
                if crossed:  # rare: once per threshold per period
                    await conn.execute(_SET_ALERTED, budget.id, sorted({*budget.alerted, *crossed}))
                    events += [PendingEvent(project_id, "budget.threshold", threshold_reached(budget, t))
                               for t in crossed]
                    alerts += len(crossed)
            head_seq = first["head_seq"]
            if alerts:
                head_seq = (await conn.fetchrow(_MORE_EVENTS, project_id, alerts))["seq"]
            return _Done([*events, *after], actor, head_seq, first["head_hash"])

        return await self._submit("close", project_id, request.request_id, work)

    # ------------------------------------------------------------ group commit
    async def _submit(self, kind: str, project_id: str, ref: str,
                      work: Callable[[asyncpg.Connection], Awaitable[_Done]]) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        op = _Op(kind, project_id, ref, work, future)
        if self._queue or self._active >= self.workers:
            self._queue.append(op)  # a transaction is in flight: wait for the next batch
            self._start_worker()
            return await future
        # Nothing in flight: run at once in the caller's task (no hand-over), as a batch of one.
        self._active += 1
        try:
            await self._commit([op])
        finally:
            self._active -= 1
            self._start_worker()  # operations that queued meanwhile
        return future.result()

    def _start_worker(self) -> None:
        if self._queue and self._active < self.workers:
            self._active += 1
            task = asyncio.create_task(self._worker(), name="smartspace-hot-path")
            self._tasks.add(task)  # held until it ends (it does when the queue is drained)
            task.add_done_callback(self._tasks.discard)

    async def _worker(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
                batch.sort(key=lambda op: op.project_id)  # stable: each project's operations keep their order
                if len(batch) == 1 or not await self._commit(batch):
                    for op in batch:  # alone: a decline or failure is that operation's own
                        await self._commit([op])
        finally:
            self._active -= 1

    async def _commit(self, ops: list[_Op]) -> bool:
        """Run ``ops`` in one transaction. True: committed, published, every future resolved True.
        False for a batch of several: rolled back, nothing resolved (the caller retries them alone)."""
        try:
            async with self.db.raw() as conn, conn.transaction():
                done = [await op.work(conn) for op in ops]
                events = self._chain(ops, done)
                await conn.execute(PG_APPEND_MANY, *append_arguments(events))
        except (_Decline, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            if len(ops) > 1:
                self.outcomes["split"] += 1
                return False
            if isinstance(exc, _Decline):
                self.outcomes["declined"] += 1
            else:  # rolled back: the generic path retries it (and reports what it finds)
                self.outcomes["error"] += 1
                log.warning("hot path rolled back after a database error", extra={"ref": ops[0].ref,
                                                                                  "error": repr(exc)})
            _resolve(ops[0].future, False)
            return False
        except BaseException as exc:  # a bug or a cancellation: nobody may wait forever
            for op in ops:
                if op.future.done():
                    continue
                if isinstance(exc, Exception):
                    op.future.set_exception(exc)
                else:
                    op.future.cancel()
            raise
        self.outcomes["batches"] += 1
        for op in ops:
            self.outcomes[op.kind] += 1
        try:
            await self.publish(events)
        finally:
            for op in ops:
                _resolve(op.future, True)
        return True

    @staticmethod
    def _chain(ops: list[_Op], done: list[_Done]) -> list[Event]:
        """Hash-chain every operation's events after its project's head: the first operation of a project
        links to the head's stored hash, each next one to the previous operation's last event."""
        last: dict[str, str] = {}
        out: list[Event] = []
        for op, result in zip(ops, done, strict=True):
            prev = last.get(op.project_id, result.head_hash)
            chained = link(result.pending, op.project_id, result.actor, result.head_seq - len(result.pending), prev)
            last[op.project_id] = chained[-1].hash
            out += chained
        return out


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():  # the waiting caller may have been cancelled meanwhile
        future.set_result(value)

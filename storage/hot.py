"""The spend hot path on PostgreSQL: each of a request's two money transactions in four round trips
on a raw asyncpg connection (``domain.spend.HotPath``).

A reservation is ``BEGIN``; one statement that holds the wallet, reserves every applicable budget,
advances the project's event head and inserts the request; one statement that appends the events
(``storage.events.PG_APPEND_RAW``); ``COMMIT``. Closing an executing request (settle or fail) is the
same shape: the status transition, the wallet capture and release, the ledger entry, the budgets and
the head in one statement, then the events. The statements are fixed texts, prepared once per
connection by asyncpg; the generic path (SQLAlchemy, ``domain.spend.Spending``) issues ~12 statements
for the same work and spent most of a gateway request's CPU doing it (bench/README.md).

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

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import asyncpg

from domain.base import new_id
from domain.budgets import Budget, budget_updated, crossed_thresholds, period_start, threshold_reached
from domain.events import Event, PendingEvent
from domain.spend import CloseValues, Prepared, SpendRequest
from domain.wallet import LedgerEntry, Wallet, wallet_updated
from storage.db import Database
from storage.events import PG_APPEND_RAW, append_arguments, link

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


class PgHotPath:
    """``domain.spend.HotPath`` for PostgreSQL. ``publish`` gets the committed events (the bus)."""

    def __init__(self, db: Database, publish: Callable[[list[Event]], Awaitable[None]]) -> None:
        self.db = db
        self.publish = publish
        self.outcomes: Counter[str] = Counter()  # "reserve", "close", "declined", "error": how often each happened

    async def reserve(self, row: SpendRequest, actor: str, before: list[PendingEvent], after: list[PendingEvent],
                      now: datetime) -> bool:
        amount = row.reserved_micros
        starts = [period_start(p, now) for p in ("day", "week", "month")]
        args = [getattr(row, c) for c in _REQUEST_COLUMNS]

        async def work(conn: asyncpg.Connection) -> list[Event]:
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
            return await self._append(conn, [*before, *money, *after], actor, first["head_seq"], first["head_hash"])

        return await self._run("reserve", work, row.id)

    async def close(self, request: Prepared, from_statuses: tuple[str, ...], values: CloseValues, actor: str,
                    after: list[PendingEvent], now: datetime) -> bool:
        cost = values.cost_micros
        held = request.reserved_micros
        project_id = request.project_id
        entry_id = new_id("led")

        async def work(conn: asyncpg.Connection) -> list[Event]:
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
            alerts: list[PendingEvent] = []
            for budget in _budgets(rows):
                events.append(PendingEvent(project_id, "budget.updated", budget_updated(
                    budget, "settled", amount=cost, released_micros=held - cost, ref=request.request_id)))
                crossed = crossed_thresholds(budget)
                if crossed:  # rare: once per threshold per period
                    await conn.execute(_SET_ALERTED, budget.id, sorted({*budget.alerted, *crossed}))
                    reached = [PendingEvent(project_id, "budget.threshold", threshold_reached(budget, t))
                               for t in crossed]
                    events += reached
                    alerts += reached
            head_seq, head_hash = first["head_seq"], first["head_hash"]
            if alerts:
                head = await conn.fetchrow(_MORE_EVENTS, project_id, len(alerts))
                head_seq = head["seq"]
            return await self._append(conn, [*events, *after], actor, head_seq, head_hash)

        return await self._run("close", work, request.request_id)

    # ------------------------------------------------------------ plumbing
    async def _append(self, conn: asyncpg.Connection, pending: list[PendingEvent], actor: str, head_seq: int,
                      head_hash: str) -> list[Event]:
        """Chain ``pending`` after the head the statement advanced to ``head_seq`` (its old hash
        ``head_hash``), and insert them with the head's new hash."""
        chained = link(pending, pending[0].project_id, actor, head_seq - len(pending), head_hash)
        await conn.execute(PG_APPEND_RAW, *append_arguments(chained))
        return chained

    async def _run(self, op: str, work: Callable[[asyncpg.Connection], Awaitable[list[Event]]], ref: str) -> bool:
        try:
            async with self.db.raw() as conn, conn.transaction():
                events = await work(conn)
        except _Decline:
            self.outcomes["declined"] += 1
            return False
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            # Rolled back: the generic path retries it (and reports what it finds).
            self.outcomes["error"] += 1
            log.warning("hot path rolled back after a database error", extra={"ref": ref, "error": repr(exc)})
            return False
        self.outcomes[op] += 1
        await self.publish(events)
        return True

"""The spend hot path on PostgreSQL: a request's two money transactions — the reservation, and the
closing (settle or fail) — as fixed statements on a raw asyncpg connection (``domain.spend.HotPath``).

Three lanes, chosen per operation by how busy this process is:

- **express** (nothing in flight, and this process wrote the project's rows last): ONE autocommit
  statement. Every value, event and hash is computed here beforehand from the rows as this process
  left them; each row is updated only if it still holds exactly that (``_EXPRESS_RESERVE``), or the
  statement undoes itself and the operation takes the next lane. 1 round trip, 1 fsync.
- **alone** (something else may be in flight, or the rows are not known): ``BEGIN``; one statement
  that does the money and advances the event head (``_RESERVE`` / ``_CLOSE``); one statement
  appending the events (``storage.events.PG_APPEND_MANY``); ``COMMIT``.
- **group commit** (transactions already in flight): the operations that arrived meanwhile run
  together in the same four-step shape — one money statement each, one append for all, one commit —
  ordered by project, so every batch locks rows in one global order. Under load a hot project's
  wallet and event-head rows are locked once per batch, and the fsync is shared.

The statements are fixed texts, prepared once per connection by asyncpg; the generic path
(SQLAlchemy, ``domain.spend.Spending``) issues ~12 statements for the same work and spent most of a
gateway request's CPU doing it (bench/README.md).

Only the common case is handled here; anything else changes nothing and returns False so the
service runs its generic path, which knows every case and builds the exact error: a wallet or budget
without room (the rejection), a budget whose period has ended (it must roll first), a budget
deactivated meanwhile, a request no longer in the expected status, any database error. The events
are the generic path's, built by the same functions (``tests/integration/test_hot_path.py`` compares
the two paths' audit logs event for event).

The conditional UPDATEs are the same as the generic path's (``WHERE balance - reserved >= n``,
``WHERE spent + reserved + n <= limit``): on PostgreSQL each re-checks its condition against the
latest committed row under the row lock, so no concurrency can push a wallet or budget over its
limit — the CHECK constraints would refuse it anyway. Lock order is the generic path's: request row,
wallet, budgets, event head (each CTE depends on the one before, so PostgreSQL runs them in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import NamedTuple

import asyncpg
import msgspec

from domain.base import new_id
from domain.budgets import Budget, budget_updated, crossed_thresholds, needs_roll, period_start, threshold_reached
from domain.events import Event, PendingEvent
from domain.spend import CloseValues, Prepared, SpendRequest
from domain.wallet import LedgerEntry, Wallet, wallet_updated
from storage.db import Database
from storage.events import PG_APPEND_MANY, append_arguments, link

log = logging.getLogger("smartspace.hot")

_BUDGET_COLUMNS = ("id", "project_id", "agent_id", "key_id", "name", "period", "limit_micros", "spent_micros",
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
# Key-scoped budgets (issue 15): the request row's own key_id argument is the key the budgets must match
# (storage.budgets.applies_to says the same for the generic path).
_KEY_ARG = _FIRST_REQUEST_ARG + _REQUEST_COLUMNS.index("key_id")

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
      AND (key_id IS NULL OR key_id = ${_KEY_ARG}::varchar)
      AND EXISTS (SELECT 1 FROM w)
      AND spent_micros + reserved_micros + $2::bigint <= limit_micros
      AND period_start >= CASE period WHEN 'day' THEN $5::timestamptz WHEN 'week' THEN $6::timestamptz
                                      WHEN 'month' THEN $7::timestamptz ELSE period_start END
    RETURNING {_RETURNING_BUDGET}),
applicable AS (
    SELECT count(*) AS n FROM budgets
    WHERE project_id = $1::varchar AND active AND (agent_id IS NULL OR agent_id = $4::varchar)
      AND (key_id IS NULL OR key_id = ${_KEY_ARG}::varchar)),
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


# ---------------------------------------------------------------- the express lane
# When this process wrote a project's rows last (it knows its wallet, budgets and event head exactly) and
# nothing else of the hot path is in flight, a reservation or a closing is ONE autocommit statement:
# every value, every event and its hash computed here beforehand, each row updated only if it still
# holds what this process last saw (the event head by seq and hash, a budget by spent, reserved,
# updated_at and alerted, the wallet by balance and reserved) — the money conditions themselves are
# still evaluated on the rows. If anything moved (another process, an admin, a deposit), the final
# SELECT divides by zero: the whole statement, every CTE, is undone, and the operation takes the
# normal path. One round trip and one fsync instead of BEGIN, two statements and COMMIT.
# Each CTE waits for the one before it (the EXISTS / count references), so the rows are locked in the normal
# path's order — request, wallet, budgets, event head — and the events go in last.
_EXPRESS_EVENTS = """
h AS (
    UPDATE event_heads SET seq = $10::bigint, hash = $11::varchar
    WHERE project_id = $1::varchar AND seq = $12::bigint AND hash = $13::varchar
      AND (SELECT count(*) FROM b) = cardinality($17::varchar[])
    RETURNING 1),
e AS (
    INSERT INTO events (id, project_id, seq, type, actor, data, ts, prev_hash, hash)
    SELECT t.id, $1::varchar, t.seq, t.type, $2::varchar, t.data, t.ts, t.prev_hash, t.hash
    FROM unnest($3::varchar[], $4::bigint[], $5::varchar[], $6::jsonb[], $7::varchar[], $8::varchar[], $9::varchar[])
         AS t(id, seq, type, data, ts, prev_hash, hash)
    WHERE EXISTS (SELECT 1 FROM h))"""
_EXPRESS_BUDGETS = ("unnest($17::varchar[], $18::bigint[], $19::bigint[], $20::timestamptz[], $21::text[], "
                    "$22::text[]) AS x(id, spent, reserved, updated_at, alerted, new_alerted)")
_EXPRESS_BUDGET_MATCH = ("budgets.id = x.id AND budgets.spent_micros = x.spent "
                         "AND budgets.reserved_micros = x.reserved AND budgets.updated_at = x.updated_at "
                         "AND budgets.alerted = x.alerted::jsonb")
_FIRST_EXPRESS_REQUEST_ARG = 24
_EXPRESS_REQUEST_VALUES = ", ".join(f"${i}::{_REQUEST_TYPES.get(c, 'varchar')}"
                                    for i, c in enumerate(_REQUEST_COLUMNS, start=_FIRST_EXPRESS_REQUEST_ARG))
_EXPRESS_KEY_ARG = _FIRST_EXPRESS_REQUEST_ARG + _REQUEST_COLUMNS.index("key_id")
_WALLET_MATCH = ("project_id = $1::varchar AND balance_micros = ($16::bigint[])[1] "
                 "AND reserved_micros = ($16::bigint[])[2]")

# $1 project, $2 actor, $3-$9 events, $10/$11 new head, $12/$13 old head, $14 amount, $15 now,
# $16 wallet (balance, reserved) as an array, $17-$22 budgets, $23 agent, $24… the request row.
_EXPRESS_RESERVE = f"""
WITH w AS (
    UPDATE wallets SET reserved_micros = reserved_micros + $14::bigint, updated_at = $15::timestamptz
    WHERE {_WALLET_MATCH} AND balance_micros - reserved_micros >= $14::bigint
    RETURNING 1),
b AS (
    UPDATE budgets SET reserved_micros = budgets.reserved_micros + $14::bigint, updated_at = $15::timestamptz
    FROM {_EXPRESS_BUDGETS}
    WHERE {_EXPRESS_BUDGET_MATCH} AND budgets.active AND EXISTS (SELECT 1 FROM w)
      AND budgets.spent_micros + budgets.reserved_micros + $14::bigint <= budgets.limit_micros
    RETURNING 1),
{_EXPRESS_EVENTS},
r AS (
    INSERT INTO spend_requests ({", ".join(_REQUEST_COLUMNS)}, budget_ids)
    VALUES ({_EXPRESS_REQUEST_VALUES}, to_jsonb($17::varchar[])))
SELECT 1 / ((SELECT count(*) FROM h) = 1 AND (SELECT count(*) FROM w) = 1
            AND (SELECT count(*) FROM budgets WHERE project_id = $1::varchar AND active
                 AND (agent_id IS NULL OR agent_id = $23::varchar)
                 AND (key_id IS NULL OR key_id = ${_EXPRESS_KEY_ARG}::varchar))
                = cardinality($17::varchar[]))::int AS ok
"""

# $1-$13 as above, $14 cost, $15 now, $16 wallet (balance, reserved), $17-$22 budgets (new_alerted with any
# threshold just crossed), $23 request id, $24 allowed statuses, $25 new status, $26/$27 tokens, $28 response,
# $29 error, $30 settled_at, $31 held, $32 ledger entry id, $33 memo.
_EXPRESS_CLOSE = f"""
WITH t AS (
    UPDATE spend_requests SET status = $25::varchar, cost_micros = $14::bigint, input_tokens = $26::integer,
        output_tokens = $27::integer, response = $28::jsonb, error = $29::jsonb, settled_at = $30::timestamptz,
        reservation_expires_at = NULL
    WHERE id = $23::varchar AND status = ANY($24::varchar[]) AND reserved_micros = $31::bigint
    RETURNING 1),
w AS (
    UPDATE wallets SET reserved_micros = reserved_micros - $31::bigint,
        balance_micros = balance_micros - $14::bigint, updated_at = $15::timestamptz
    WHERE {_WALLET_MATCH} AND reserved_micros >= $31::bigint AND EXISTS (SELECT 1 FROM t)
    RETURNING 1),
l AS (
    INSERT INTO ledger_entries (id, project_id, kind, amount_micros, balance_after_micros, ref, memo, actor,
                                created_at)
    SELECT $32::varchar, $1::varchar, 'spend', -$14::bigint, ($16::bigint[])[1] - $14::bigint, $23::varchar,
           $33::varchar, $2::varchar, $15::timestamptz
    WHERE $14::bigint > 0),
b AS (
    UPDATE budgets SET reserved_micros = budgets.reserved_micros - $31::bigint,
        spent_micros = budgets.spent_micros + $14::bigint, updated_at = $15::timestamptz, alerted = x.new_alerted::jsonb
    FROM {_EXPRESS_BUDGETS}
    WHERE {_EXPRESS_BUDGET_MATCH} AND budgets.reserved_micros >= $31::bigint AND EXISTS (SELECT 1 FROM w)
    RETURNING 1),
{_EXPRESS_EVENTS}
SELECT 1 / ((SELECT count(*) FROM h) = 1 AND (SELECT count(*) FROM t) = 1
            AND (SELECT count(*) FROM w) = 1)::int AS ok
"""


def _event_arguments(project_id: str, actor: str, chained: list[Event], head: tuple[int, str]) -> list:
    """$1-$13 of an express statement: the events, the head they move to, the head they expect."""
    return [project_id, actor, [e.id for e in chained], [e.seq for e in chained], [e.type for e in chained],
            [e.data for e in chained], [e.ts for e in chained], [e.prev_hash for e in chained],
            [e.hash for e in chained], chained[-1].seq, chained[-1].hash, head[0], head[1]]


def _budget_arguments(expected: list[Budget], new_alerted: list[list[int]]) -> list:
    """$17-$22: each budget as this process last wrote it, and its alerted list after this operation."""
    return [[b.id for b in expected], [b.spent_micros for b in expected], [b.reserved_micros for b in expected],
            [b.updated_at for b in expected], [_json(b.alerted) for b in expected], [_json(a) for a in new_alerted]]


def _json(value: object) -> str:  # lists as jsonb array elements go as text (asyncpg reads a list as a dimension)
    return msgspec.json.encode(value).decode()


class _Decline(Exception):
    """The hot path does not handle this case: roll back, let the generic path run."""


def _wallet(row: asyncpg.Record) -> Wallet:
    return Wallet(project_id=row["w_project_id"], balance_micros=row["w_balance_micros"],
                  reserved_micros=row["w_reserved_micros"],
                  available_micros=row["w_balance_micros"] - row["w_reserved_micros"],
                  deposit_address=row["w_deposit_address"], updated_at=row["w_updated_at"])


def _budgets(rows: Sequence[asyncpg.Record]) -> list[Budget]:
    return [Budget(**{c: r["b_" + c] for c in _BUDGET_COLUMNS}) for r in rows if r["b_id"] is not None]


def _alerted(budgets: list[Budget], crossed: list[list[int]]) -> list[Budget]:
    """The budgets as stored once the thresholds just crossed are recorded as alerted."""
    return [msgspec.structs.replace(b, alerted=sorted({*b.alerted, *c})) if c else b
            for b, c in zip(budgets, crossed, strict=True)]


class _State:
    """A project's rows as this process's hot path last wrote them (what the express lane builds on)."""

    __slots__ = ("applicable", "budgets", "head", "wallet")

    def __init__(self, wallet: Wallet, head: tuple[int, str]) -> None:
        self.wallet = wallet
        self.head = head
        self.budgets: dict[str, Budget] = {}
        # (agent id, key id) → the budgets their requests reserve
        self.applicable: dict[tuple[str | None, str | None] | None, tuple[str, ...]] = {}


class _After(NamedTuple):
    """The rows as one operation left them."""

    wallet: Wallet
    budgets: list[Budget]
    requester: tuple[str | None, str | None] | None = None  # a reservation's (agent, key)
    applicable: tuple[str, ...] | None = None  # a reservation: every budget that applied


class _Done(NamedTuple):
    """One operation's part of a batch: its events, and the head as its statement left it."""

    pending: list[PendingEvent]
    actor: str
    head_seq: int  # the project's seq after this operation's events
    head_hash: str  # the head's hash as the statement read it (the batch writes the new hashes at the end)
    after: _After


class _Express(NamedTuple):
    """One operation as a single statement: its text and arguments, its events, the rows after it."""

    sql: str
    args: list
    events: list[Event]
    after: _After


class _Op(NamedTuple):
    kind: str  # "reserve" | "close"
    project_id: str
    ref: str
    work: Callable[[asyncpg.Connection], Awaitable[_Done]]
    express: Callable[[_State], _Express | None]
    future: asyncio.Future[bool]


class PgHotPath:
    """``domain.spend.HotPath`` for PostgreSQL. ``publish`` gets the committed events (the bus).

    Group commit: operations that arrive while a transaction is in flight wait and then run together
    — ordered by project, so every batch takes row locks in one global order — in ONE transaction
    with ONE event append (``PG_APPEND_MANY``) and one commit. Under load a hot project's wallet and
    event-head rows are then locked once per batch instead of once per request, and the commits'
    fsyncs are shared. If any operation of a batch declines or fails, the batch rolls back and each of
    its operations runs again alone, so one request's trouble is never another's.

    Express lane: when nothing is in flight and this process knows the project's rows exactly (it wrote
    them last), an operation is one autocommit statement (``_EXPRESS_RESERVE`` / ``_EXPRESS_CLOSE``)."""

    def __init__(self, db: Database, publish: Callable[[list[Event]], Awaitable[None]], *, workers: int = 2,
                 max_batch: int = 64, max_projects: int = 10_000) -> None:
        self.db = db
        self.publish = publish
        self.workers = workers
        self.max_batch = max_batch
        self.max_projects = max_projects
        # How often each happened: reserve, close, declined, error; batches committed; batches split after a
        # failure; express (one-statement) operations, and stale ones (the rows had moved: the normal path ran).
        self.outcomes: Counter[str] = Counter()
        self._queue: list[_Op] = []
        self._active = 0
        self._tasks: set[asyncio.Task] = set()
        self._state: dict[str, _State] = {}

    def forget(self, project_id: str | None = None) -> None:
        """Drop what this process knows of a project's rows (all projects with None)."""
        if project_id is None:
            self._state.clear()
        else:
            self._state.pop(project_id, None)

    # ------------------------------------------------------------ reserve
    async def reserve(self, row: SpendRequest, actor: str, before: list[PendingEvent], after: list[PendingEvent],
                      now: datetime) -> bool:
        amount = row.reserved_micros
        starts = [period_start(p, now) for p in ("day", "week", "month")]
        args = [getattr(row, c) for c in _REQUEST_COLUMNS]

        def events(wallet: Wallet, budgets: list[Budget]) -> list[PendingEvent]:
            money = [PendingEvent(row.project_id, "wallet.updated", wallet_updated(wallet, "hold", amount, row.id))]
            money += [PendingEvent(row.project_id, "budget.updated",
                                   budget_updated(b, "reserved", amount=amount, ref=row.id)) for b in budgets]
            return [*before, *money, *after]

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
            wallet = _wallet(first)
            return _Done(events(wallet, budgets), actor, first["head_seq"], first["head_hash"],
                         _After(wallet, budgets, (row.agent_id, row.key_id), tuple(row.budget_ids)))

        def express(state: _State) -> _Express | None:
            ids = state.applicable.get((row.agent_id, row.key_id))
            if ids is None or any(i not in state.budgets for i in ids):
                return None
            budgets = [state.budgets[i] for i in ids]
            old = state.wallet
            if old.balance_micros - old.reserved_micros < amount or any(
                    b.spent_micros + b.reserved_micros + amount > b.limit_micros
                    or needs_roll(b.period, b.period_start, now) for b in budgets):
                return None  # the normal path (and then the generic one) says why
            wallet = msgspec.structs.replace(old, reserved_micros=old.reserved_micros + amount,
                                             available_micros=old.available_micros - amount, updated_at=now)
            moved = [msgspec.structs.replace(b, reserved_micros=b.reserved_micros + amount, updated_at=now)
                     for b in budgets]
            row.budget_ids = list(ids)
            chained = link(events(wallet, moved), row.project_id, actor, *state.head)
            return _Express(_EXPRESS_RESERVE, [
                *_event_arguments(row.project_id, actor, chained, state.head), amount, now,
                [old.balance_micros, old.reserved_micros], *_budget_arguments(budgets, [b.alerted for b in budgets]),
                row.agent_id, *args], chained, _After(wallet, moved, (row.agent_id, row.key_id), ids))

        return await self._submit("reserve", row.project_id, row.id, work, express)

    # ------------------------------------------------------------ close (settle or fail)
    async def close(self, request: Prepared, from_statuses: tuple[str, ...], values: CloseValues, actor: str,
                    after: list[PendingEvent], now: datetime) -> bool:
        cost = values.cost_micros
        held = request.reserved_micros
        project_id = request.project_id
        entry_id = new_id("led")
        memo = request.model[:500]

        def events(wallet: Wallet, budgets: list[Budget], crossed: list[list[int]]) -> list[PendingEvent]:
            """Budgets as settled, before the crossed thresholds are recorded (as the generic path shows them)."""
            entry = None
            if cost:
                entry = LedgerEntry(id=entry_id, project_id=project_id, kind="spend", amount_micros=-cost,
                                    balance_after_micros=wallet.balance_micros, ref=request.request_id, memo=memo,
                                    actor=actor, created_at=now)
            out = [PendingEvent(project_id, "wallet.updated", wallet_updated(
                wallet, "spend", -cost, request.request_id, entry=entry, released_micros=held - cost))]
            for budget, reached in zip(budgets, crossed, strict=True):
                out.append(PendingEvent(project_id, "budget.updated", budget_updated(
                    budget, "settled", amount=cost, released_micros=held - cost, ref=request.request_id)))
                out += [PendingEvent(project_id, "budget.threshold", threshold_reached(budget, t)) for t in reached]
            return [*out, *after]

        async def work(conn: asyncpg.Connection) -> _Done:
            rows = await conn.fetch(_CLOSE, request.request_id, list(from_statuses), values.status, cost,
                                    values.input_tokens, values.output_tokens, values.response, values.error,
                                    values.settled_at, now, entry_id, actor, 1 + len(after))
            first = rows[0]
            if first["held"] != held or first["w_project_id"] is None:
                raise _Decline("the request is not in the expected state")
            budgets = _budgets(rows)
            crossed = [crossed_thresholds(b) for b in budgets]
            stored = _alerted(budgets, crossed)
            for budget, reached in zip(stored, crossed, strict=True):
                if reached:  # rare: once per threshold per period
                    await conn.execute(_SET_ALERTED, budget.id, budget.alerted)
            head_seq = first["head_seq"]
            if alerts := sum(len(c) for c in crossed):
                head_seq = (await conn.fetchrow(_MORE_EVENTS, project_id, alerts))["seq"]
            wallet = _wallet(first)
            return _Done(events(wallet, budgets, crossed), actor, head_seq, first["head_hash"], _After(wallet, stored))

        def express(state: _State) -> _Express | None:
            ids = sorted(request.budget_ids)
            if any(i not in state.budgets for i in ids):
                return None
            budgets = [state.budgets[i] for i in ids]
            old = state.wallet
            if old.reserved_micros < held or any(b.reserved_micros < held for b in budgets):
                return None
            wallet = msgspec.structs.replace(old, reserved_micros=old.reserved_micros - held,
                                             balance_micros=old.balance_micros - cost,
                                             available_micros=old.available_micros + held - cost, updated_at=now)
            moved = [msgspec.structs.replace(b, reserved_micros=b.reserved_micros - held,
                                             spent_micros=b.spent_micros + cost, updated_at=now) for b in budgets]
            crossed = [crossed_thresholds(b) for b in moved]
            stored = _alerted(moved, crossed)
            chained = link(events(wallet, moved, crossed), project_id, actor, *state.head)
            return _Express(_EXPRESS_CLOSE, [
                *_event_arguments(project_id, actor, chained, state.head), cost, now,
                [old.balance_micros, old.reserved_micros], *_budget_arguments(budgets, [b.alerted for b in stored]),
                request.request_id, list(from_statuses), values.status, values.input_tokens, values.output_tokens,
                values.response, values.error, values.settled_at, held, entry_id, memo],
                chained, _After(wallet, stored))

        return await self._submit("close", project_id, request.request_id, work, express)

    # ------------------------------------------------------------ group commit
    async def _submit(self, kind: str, project_id: str, ref: str,
                      work: Callable[[asyncpg.Connection], Awaitable[_Done]],
                      express: Callable[[_State], _Express | None]) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        op = _Op(kind, project_id, ref, work, express, future)
        if self._queue or self._active >= self.workers:
            self._queue.append(op)  # transactions are in flight: wait for the next batch
            self._start_worker()
            return await future
        # Room to run at once, in the caller's task (no hand-over): in the express lane if nothing at all is
        # in flight and this process knows the project's rows, else as a batch of one.
        self._active += 1
        try:
            state = self._state.get(project_id) if self._active == 1 else None
            plan = op.express(state) if state is not None else None
            if plan is None or not await self._express(op, plan):
                await self._commit([op])
        finally:
            self._active -= 1
            self._start_worker()  # operations that queued meanwhile
        return future.result()

    async def _express(self, op: _Op, plan: _Express) -> bool:
        """One autocommit statement. False (nothing changed): the rows were not as this process last wrote
        them, or the database failed — the caller takes the normal path."""
        try:
            async with self.db.raw() as conn:
                await conn.fetchval(plan.sql, *plan.args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self.forget(op.project_id)
            self.outcomes["stale"] += 1
            if not isinstance(exc, asyncpg.DivisionByZeroError):  # anything but the stale-rows guard
                log.warning("express statement failed", extra={"ref": op.ref, "error": repr(exc)})
            return False
        self.outcomes[op.kind] += 1
        self.outcomes["express"] += 1
        self._remember(op.project_id, plan.after, plan.events[-1])
        try:
            await self.publish(plan.events)
        finally:
            _resolve(op.future, True)
        return True

    def _remember(self, project_id: str, after: _After, last: Event) -> None:
        """Note the rows as an operation that just committed left them (a later commit may already have)."""
        state = self._state.get(project_id)
        if state is not None and state.head[0] >= last.seq:
            return
        if state is None:
            if len(self._state) >= self.max_projects:
                self._state.clear()
            state = self._state[project_id] = _State(after.wallet, (last.seq, last.hash))
        state.wallet = after.wallet
        state.head = (last.seq, last.hash)
        for budget in after.budgets:
            state.budgets[budget.id] = budget
        if after.applicable is not None:
            state.applicable[after.requester] = after.applicable

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
                if len(batch) > 1 and await self._commit(batch):
                    continue
                for op in batch:  # alone: a decline or failure is that operation's own
                    if op.future.done():
                        continue
                    with contextlib.suppress(Exception):  # handed to the operation's caller by _commit
                        await self._commit([op])
        except asyncio.CancelledError:  # shutting down: whoever still waits takes the generic path
            for op in self._queue:
                _resolve(op.future, False)
            self._queue.clear()
            raise
        finally:
            self._active -= 1
        self._start_worker()  # operations that arrived while this one was finishing

    async def _commit(self, ops: list[_Op]) -> bool:
        """Run ``ops`` in one transaction. True: committed, published, every future resolved True.
        False for a batch of several: rolled back, nothing resolved (the caller retries them alone)."""
        try:
            async with self.db.raw() as conn, conn.transaction():
                done = [await op.work(conn) for op in ops]
                events, lasts = self._chain(ops, done)
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
            if isinstance(exc, Exception) and len(ops) > 1:  # perhaps one operation's: each runs alone
                log.exception("hot path batch failed", extra={"refs": [op.ref for op in ops]})
                self.outcomes["split"] += 1
                return False
            for op in ops:
                if op.future.done():
                    continue
                if isinstance(exc, Exception):
                    op.future.set_exception(exc)
                else:
                    op.future.cancel()
            raise
        self.outcomes["batches"] += 1
        for op, result, last in zip(ops, done, lasts, strict=True):
            self.outcomes[op.kind] += 1
            self._remember(op.project_id, result.after, last)
        try:
            await self.publish(events)
        finally:
            for op in ops:
                _resolve(op.future, True)
        return True

    @staticmethod
    def _chain(ops: list[_Op], done: list[_Done]) -> tuple[list[Event], list[Event]]:
        """Hash-chain every operation's events after its project's head: the first operation of a project
        links to the head's stored hash, each next one to the previous operation's last event. Returns
        all events, and each operation's last one."""
        last: dict[str, str] = {}
        out: list[Event] = []
        lasts: list[Event] = []
        for op, result in zip(ops, done, strict=True):
            prev = last.get(op.project_id, result.head_hash)
            chained = link(result.pending, op.project_id, result.actor, result.head_seq - len(result.pending), prev)
            last[op.project_id] = chained[-1].hash
            lasts.append(chained[-1])
            out += chained
        return out, lasts


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():  # the waiting caller may have been cancelled meanwhile
        future.set_result(value)

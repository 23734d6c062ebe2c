"""The spend hot path on PostgreSQL: a request's two money transactions — the reservation, and the
closing (settle or fail) — as a few statements on a raw asyncpg connection (``domain.spend.HotPath``).

Three lanes, chosen per operation by how busy this process is:

- **express** (nothing in flight, and this process wrote the project's rows last): ONE autocommit
  statement. Every value, event and hash is computed here beforehand from the rows as this process
  left them; each row is updated only if it still holds exactly that (``_EXPRESS_RESERVE``), or the
  statement undoes itself and the operation takes the next lane. 1 round trip, 1 fsync.
- **alone** (something else may be in flight, or the rows are not known): ``BEGIN``; one statement
  that does the money and advances the event head (``_RESERVE`` / ``_CLOSE``); one statement
  appending the events (``storage.events.PG_APPEND_MANY``); ``COMMIT``.
- **group commit** (transactions already in flight, ``storage.batch.GroupCommit``): the operations
  that arrived meanwhile run together in the same four-step shape — one money statement each, one
  append for all, one commit — ordered by project, so every batch locks rows in one global order.
  Under load a hot project's wallet and event-head rows are locked once per batch, and the fsync is
  shared.

The statements are built with SQLAlchemy from the SAME expressions the generic repositories use —
wallet and budget room, holds, capture and settle values, applicability, the current period, the
request's transition, the event head's advance (storage/wallet.py, budgets.py, spend.py, events.py) —
and compiled once, at import, for asyncpg (``_Compiled``: text with $n parameters, which asyncpg
prepares once per connection). The generic path (SQLAlchemy per execute, ``domain.spend.Spending``)
issues ~12 statements for the same work and spent most of a gateway request's CPU doing it
(bench/README.md).

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
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

from domain.base import new_id
from domain.budgets import Budget, budget_updated, crossed_thresholds, needs_roll, period_start, threshold_reached
from domain.events import Event, PendingEvent
from domain.spend import CloseValues, Prepared, SpendRequest
from domain.wallet import LedgerEntry, Wallet, wallet_updated
from storage import budgets as budget_sql
from storage import events as events_sql
from storage import spend as spend_sql
from storage import wallet as wallet_sql
from storage.batch import Declined, GroupCommit, resolve
from storage.db import Database
from storage.events import PG_APPEND_MANY, append_arguments, link
from storage.models import budgets, event_heads, ledger_entries, spend_requests, wallets
from storage.models import events as events_table

log = logging.getLogger("smartspace.hot")

# ---------------------------------------------------------------- the statements, from the shared expressions
# Built with SQLAlchemy from the expressions the generic repositories use (storage/wallet.py, storage/budgets.py,
# storage/spend.py, storage/events.py: wallet room, budget room, applicability, the current period, the
# transition), compiled ONCE for asyncpg ($n parameters; asyncpg prepares each text once per connection).
class _Compiled:
    """A statement compiled once for asyncpg: its text, and its arguments from keyword values."""

    __slots__ = ("constants", "named", "order", "sql", "template")

    def __init__(self, stmt: sa.ClauseElement) -> None:
        # an SQLCompiler (positiontup, construct_params); typed as the base Compiled by SQLAlchemy
        compiled: Any = stmt.compile(dialect=asyncpg_dialect.dialect(), compile_kwargs={"render_postcompile": True})
        self.sql = compiled.string
        self.order = tuple(compiled.positiontup or ())
        self.constants = compiled.construct_params()  # the literals the expressions carry ('day', 1 …)
        self.template = [self.constants[n] for n in self.order]
        self.named = tuple((i, n) for i, n in enumerate(self.order) if n in _PARAMETERS)  # those of _p()

    def args(self, **values: Any) -> list[Any]:
        out = self.template.copy()
        for i, name in self.named:
            out[i] = values[name]
        return out


_PARAMETERS: set[str] = set()


def _p(name: str, type_: Any) -> sa.BindParameter[Any]:
    """A parameter given per call (``_Compiled.args``); every other bound value is a literal of the expressions."""
    _PARAMETERS.add(name)
    return sa.bindparam(name, type_=type_, required=False)


_TS = sa.DateTime(timezone=True)
W, B, H = wallets.c, budgets.c, event_heads.c
_BUDGET_COLUMNS = tuple(c.name for c in budgets.c)
_REQUEST_COLUMNS = tuple(c.name for c in spend_requests.c if c.name != "budget_ids")
_WALLET_OUT = (W.project_id, W.balance_micros, W.reserved_micros, W.deposit_address, W.updated_at)
_ONE = sa.select(sa.literal(1).label("one")).subquery("one")


def _wallet_columns(w: Any) -> list[Any]:
    return [w.c[c.name].label("w_" + c.name) for c in _WALLET_OUT]


def _budget_columns(b: Any) -> list[Any]:
    return [b.c[c].label("b_" + c) for c in _BUDGET_COLUMNS]


def _reserve_statement() -> sa.Select[Any]:
    """The reservation: the wallet held, every applicable budget in its current period reserved, the event
    head advanced, the request inserted (with the budgets reserved on). Budgets whose period has ended fail
    ``in_current_period`` (they must roll: the generic path). Parameters: project, amount, now, agent, day /
    week / month (the current period starts), others (events besides the budgets'), r_<column> (the row)."""
    project, amount, now, agent = _p("project", sa.String), _p("amount", sa.BigInteger), _p("now", _TS), \
        _p("agent", sa.String)
    key = _p("key", sa.String)
    w = (sa.update(wallets).where(W.project_id == project, wallet_sql.has_room(amount))
         .values(reserved_micros=W.reserved_micros + amount, updated_at=now).returning(*_WALLET_OUT).cte("w"))
    b = (sa.update(budgets)
         .where(budget_sql.applies(project, agent, key), sa.exists(sa.select(w.c.project_id)),
                budget_sql.has_room(amount),
                budget_sql.in_current_period(_p("day", _TS), _p("week", _TS), _p("month", _TS)))
         .values(reserved_micros=B.reserved_micros + amount, updated_at=now).returning(*budgets.c).cte("b"))
    h = (sa.update(event_heads).where(H.project_id == project, sa.exists(sa.select(w.c.project_id)))
         .values(seq=H.seq + _p("others", sa.BigInteger) + sa.select(sa.func.count()).select_from(b).scalar_subquery())
         .returning(H.seq, H.hash).cte("h"))
    reserved_on = sa.select(sa.func.coalesce(sa.func.jsonb_agg(aggregate_order_by(b.c.id, b.c.id)),
                                             sa.literal_column("'[]'::jsonb"))).scalar_subquery()
    r = sa.insert(spend_requests).values({**{c: _p("r_" + c, spend_requests.c[c].type) for c in _REQUEST_COLUMNS},
                                          "budget_ids": reserved_on}).cte("r")
    applicable = sa.select(sa.func.count()).select_from(budgets).where(budget_sql.applies(project, agent, key))
    return (sa.select(*_wallet_columns(w), applicable.scalar_subquery().label("applicable"),
                      h.c.seq.label("head_seq"), h.c.hash.label("head_hash"), *_budget_columns(b))
            .select_from(_ONE.outerjoin(w, sa.true()).outerjoin(h, sa.true()).outerjoin(b, sa.true()))
            .order_by(b.c.id).add_cte(r))


def _close_statement(from_statuses: tuple[str, ...]) -> sa.Select[Any]:
    """The closing (settle or fail) of a request in one of ``from_statuses``: its transition, the wallet's
    capture and release, the ledger entry (if charged), its budgets settled, the event head advanced.
    Parameters: id, status, cost, input_tokens, output_tokens, response, error, settled_at, now, entry, actor,
    others."""
    cost, now = _p("cost", sa.BigInteger), _p("now", _TS)
    request_id = _p("id", sa.String)
    t = (spend_sql.transition_stmt(
        request_id, from_statuses, status=_p("status", sa.String), cost_micros=cost,
        input_tokens=_p("input_tokens", sa.Integer), output_tokens=_p("output_tokens", sa.Integer),
        response=_p("response", spend_requests.c.response.type), error=_p("error", spend_requests.c.error.type),
        settled_at=_p("settled_at", _TS), reservation_expires_at=None,
        returning=(spend_requests.c.project_id, spend_requests.c.model, spend_requests.c.reserved_micros,
                   spend_requests.c.budget_ids)).cte("t"))
    w = (sa.update(wallets)
         .where(W.project_id == t.c.project_id, t.c.reserved_micros > 0, wallet_sql.holds(t.c.reserved_micros))
         .values(**wallet_sql.capture_values(t.c.reserved_micros, cost, now)).returning(*_WALLET_OUT).cte("w"))
    entry = sa.select(_p("entry", sa.String), w.c.project_id, sa.literal("spend"), -cost, w.c.balance_micros,
                      request_id, sa.func.left(t.c.model, 500), _p("actor", sa.String), now).where(cost > 0)
    l_ = (sa.insert(ledger_entries).from_select(
        ["id", "project_id", "kind", "amount_micros", "balance_after_micros", "ref", "memo", "actor", "created_at"],
        entry).returning(ledger_entries.c.memo).cte("l"))
    b = (sa.update(budgets)
         .where(B.id.in_(sa.select(sa.func.jsonb_array_elements_text(t.c.budget_ids))),
                sa.exists(sa.select(w.c.project_id)), budget_sql.holds(t.c.reserved_micros))
         .values(**budget_sql.settle_values(t.c.reserved_micros, cost, now)).returning(*budgets.c).cte("b"))
    h = (sa.update(event_heads)
         .where(H.project_id == t.c.project_id, sa.exists(sa.select(w.c.project_id)))
         .values(seq=H.seq + _p("others", sa.BigInteger) + sa.select(sa.func.count()).select_from(b).scalar_subquery())
         .returning(H.seq, H.hash).cte("h"))
    return (sa.select(t.c.reserved_micros.label("held"), *_wallet_columns(w),
                      sa.select(l_.c.memo).scalar_subquery().label("memo"), h.c.seq.label("head_seq"),
                      h.c.hash.label("head_hash"), *_budget_columns(b))
            .select_from(_ONE.outerjoin(t, sa.true()).outerjoin(w, sa.true()).outerjoin(h, sa.true())
                         .outerjoin(b, sa.true()))
            .order_by(b.c.id))


_RESERVE = _Compiled(_reserve_statement())
_CLOSES: dict[tuple[str, ...], _Compiled] = {
    statuses: _Compiled(_close_statement(statuses)) for statuses in (("executing",), ("executing", "approved"))}
_SET_ALERTED = _Compiled(budget_sql.set_alerted_stmt(_p("id", sa.String), _p("alerted", budgets.c.alerted.type)))
_MORE_EVENTS = _Compiled(events_sql.advance_head_stmt(_p("project", sa.String), _p("n", sa.BigInteger)))

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
def _arrays(name: str, **columns: Any) -> Any:
    """``unnest($a, $b, …) AS name(a, b, …)``: rows passed as one array parameter per column."""
    return (sa.func.unnest(*(_p(c, sa.ARRAY(t)) for c, t in columns.items()))
            .table_valued(*columns).render_derived(name=name))


def _count(cte: Any) -> Any:
    return sa.select(sa.func.count()).select_from(cte).scalar_subquery()


def _express_wallet(amount_change: dict[str, Any], *where: Any) -> Any:
    """The wallet, iff it holds exactly what this process last wrote (old_balance, old_reserved)."""
    return (sa.update(wallets).where(W.project_id == _p("project", sa.String),
                                     W.balance_micros == _p("old_balance", sa.BigInteger),
                                     W.reserved_micros == _p("old_reserved", sa.BigInteger), *where)
            .values(**amount_change).returning(W.project_id).cte("w"))


def _express_budgets() -> Any:
    """Each budget as this process last wrote it (b_ids, b_spent, b_reserved, b_updated, b_alerted) and its
    alerted list after the operation (b_new_alerted)."""
    return _arrays("x", b_ids=sa.String, b_spent=sa.BigInteger, b_reserved=sa.BigInteger, b_updated=_TS,
                   b_alerted=sa.Text, b_new_alerted=sa.Text)


def _budget_matches(x: Any) -> list[Any]:
    return [B.id == x.c.b_ids, B.spent_micros == x.c.b_spent, B.reserved_micros == x.c.b_reserved,
            B.updated_at == x.c.b_updated, B.alerted == sa.cast(x.c.b_alerted, JSONB)]


def _express_events(b: Any) -> tuple[Any, Any]:
    """The event head, iff it is still (old_seq, old_hash) and every expected budget moved, set to (new_seq,
    new_hash); the events (e_* arrays) inserted iff it was."""
    project, actor = _p("project", sa.String), _p("actor", sa.String)
    h = (sa.update(event_heads)
         .where(H.project_id == project, H.seq == _p("old_seq", sa.BigInteger), H.hash == _p("old_hash", sa.String),
                _count(b) == sa.func.cardinality(_p("b_ids", sa.ARRAY(sa.String))))
         .values(seq=_p("new_seq", sa.BigInteger), hash=_p("new_hash", sa.String)).returning(H.project_id).cte("h"))
    ev = _arrays("ev", e_id=sa.String, e_seq=sa.BigInteger, e_type=sa.String, e_data=JSONB, e_ts=sa.String,
                 e_prev=sa.String, e_hash=sa.String)
    e = (sa.insert(events_table).from_select(
        ["id", "project_id", "seq", "type", "actor", "data", "ts", "prev_hash", "hash"],
        sa.select(ev.c.e_id, project, ev.c.e_seq, ev.c.e_type, actor, ev.c.e_data, ev.c.e_ts, ev.c.e_prev,
                  ev.c.e_hash)
        .where(sa.exists(sa.select(h.c.project_id)))).cte("e"))
    return h, e


def _undo_unless(*conditions: Any) -> Any:
    """The express statement's result: 1, or a division by zero — undoing every CTE — if any condition fails."""
    return (sa.literal(1, sa.Integer) // sa.cast(sa.and_(*conditions), sa.Integer)).label("ok")


def _express_reserve_statement() -> sa.Select[Any]:
    """The reservation in one statement (parameters: project, actor, amount, now, agent, old_*, new_*, b_*, e_*,
    r_<column>)."""
    project, amount, now, agent = _p("project", sa.String), _p("amount", sa.BigInteger), _p("now", _TS), \
        _p("agent", sa.String)
    key = _p("key", sa.String)
    w = _express_wallet({"reserved_micros": W.reserved_micros + amount, "updated_at": now}, wallet_sql.has_room(amount))
    x = _express_budgets()
    b = (sa.update(budgets)
         .where(*_budget_matches(x), B.active.is_(True), sa.exists(sa.select(w.c.project_id)),
                budget_sql.has_room(amount))
         .values(reserved_micros=B.reserved_micros + amount, updated_at=now).returning(B.id).cte("b"))
    h, e = _express_events(b)
    r = sa.insert(spend_requests).values({
        **{c: _p("r_" + c, spend_requests.c[c].type) for c in _REQUEST_COLUMNS},
        "budget_ids": sa.func.to_jsonb(_p("b_ids", sa.ARRAY(sa.String)))}).cte("r")
    applicable = sa.select(sa.func.count()).select_from(budgets).where(budget_sql.applies(project, agent, key))
    return sa.select(_undo_unless(_count(h) == 1, _count(w) == 1, applicable.scalar_subquery() == sa.func.cardinality(
        _p("b_ids", sa.ARRAY(sa.String))))).add_cte(e, r)


def _express_close_statement(from_statuses: tuple[str, ...]) -> sa.Select[Any]:
    """The closing in one statement (parameters: project, actor, id, held, cost, now, status, tokens, response,
    error, settled_at, entry, memo, old_*, new_*, b_*, e_*)."""
    project, cost, now, held = _p("project", sa.String), _p("cost", sa.BigInteger), _p("now", _TS), \
        _p("held", sa.BigInteger)
    request_id = _p("id", sa.String)
    t = spend_sql.transition_stmt(
        request_id, from_statuses, status=_p("status", sa.String), cost_micros=cost,
        input_tokens=_p("input_tokens", sa.Integer), output_tokens=_p("output_tokens", sa.Integer),
        response=_p("response", spend_requests.c.response.type), error=_p("error", spend_requests.c.error.type),
        settled_at=_p("settled_at", _TS), reservation_expires_at=None,
        returning=(spend_requests.c.id,)).where(spend_requests.c.reserved_micros == held).cte("t")
    w = _express_wallet(wallet_sql.capture_values(held, cost, now), wallet_sql.holds(held),
                        sa.exists(sa.select(t.c.id)))
    entry = sa.select(_p("entry", sa.String), project, sa.literal("spend"), -cost,
                      _p("old_balance", sa.BigInteger) - cost, request_id, _p("memo", sa.String),
                      _p("actor", sa.String), now).where(cost > 0)
    l_ = sa.insert(ledger_entries).from_select(
        ["id", "project_id", "kind", "amount_micros", "balance_after_micros", "ref", "memo", "actor", "created_at"],
        entry).cte("l")
    x = _express_budgets()
    b = (sa.update(budgets)
         .where(*_budget_matches(x), budget_sql.holds(held), sa.exists(sa.select(w.c.project_id)))
         .values(**budget_sql.settle_values(held, cost, now), alerted=sa.cast(x.c.b_new_alerted, JSONB))
         .returning(B.id).cte("b"))
    h, e = _express_events(b)
    return sa.select(_undo_unless(_count(h) == 1, _count(t) == 1, _count(w) == 1)).add_cte(l_, e)


_EXPRESS_RESERVE = _Compiled(_express_reserve_statement())
_EXPRESS_CLOSES: dict[tuple[str, ...], _Compiled] = {statuses: _Compiled(_express_close_statement(statuses))
                   for statuses in (("executing",), ("executing", "approved"))}


# ---------------------------------------------------------------- event data (every hot path's)
def reserve_events(row: SpendRequest, wallet: Wallet, budgets: list[Budget], before: list[PendingEvent],
                   after: list[PendingEvent]) -> list[PendingEvent]:
    """A reservation's events, in the generic path's order: ``before``, the hold, each budget's, ``after``."""
    amount = row.reserved_micros
    money = [PendingEvent(row.project_id, "wallet.updated", wallet_updated(wallet, "hold", amount, row.id))]
    money += [PendingEvent(row.project_id, "budget.updated", budget_updated(b, "reserved", amount=amount, ref=row.id))
              for b in budgets]
    return [*before, *money, *after]


def ledger_entry(request: Prepared, cost: int, wallet: Wallet, entry_id: str, actor: str,
                 now: datetime) -> LedgerEntry | None:
    """The spend entry a closing books (none when nothing is charged)."""
    if not cost:
        return None
    return LedgerEntry(id=entry_id, project_id=request.project_id, kind="spend", amount_micros=-cost,
                       balance_after_micros=wallet.balance_micros, ref=request.request_id,
                       memo=request.model[:500], actor=actor, created_at=now)


def close_events(request: Prepared, cost: int, entry: LedgerEntry | None, wallet: Wallet, budgets: list[Budget],
                 crossed: list[list[int]], after: list[PendingEvent]) -> list[PendingEvent]:
    """A closing's events: the capture, each budget as settled (before its crossed thresholds are recorded,
    as the generic path shows it) and its thresholds, then ``after``."""
    held = request.reserved_micros
    project_id = request.project_id
    out = [PendingEvent(project_id, "wallet.updated", wallet_updated(
        wallet, "spend", -cost, request.request_id, entry=entry, released_micros=held - cost))]
    for budget, reached in zip(budgets, crossed, strict=True):
        out.append(PendingEvent(project_id, "budget.updated", budget_updated(
            budget, "settled", amount=cost, released_micros=held - cost, ref=request.request_id)))
        out += [PendingEvent(project_id, "budget.threshold", threshold_reached(budget, t)) for t in reached]
    return [*out, *after]


def alerted(budgets: list[Budget], crossed: list[list[int]]) -> list[Budget]:
    """The budgets as stored once the thresholds just crossed are recorded as alerted."""
    return [msgspec.structs.replace(b, alerted=sorted({*b.alerted, *c})) if c else b
            for b, c in zip(budgets, crossed, strict=True)]


def _event_arguments(chained: list[Event], head: tuple[int, str]) -> dict[str, Any]:
    """An express statement's events, the head they move to, the head they expect."""
    return {"e_id": [e.id for e in chained], "e_seq": [e.seq for e in chained], "e_type": [e.type for e in chained],
            "e_data": [e.data for e in chained], "e_ts": [e.ts for e in chained],
            "e_prev": [e.prev_hash for e in chained], "e_hash": [e.hash for e in chained],
            "new_seq": chained[-1].seq, "new_hash": chained[-1].hash, "old_seq": head[0], "old_hash": head[1]}


def _budget_arguments(expected: list[Budget], new_alerted: list[list[int]]) -> dict[str, Any]:
    """Each budget as this process last wrote it, and its alerted list after this operation."""
    return {"b_ids": [b.id for b in expected], "b_spent": [b.spent_micros for b in expected],
            "b_reserved": [b.reserved_micros for b in expected], "b_updated": [b.updated_at for b in expected],
            "b_alerted": [_json(b.alerted) for b in expected], "b_new_alerted": [_json(a) for a in new_alerted]}


def _json(value: object) -> str:  # lists as jsonb array elements go as text (asyncpg reads a list as a dimension)
    return msgspec.json.encode(value).decode()


def _wallet(row: asyncpg.Record) -> Wallet:
    return Wallet(project_id=row["w_project_id"], balance_micros=row["w_balance_micros"],
                  reserved_micros=row["w_reserved_micros"],
                  available_micros=row["w_balance_micros"] - row["w_reserved_micros"],
                  deposit_address=row["w_deposit_address"], updated_at=row["w_updated_at"])


def _budgets(rows: Sequence[asyncpg.Record]) -> list[Budget]:
    return [Budget(**{c: r["b_" + c] for c in _BUDGET_COLUMNS}) for r in rows if r["b_id"] is not None]


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

    Group commit (``storage.batch.GroupCommit``): operations that arrive while a transaction is in flight
    wait and then run together — ordered by project, so every batch takes row locks in one global order —
    in ONE transaction with ONE event append (``PG_APPEND_MANY``) and one commit. Under load a hot project's wallet and
    event-head rows are then locked once per batch instead of once per request, and the commits'
    fsyncs are shared. If any operation of a batch declines or fails, the batch rolls back and each of
    its operations runs again alone, so one request's trouble is never another's.

    Express lane: when nothing is in flight and this process knows the project's rows exactly (it wrote
    them last), an operation is one autocommit statement (``_EXPRESS_RESERVE`` / ``_EXPRESS_CLOSE``)."""

    def __init__(self, db: Database, publish: Callable[[list[Event]], Awaitable[None]], *, workers: int = 2,
                 max_batch: int = 64, max_projects: int = 10_000) -> None:
        self.db = db
        self.publish = publish
        self.max_projects = max_projects
        # How often each happened: reserve, close, declined, error; batches committed; batches split after a
        # failure; express (one-statement) operations, and stale ones (the rows had moved: the normal path ran).
        self.outcomes: Counter[str] = Counter()
        self.engine: GroupCommit[_Op] = GroupCommit(
            self._commit, publish, expected=(Declined, asyncpg.PostgresError, asyncpg.InterfaceError, OSError),
            workers=workers, max_batch=max_batch, outcomes=self.outcomes)
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
        request_args = {"r_" + c: v for c, v in zip(_REQUEST_COLUMNS, args, strict=True)}

        def events(wallet: Wallet, budgets: list[Budget]) -> list[PendingEvent]:
            return reserve_events(row, wallet, budgets, before, after)

        async def work(conn: asyncpg.Connection) -> _Done:
            rows = await conn.fetch(_RESERVE.sql, *_RESERVE.args(
                project=row.project_id, amount=amount, now=now, agent=row.agent_id, key=row.key_id, day=starts[0],
                week=starts[1], month=starts[2], others=len(before) + 1 + len(after), **request_args))
            first = rows[0]
            if first["w_project_id"] is None:
                raise Declined("the wallet has no room")
            budgets = _budgets(rows)
            if len(budgets) != first["applicable"]:
                raise Declined("a budget has no room, or must roll into a new period")
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
            return _Express(_EXPRESS_RESERVE.sql, _EXPRESS_RESERVE.args(
                project=row.project_id, actor=actor, amount=amount, now=now, agent=row.agent_id, key=row.key_id,
                old_balance=old.balance_micros, old_reserved=old.reserved_micros,
                **_event_arguments(chained, state.head), **_budget_arguments(budgets, [b.alerted for b in budgets]),
                **request_args),
                chained, _After(wallet, moved, (row.agent_id, row.key_id), ids))

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
            return close_events(request, cost, ledger_entry(request, cost, wallet, entry_id, actor, now), wallet,
                                budgets, crossed, after)

        async def work(conn: asyncpg.Connection) -> _Done:
            close = _CLOSES.get(from_statuses) or _Compiled(_close_statement(from_statuses))
            rows = await conn.fetch(close.sql, *close.args(
                id=request.request_id, status=values.status, cost=cost, input_tokens=values.input_tokens,
                output_tokens=values.output_tokens, response=values.response, error=values.error,
                settled_at=values.settled_at, now=now, entry=entry_id, actor=actor, others=1 + len(after)))
            first = rows[0]
            if first["held"] != held or first["w_project_id"] is None:
                raise Declined("the request is not in the expected state")
            budgets = _budgets(rows)
            crossed = [crossed_thresholds(b) for b in budgets]
            stored = alerted(budgets, crossed)
            for budget, reached in zip(stored, crossed, strict=True):
                if reached:  # rare: once per threshold per period
                    await conn.execute(_SET_ALERTED.sql, *_SET_ALERTED.args(id=budget.id, alerted=budget.alerted))
            head_seq = first["head_seq"]
            if alerts := sum(len(c) for c in crossed):
                more = _MORE_EVENTS.args(project=project_id, n=alerts)
                head_seq = (await conn.fetchrow(_MORE_EVENTS.sql, *more))["seq"]
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
            stored = alerted(moved, crossed)
            chained = link(events(wallet, moved, crossed), project_id, actor, *state.head)
            statement = _EXPRESS_CLOSES.get(from_statuses) or _Compiled(_express_close_statement(from_statuses))
            return _Express(statement.sql, statement.args(
                project=project_id, actor=actor, id=request.request_id, held=held, cost=cost, now=now,
                status=values.status, input_tokens=values.input_tokens, output_tokens=values.output_tokens,
                response=values.response, error=values.error, settled_at=values.settled_at, entry=entry_id, memo=memo,
                old_balance=old.balance_micros, old_reserved=old.reserved_micros,
                **_event_arguments(chained, state.head), **_budget_arguments(budgets, [b.alerted for b in stored])),
                chained, _After(wallet, stored))

        return await self._submit("close", project_id, request.request_id, work, express)

    # ------------------------------------------------------------ lanes
    async def _submit(self, kind: str, project_id: str, ref: str,
                      work: Callable[[asyncpg.Connection], Awaitable[_Done]],
                      express: Callable[[_State], _Express | None]) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # Room to run at once, and nothing at all in flight: the express lane if this process knows the
        # project's rows; else a batch of one, or the next group commit (storage/batch.py).
        return await self.engine.submit(_Op(kind, project_id, ref, work, express, future), self._try_express)

    async def _try_express(self, op: _Op) -> bool:
        state = self._state.get(op.project_id)
        plan = op.express(state) if state is not None else None
        return plan is not None and await self._express(op, plan)

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
            resolve(op.future, True)
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

    async def _commit(self, ops: list[_Op]) -> list[Event]:
        """Run ``ops`` in one transaction (the engine publishes the events it returns, and splits a batch
        that raised)."""
        async with self.db.raw() as conn, conn.transaction():
            done = [await op.work(conn) for op in ops]
            events, lasts = self._chain(ops, done)
            await conn.execute(PG_APPEND_MANY, *append_arguments(events))
        for op, result, last in zip(ops, done, lasts, strict=True):
            self.outcomes[op.kind] += 1
            self._remember(op.project_id, result.after, last)
        return events

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


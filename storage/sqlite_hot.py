"""The spend hot path on SQLite (``domain.spend.HotPath``): a request's reservation and its closing
(settle or fail) as ONE hand-over to the SQLite writer's thread each, group-committed.

What ``make run`` gives a newcomer is SQLite. Through the generic path (SQLAlchemy async on aiosqlite)
a request's two money transactions are ~15 statements, each a hand-over to aiosqlite's thread and an
event-loop wake-up, under the process's write lock — most of a request's CPU (bench/README.md). Here:

- each operation is a synchronous function of plain SQLAlchemy statements, run on the writer's own
  connection in its thread (``storage.db.SqliteWriter``): the SAME statements the generic
  repositories send (``storage.budgets.select_applicable`` / ``reserve_stmt`` / ``settle_stmt``,
  ``storage.wallet.HOLD`` / ``CAPTURE``, ``storage.spend.transition_stmt``, the event log's
  ``advance_head_stmt`` …), so wallet room, budget room and applicability are stated once;
- operations that arrive while one is being written share the next ``BEGIN IMMEDIATE`` … ``COMMIT``
  (``storage.batch.GroupCommit``, one writer): one hand-over, one commit, one append per project;
- the events are the generic path's, built by the same functions as on PostgreSQL
  (``storage.hot.reserve_events`` / ``close_events``).

Anything unusual changes nothing and returns False, and the service runs its generic path, which
knows every case and builds the exact error: no room, a budget whose period ended (it must roll
first), a budget deactivated meanwhile, a wallet not created yet, a request no longer in the expected
status, a database error (``busy`` after ``busy_timeout``, for one). SQLite has one writer, so the
conditional UPDATEs here never interleave with another writer's: no wallet or budget can go over.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from itertools import groupby

import msgspec
import sqlalchemy as sa

from domain.base import new_id
from domain.budgets import Budget, crossed_thresholds, needs_roll
from domain.events import Event, PendingEvent
from domain.spend import CloseValues, Prepared, SpendRequest
from storage import budgets as budget_sql
from storage.batch import Declined, GroupCommit
from storage.db import SqliteWriter
from storage.events import INSERT_EVENTS, advance_head_stmt, event_rows, link, set_head_hash_stmt
from storage.hot import alerted, close_events, ledger_entry, reserve_events
from storage.spend import SpendRequests, transition_stmt
from storage.wallet import CAPTURE, HOLD, Ledger, capture_params, hold_params, to_wallet

# One operation's work on the writer's connection: its events and their actor.
Work = Callable[[sa.Connection], tuple[list[PendingEvent], str]]


class _Job:
    __slots__ = ("future", "project_id", "ref", "work")

    def __init__(self, project_id: str, ref: str, work: Work) -> None:
        self.project_id = project_id
        self.ref = ref
        self.work = work
        self.future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()


class SqliteHotPath:
    """``domain.spend.HotPath`` for SQLite. ``publish`` gets the committed events (the bus)."""

    def __init__(self, writer: SqliteWriter, publish: Callable[[list[Event]], Awaitable[None]], *,
                 max_batch: int = 64) -> None:
        self.writer = writer
        # reserve, close (committed); declined, error; batches committed; batches split after a failure.
        self.outcomes: Counter[str] = Counter()
        self.engine: GroupCommit[_Job] = GroupCommit(
            self._commit, publish, expected=(Declined, sa.exc.DBAPIError), workers=1, max_batch=max_batch,
            outcomes=self.outcomes)

    async def reserve(self, row: SpendRequest, actor: str, before: list[PendingEvent], after: list[PendingEvent],
                      now: datetime) -> bool:
        amount = row.reserved_micros

        def work(conn: sa.Connection) -> tuple[list[PendingEvent], str]:
            # The generic path's order (domain.spend.prepare._reserve): applicable budgets, the request row,
            # the wallet, the budgets by id; the events last.
            applicable = [budget_sql.Budgets.to_entity(r)
                          for r in conn.execute(budget_sql.select_applicable(row.project_id, row.agent_id, row.key_id))]
            if any(needs_roll(b.period, b.period_start, now) for b in applicable):
                raise Declined("a budget must roll into a new period")
            row.budget_ids = [b.id for b in applicable]
            conn.execute(SpendRequests.insert_stmt(), SpendRequests.row_values(row))
            held = conn.execute(HOLD, hold_params(row.project_id, amount, now)).first()
            if held is None:
                raise Declined("the wallet has no room")
            reserved: list[Budget] = []
            for budget in applicable:
                moved = conn.execute(budget_sql.reserve_stmt(budget.id, amount, now)).first()
                if moved is None:
                    raise Declined("a budget has no room")
                reserved.append(budget_sql.Budgets.to_entity(moved))
            return reserve_events(row, to_wallet(held), reserved, before, after), actor

        return await self._submit("reserve", row.project_id, row.id, work)

    async def close(self, request: Prepared, from_statuses: tuple[str, ...], values: CloseValues, actor: str,
                    after: list[PendingEvent], now: datetime) -> bool:
        cost = values.cost_micros
        held = request.reserved_micros

        def work(conn: sa.Connection) -> tuple[list[PendingEvent], str]:
            # The generic path's order (domain.spend.close._close): the request, the wallet, the budgets by id.
            row = conn.execute(transition_stmt(request.request_id, from_statuses, reservation_expires_at=None,
                                               **msgspec.structs.asdict(values))).first()
            if row is None or row.reserved_micros != held:
                raise Declined("the request is not in the expected state")
            captured = conn.execute(CAPTURE, capture_params(request.project_id, held, cost, now)).first()
            if captured is None:
                raise Declined("the wallet holds less than the reservation")
            wallet = to_wallet(captured)
            entry = ledger_entry(request, cost, wallet, new_id("led"), actor, now)
            if entry is not None:
                conn.execute(Ledger.insert_stmt(), Ledger.row_values(entry))
            settled: list[Budget] = []
            for budget_id in sorted(row.budget_ids):
                moved = conn.execute(budget_sql.settle_stmt(budget_id, held, cost, now)).first()
                if moved is None:
                    raise Declined("a budget holds less than the reservation")
                settled.append(budget_sql.Budgets.to_entity(moved))
            crossed = [crossed_thresholds(b) for b in settled]
            for budget, reached in zip(alerted(settled, crossed), crossed, strict=True):
                if reached:  # rare: once per threshold per period
                    conn.execute(budget_sql.set_alerted_stmt(budget.id, budget.alerted))
            return close_events(request, cost, entry, wallet, settled, crossed, after), actor

        return await self._submit("close", request.project_id, request.request_id, work)

    async def _submit(self, kind: str, project_id: str, ref: str, work: Work) -> bool:
        if await self.engine.submit(_Job(project_id, ref, work)):
            self.outcomes[kind] += 1
            return True
        return False

    async def _commit(self, jobs: list[_Job]) -> list[Event]:
        return await self.writer.run(functools.partial(_transaction, jobs))


def _transaction(jobs: list[_Job], conn: sa.Connection) -> list[Event]:
    """Every job's money statements, then each project's events appended once (the jobs come ordered by
    project): its head advanced by all of them, each job's events chained after the one before."""
    done = [(job.project_id, *job.work(conn)) for job in jobs]
    chained: list[Event] = []
    for project_id, group in groupby(done, key=lambda d: d[0]):
        parts = [(pending, actor) for _, pending, actor in group]
        n = sum(len(pending) for pending, _ in parts)
        head = conn.execute(advance_head_stmt(project_id, n)).first()
        if head is None:
            raise Declined("the project has no event log")
        seq, prev = head.seq - n, head.hash
        for pending, actor in parts:
            linked = link(pending, project_id, actor, seq, prev)
            seq, prev = linked[-1].seq, linked[-1].hash
            chained += linked
        conn.execute(set_head_hash_stmt(project_id, prev))
    conn.execute(INSERT_EVENTS, event_rows(chained))
    return chained

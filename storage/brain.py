"""The brain's read-only view of a project.

Every session the view reads through is read-only in the database itself, so even a bug in
``agentic/`` cannot write: the database refuses. On PostgreSQL the per-request prefetch (project, key,
agent, wallet, budgets) is one hand-written statement on a raw asyncpg connection from
``Database.raw(read_only=True)`` (sessions with ``default_transaction_read_only``; a single statement
is its own snapshot, so no BEGIN / COMMIT round trips); the SQLAlchemy ``Database.read_only()``
transaction (``BEGIN … READ ONLY`` / SQLite ``PRAGMA query_only``) is opened only when the pipeline
needs something the prefetch and the cache do not answer (a cache miss, another id). On SQLite the
prefetch is the same statement on a synchronous ``PRAGMA query_only`` connection, in one hand-over to
its thread (``Database.sqlite_reader()``).
``decide_for`` is what the spend service calls: open the view, run the pipeline, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import policies as pol
from domain.catalog import CatalogModel
from domain.decisions import (
    Activity,
    AgentState,
    BrainView,
    BudgetState,
    Decision,
    KeyState,
    ProjectState,
    SpendInput,
    WalletState,
)
from domain.events import Event
from domain.ports import EventBus
from domain.ratelimit import RateLimit, RateLimiter
from storage.catalog import CatalogModels
from storage.db import Database
from storage.models import agents, api_keys, budgets, projects, spend_requests, wallets
from storage.policies import Policies
from storage.policies import Row as PolicyRow

BASELINE_DAYS = 30
OPEN_STATUSES = ("pending_approval", "approved", "executing")
DecideFn = Callable[[BrainView, SpendInput, datetime], Awaitable[Decision]]
CACHE_TTL_SECONDS = 2.0  # the longest a policy / catalog entry / activity figure is served without re-reading


class BrainCache:
    """Per-process cache of the brain's read-mostly inputs: policies (project + system), catalog
    candidates, and each project's activity aggregate.

    Entries live at most ``ttl`` seconds, and ``policy.updated`` / ``catalog.updated`` events from the
    bus (every process hears them with the Redis bus) drop them at once; a lost bus connection
    (resync) drops everything. A read that started before an invalidation is not stored (generation
    check), so a change can never be hidden behind a stale value for longer than the read itself.
    Concurrent misses of one key share a single read. Money is never cached: wallets and budgets are
    read fresh and reserved with conditional UPDATEs."""

    def __init__(self, ttl: float = CACHE_TTL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[tuple[str, Any], tuple[float, Any]] = {}
        self._inflight: dict[tuple[str, Any], asyncio.Future] = {}
        self._generation = 0

    async def get(self, kind: str, key: Any, fetch: Callable[[], Awaitable[Any]], *,
                  keep: Callable[[Any], bool] = lambda _: True) -> Any:
        slot = (kind, key)
        hit = self._entries.get(slot)
        if hit is not None and hit[0] > self.clock():
            return hit[1]
        pending = self._inflight.get(slot)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except _Miss:
                pass  # the shared read failed or was cancelled: read ourselves
        generation = self._generation
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[slot] = future
        try:
            value = await fetch()
        except BaseException:
            future.set_exception(_Miss())
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            if self._inflight.get(slot) is future:
                del self._inflight[slot]
        if not future.done():
            future.set_result(value)
        if generation == self._generation and keep(value):
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[slot] = (self.clock() + self.ttl, value)
        return value

    def drop(self, kind: str | None = None) -> None:
        self._generation += 1
        self._inflight.clear()
        if kind is None:
            self._entries.clear()
        else:
            for slot in [s for s in self._entries if s[0] == kind]:
                del self._entries[slot]

    async def on_event(self, event: Event) -> None:
        if event.type == "policy.updated":
            self.drop("policy")
        elif event.type.startswith("catalog."):  # created, updated, retired
            self.drop("catalog")

    async def on_resync(self) -> None:  # events may have been missed: trust nothing cached
        self.drop()


class _Miss(Exception):
    """A shared cache read did not produce a value."""


def _prefetch_statement() -> sa.Select:
    """Built once (the hot path only binds parameters): project, key, agent, wallet, active budgets."""
    k, a, wl, bu = api_keys.alias("k"), agents.alias("a"), wallets.alias("w"), budgets.alias("b")
    agent_id = sa.func.coalesce(sa.bindparam("agent_id", type_=sa.String), k.c.agent_id)
    return (
        sa.select(projects.c.status.label("p_status"), k.c.id.label("k_id"), k.c.project_id.label("k_project"),
                  k.c.agent_id.label("k_agent"), k.c.revoked_at.label("k_revoked"),
                  k.c.expires_at.label("k_expires"), k.c.allowed_models.label("k_models"),
                  k.c.rate_limits.label("k_limits"), a.c.id.label("a_id"),
                  a.c.project_id.label("a_project"), a.c.status.label("a_status"),
                  wl.c.balance_micros.label("w_balance"), wl.c.reserved_micros.label("w_reserved"),
                  bu.c.id.label("b_id"), bu.c.name.label("b_name"), bu.c.agent_id.label("b_agent"),
                  bu.c.period.label("b_period"), bu.c.limit_micros.label("b_limit"),
                  bu.c.spent_micros.label("b_spent"), bu.c.reserved_micros.label("b_reserved"),
                  bu.c.period_start.label("b_start"), bu.c.key_id.label("b_key"))
        .select_from(projects
                     .outerjoin(k, k.c.id == sa.bindparam("key_id", type_=sa.String))
                     .outerjoin(a, a.c.id == agent_id)
                     .outerjoin(wl, wl.c.project_id == projects.c.id)
                     .outerjoin(bu, sa.and_(bu.c.project_id == projects.c.id, bu.c.active.is_(True))))
        .where(projects.c.id == sa.bindparam("project_id", type_=sa.String)).order_by(bu.c.id))


_PREFETCH = _prefetch_statement()

# The same statement compiled once for a raw asyncpg connection ($n parameters, in _PREFETCH_ORDER).
_PREFETCH_PG = _PREFETCH.compile(dialect=asyncpg_dialect.dialect())
_PREFETCH_SQL, _PREFETCH_ORDER = _PREFETCH_PG.string, tuple(_PREFETCH_PG.positiontup or ())


def _key_state(id_: str, project_id: str, agent_id: str | None, revoked_at: datetime | None,
               expires_at: datetime | None, allowed_models: list[str] | None, rate_limits: dict | None) -> KeyState:
    return KeyState(id=id_, project_id=project_id, agent_id=agent_id, revoked=revoked_at is not None,
                    expires_at=expires_at.astimezone(UTC) if expires_at is not None else None,
                    allowed_models=allowed_models, rate_limits=rate_limits or {})


class SqlBrainView:
    """Over an open read-only connection (``SqlBrainView(conn, …)``), or over a database
    (``SqlBrainView(db, …)``, what ``brain_view`` does): then ``db.read_only()`` is opened on first use
    and closed with the view (``async with view`` / ``aclose()``), and on PostgreSQL ``prefetch`` reads
    through ``db.raw(read_only=True)``."""

    def __init__(self, source: AsyncConnection | Database, limiter: RateLimiter, default_output_tokens: int = 1024,
                 cache: BrainCache | None = None) -> None:
        if isinstance(source, Database):
            self.db: Database | None = source
            self.conn: AsyncConnection | None = None  # opened by connection() on first use
        else:
            self.db, self.conn = None, source
        self.limiter = limiter
        self.default_output_tokens = default_output_tokens
        self.cache = cache
        self._snap: dict[str, Any] | None = None  # what prefetch() read
        self._stack = contextlib.AsyncExitStack()
        self._opening = asyncio.Lock()

    async def connection(self) -> AsyncConnection:
        """The SQLAlchemy read-only connection, opened on first call when the view was given a database."""
        if self.conn is None:
            async with self._opening:
                if self.conn is None:
                    if self.db is None:
                        raise RuntimeError("the brain's view is closed")
                    self.conn = await self._stack.enter_async_context(self.db.read_only())
        return self.conn

    def raw(self) -> Any:
        """``async with view.raw() as conn``: a read-only asyncpg connection (PostgreSQL, database-backed views)."""
        if self.db is None or self.db.is_sqlite:
            raise RuntimeError("raw connections exist for a database-backed view on PostgreSQL only")
        return self.db.raw(read_only=True)

    async def __aenter__(self) -> SqlBrainView:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._close(*exc)

    async def aclose(self) -> None:
        await self._close(None, None, None)

    async def _close(self, *exc: Any) -> None:
        """Close what the view opened (the transaction commits, or rolls back on an exception)."""
        if self.db is None:
            return  # the caller's connection: the caller closes it
        self.db, self.conn = None, None
        await self._stack.__aexit__(*exc)

    async def prefetch(self, req: SpendInput) -> None:
        """Read the request's project, key, agent (the one named, else the key's), wallet and active
        budgets in ONE statement; the getters below answer from it (and query only for other ids)."""
        rows: Sequence[Mapping[Any, Any]]  # asyncpg Records or SQLAlchemy RowMappings
        params = {"project_id": req.project_id, "key_id": req.key_id, "agent_id": req.agent_id}
        reader = self.db.sqlite_reader() if self.db is not None and self.conn is None else None
        if self.db is not None and not self.db.is_sqlite:
            async with self.raw() as raw:  # no transaction: one statement is its own snapshot
                rows = await raw.fetch(_PREFETCH_SQL, *(params[name] for name in _PREFETCH_ORDER))
        elif reader is not None:  # SQLite: the same statement in one hand-over to a query_only connection
            rows = await reader.run(lambda conn: conn.execute(_PREFETCH, params).mappings().all())
        else:
            conn = await self.connection()
            rows = (await conn.execute(_PREFETCH, params)).mappings().all()
        snap: dict[str, Any] = {"project_id": req.project_id, "key_id": req.key_id, "agent_id": None}
        if rows:
            r = rows[0]
            snap["project"] = ProjectState(id=req.project_id, status=r["p_status"])
            if r["k_id"] is not None:
                snap["key"] = _key_state(r["k_id"], r["k_project"], r["k_agent"], r["k_revoked"], r["k_expires"],
                                         r["k_models"], r["k_limits"])
            snap["agent_id"] = req.agent_id or r["k_agent"]
            if r["a_id"] is not None:
                snap["agent"] = AgentState(id=r["a_id"], project_id=r["a_project"], status=r["a_status"])
            if r["w_balance"] is not None:
                snap["wallet"] = WalletState(balance_micros=r["w_balance"], reserved_micros=r["w_reserved"])
            snap["budgets"] = [  # period_start: aware UTC on both paths (asyncpg: aware, maybe another zone)
                BudgetState(id=r["b_id"], name=r["b_name"], agent_id=r["b_agent"], period=r["b_period"],
                            limit_micros=r["b_limit"], spent_micros=r["b_spent"], reserved_micros=r["b_reserved"],
                            period_start=r["b_start"].astimezone(UTC), key_id=r["b_key"])
                for r in rows if r["b_id"] is not None]
        self._snap = snap

    def _from_snapshot(self, what: str, **ids: str | None) -> tuple[bool, Any]:
        snap = self._snap
        if snap is None or any(snap.get(k) != v for k, v in ids.items()):
            return False, None
        return True, snap.get(what)

    async def project(self, project_id: str) -> ProjectState | None:
        hit, value = self._from_snapshot("project", project_id=project_id)
        if hit:
            return value
        row = (await (await self.connection()).execute(
            sa.select(projects.c.id, projects.c.status).where(projects.c.id == project_id))).first()
        return ProjectState(id=row.id, status=row.status) if row else None

    async def key(self, key_id: str) -> KeyState | None:
        hit, value = self._from_snapshot("key", key_id=key_id)
        if hit:
            return value
        c = api_keys.c
        row = (await (await self.connection()).execute(
            sa.select(c.id, c.project_id, c.agent_id, c.revoked_at, c.expires_at, c.allowed_models, c.rate_limits)
            .where(c.id == key_id))).first()
        return _key_state(*row) if row else None

    async def agent(self, agent_id: str) -> AgentState | None:
        hit, value = self._from_snapshot("agent", agent_id=agent_id)
        if hit:
            return value
        row = (await (await self.connection()).execute(
            sa.select(agents.c.id, agents.c.project_id, agents.c.status).where(agents.c.id == agent_id))).first()
        return AgentState(id=row.id, project_id=row.project_id, status=row.status) if row else None

    async def models(self, model: str) -> list[CatalogModel]:
        if self.cache is None:
            return await self._candidates(model)
        found = await self.cache.get("catalog", model, lambda: self._candidates(model), keep=bool)
        return list(found)

    async def _candidates(self, model: str) -> list[CatalogModel]:
        return await CatalogModels(await self.connection()).candidates(model)

    async def _policy(self, project_id: str) -> PolicyRow | None:
        return await Policies(await self.connection()).current(project_id)

    async def _system_policy(self) -> pol.SystemPolicy:
        found = await self._policy(pol.SYSTEM_POLICY_ID)
        return pol.load(found[0], pol.SystemPolicy) if found else pol.SystemPolicy()

    async def _project_policy(self, project_id: str) -> tuple[pol.ProjectPolicy, int]:
        found = await self._policy(project_id)
        return (pol.load(found[0]), found[1]) if found else (pol.ProjectPolicy(), 0)

    async def system_policy(self) -> pol.SystemPolicy:
        if self.cache is None:
            return await self._system_policy()
        return await self.cache.get("policy", pol.SYSTEM_POLICY_ID, self._system_policy)

    async def project_policy(self, project_id: str) -> tuple[pol.ProjectPolicy, int]:
        if self.cache is None:
            return await self._project_policy(project_id)
        return await self.cache.get("policy", project_id, lambda: self._project_policy(project_id))

    async def wallet(self, project_id: str) -> WalletState | None:
        hit, value = self._from_snapshot("wallet", project_id=project_id)
        if hit:
            return value
        row = (await (await self.connection()).execute(
            sa.select(wallets.c.balance_micros, wallets.c.reserved_micros)
            .where(wallets.c.project_id == project_id))).first()
        return WalletState(balance_micros=row.balance_micros, reserved_micros=row.reserved_micros) if row else None

    async def budgets(self, project_id: str) -> list[BudgetState]:
        hit, value = self._from_snapshot("budgets", project_id=project_id)
        if hit and value is not None:
            return list(value)
        c = budgets.c
        rows = (await (await self.connection()).execute(
            sa.select(c.id, c.name, c.agent_id, c.period, c.limit_micros, c.spent_micros, c.reserved_micros,
                      c.period_start, c.key_id)
            .where(c.project_id == project_id, c.active.is_(True)).order_by(c.id))).all()
        return [BudgetState(**r._mapping) for r in rows]

    async def rate_counts(self, limits: list[RateLimit], now: datetime) -> list[int]:
        return await self.limiter.peek(limits, now)

    async def activity(self, project_id: str, now: datetime) -> Activity:
        """The baseline and today's counters; with a cache, reused for ``ttl`` seconds (per project and
        ``ttl``-second slot of ``now``, so a slot never spans two UTC days)."""
        if self.cache is None:
            return await self._activity(project_id, now)
        slot = int(now.timestamp() // self.cache.ttl) if self.cache.ttl > 0 else now
        return await self.cache.get("activity", (project_id, slot), lambda: self._activity(project_id, now))

    async def _activity(self, project_id: str, now: datetime) -> Activity:
        conn = await self.connection()
        c = spend_requests.c
        since = now - timedelta(days=BASELINE_DAYS)
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        settled = c.status == "settled"
        in_baseline = sa.and_(settled, c.created_at >= since, c.created_at < now)
        today = c.created_at >= day_start
        totals = (await conn.execute(
            sa.select(
                sa.func.count().filter(in_baseline).label("samples"),
                sa.func.coalesce(sa.func.sum(c.cost_micros).filter(in_baseline), 0).label("cost"),
                sa.func.count().filter(today).label("today"),
                sa.func.coalesce(sa.func.sum(sa.case(
                    (settled, sa.func.coalesce(c.cost_micros, 0)),
                    (c.status.in_(OPEN_STATUSES), c.reserved_micros), else_=0)).filter(today), 0).label("spent"),
                sa.func.count().filter(sa.and_(c.status == "rejected",
                                               c.created_at >= now - timedelta(days=1))).label("rejections"),
            ).where(c.project_id == project_id, c.created_at >= since))).one()
        samples = int(totals.samples)
        activity = Activity(samples=samples, avg_cost_micros=int(totals.cost) // samples if samples else 0,
                            avg_requests_per_day=samples / BASELINE_DAYS, requests_today=int(totals.today),
                            spent_today_micros=int(totals.spent), recent_rejections=int(totals.rejections))
        if samples:
            hour = sa.extract("hour", c.created_at)
            groups = (await conn.execute(
                sa.select(c.provider, c.model, c.agent_id, hour.label("hour"))
                .where(c.project_id == project_id, in_baseline)
                .group_by(c.provider, c.model, c.agent_id, hour))).all()
            activity.providers = sorted({g.provider for g in groups})
            activity.models = sorted({g.model for g in groups})
            activity.agents = sorted({g.agent_id for g in groups if g.agent_id})
            activity.hours = sorted({int(g.hour) for g in groups})
        return activity


@contextlib.asynccontextmanager
async def brain_view(db: Database, limiter: RateLimiter, default_output_tokens: int = 1024,
                     cache: BrainCache | None = None) -> AsyncIterator[SqlBrainView]:
    """A view over ``db``: its read-only connection is opened on first use and closed on exit."""
    async with SqlBrainView(db, limiter, default_output_tokens, cache) as view:
        yield view


async def decide_for(db: Database, limiter: RateLimiter, req: SpendInput, now: datetime, *, decide: DecideFn,
                     default_output_tokens: int = 1024, cache: BrainCache | None = None) -> Decision:
    """Open a read-only view and run the brain (``agentic.pipeline.decide``) on one spend request."""
    async with brain_view(db, limiter, default_output_tokens, cache) as view:
        if req.project_id:
            await view.prefetch(req)
        return await decide(view, req, now)


class SqlBrain:
    """The ``domain.decisions.Brain`` port: the container builds one (``container.brain``,
    ``deps.brain``) with ``agentic.pipeline.decide`` injected — storage does not import agentic."""

    def __init__(self, db: Database, limiter: RateLimiter, decide: DecideFn, default_output_tokens: int = 1024):
        self.db = db
        self.limiter = limiter
        self._decide = decide
        self.default_output_tokens = default_output_tokens
        self.cache = BrainCache()

    def listen(self, bus: EventBus) -> None:
        """Hear policy / catalog changes (and bus resyncs) so cached entries drop at once."""
        bus.listen(self.cache.on_event)
        bus.on_resync(self.cache.on_resync)

    async def decide(self, req: SpendInput, now: datetime) -> Decision:
        return await decide_for(self.db, self.limiter, req, now, decide=self._decide,
                                default_output_tokens=self.default_output_tokens, cache=self.cache)

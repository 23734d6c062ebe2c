"""Insights: their rows (the domain's repository) and the brain's read model of a project's activity.

The read model answers in a handful of aggregate statements whatever the traffic: every figure over
the requests of the baseline window is a ``count`` / ``sum … FILTER (WHERE …)`` in ONE pass over the
``(project_id, created_at)`` index range, grouped by model (a few rows back, not the requests), and
the short windows (burn buckets, rejections) are range scans of the same index. bench/insights.py
measures it against a plain ``count(*)`` over a project with a million requests.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import Page, PageRequest, new_id
from domain.budgets import Budget
from domain.catalog import CatalogModel
from domain.insights import (
    BUCKET_SECONDS,
    BURN_BUCKETS,
    RECENT_MODEL_HOURS,
    BudgetFigures,
    Insight,
    KeyUse,
    ModelUsage,
    ProjectActivity,
    Rejections,
    Thresholds,
)
from storage.base import Repository
from storage.db import Database
from storage.models import (
    api_keys,
    budgets,
    catalog_models,
    insight_runs,
    insights,
    platform_ledger,
    projects,
    spend_requests,
    wallets,
)

i = insights.c
s = spend_requests.c
LOCK_CLASS = 0x1_15_16  # pg_try_advisory_xact_lock(class, project): the insight evaluator's lock space


def _insert(conn: AsyncConnection, table: sa.Table) -> Any:
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


def project_lock_key(project_id: str) -> int:
    """A stable signed 32-bit key per project (the same in every process)."""
    value = zlib.crc32(project_id.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


class InsightRows(Repository[Insight]):
    table = insights
    entity = Insight

    async def active(self, project_id: str) -> list[tuple[Insight, str]]:
        rows = await self.conn.execute(sa.select(insights).where(i.project_id == project_id, i.resolved_at.is_(None)))
        return [(self.to_entity(r), r.subject_key) for r in rows]

    async def insert(self, insight: Insight, subject_key: str) -> bool:  # type: ignore[override]
        """Into the kind-and-subject slot, or nothing if it is taken (the partial unique index)."""
        values = {f: getattr(insight, f) for f in self._fields()}
        stmt = _insert(self.conn, insights).values(**values, subject_key=subject_key).on_conflict_do_nothing()
        result = await self.conn.execute(stmt.returning(i.id))
        return result.first() is not None

    async def list(self, project_id: str, page: PageRequest, status: str | None, kind: str | None) -> Page[Insight]:
        where = [i.project_id == project_id]
        if status is not None:
            where.append(i.status == status)
        if kind is not None:
            where.append(i.kind == kind)
        return await self.paginate(page, *where)

    async def try_lock(self, project_id: str) -> bool:
        """PostgreSQL: this transaction alone evaluates the project (released at commit). SQLite: the
        single writer (BEGIN IMMEDIATE) already is that lock."""
        if self.conn.dialect.name != "postgresql":
            return True
        got = await self.conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(
            sa.literal(LOCK_CLASS, sa.Integer), sa.literal(project_lock_key(project_id), sa.Integer))))
        return bool(got.scalar_one())

    async def last_evaluated(self, project_id: str) -> datetime | None:
        return (await self.conn.execute(sa.select(insight_runs.c.evaluated_at).where(
            insight_runs.c.project_id == project_id))).scalar_one_or_none()

    async def mark_evaluated(self, project_id: str, at: datetime) -> None:
        stmt = _insert(self.conn, insight_runs).values(project_id=project_id, evaluated_at=at)
        await self.conn.execute(stmt.on_conflict_do_update(index_elements=["project_id"],
                                                           set_={"evaluated_at": at}))

    async def absorb(self, project_id: str, amount_micros: int, ref: str, memo: str, actor: str,
                     now: datetime) -> str:
        entry_id = new_id("pld")
        await self.conn.execute(sa.insert(platform_ledger).values(
            id=entry_id, kind="overrun_absorbed", amount_micros=amount_micros, project_id=project_id, ref=ref,
            memo=memo, actor=actor, created_at=now))
        return entry_id


async def open_insights(conn: AsyncConnection, project_id: str, limit: int = 100) -> list[Insight]:
    """The project's insights that are open or acknowledged, newest first (the chat assistant reads these)."""
    rows = InsightRows(conn)
    result = await conn.execute(sa.select(insights).where(
        i.project_id == project_id, i.status.in_(("open", "acknowledged"))).order_by(i.id.desc()).limit(limit))
    return [rows.to_entity(r) for r in result]


async def due_projects(conn: AsyncConnection, cutoff: datetime, limit: int) -> list[str]:
    """Projects last evaluated before ``cutoff``, the longest-waiting first."""
    r = insight_runs.c
    rows = await conn.execute(sa.select(r.project_id).where(r.evaluated_at < cutoff)
                              .order_by(r.evaluated_at).limit(limit))
    return [row[0] for row in rows]


# ---------------------------------------------------------------- the read model
def _sum(column: Any, *where: Any) -> Any:
    value = sa.func.sum(column).filter(sa.and_(*where)) if where else sa.func.sum(column)
    return sa.func.coalesce(value, 0)


def _count(*where: Any) -> Any:
    return sa.func.count().filter(sa.and_(*where))


class History(msgspec.Struct, kw_only=True):
    """The per-model figures of a project's requests older than a day: the bulk of the 30-day window,
    which changes slowly. ``activity`` adds the requests from ``until`` on, read fresh each time, so a
    cached history (SqlInsightView keeps one for HISTORY_TTL) shifts the baseline by minutes, not less."""

    until: datetime
    models: list[ModelUsage]


HISTORY_TTL = timedelta(minutes=5)


async def _model_rows(conn: AsyncConnection, project_id: str, since: datetime, until: datetime, now: datetime,
                      th: Thresholds, *, inclusive: bool = True) -> list[ModelUsage]:
    """Per-model figures of the requests created in [since, until] (``inclusive``) or [since, until), split
    into the windows of ``now`` by FILTER clauses: one pass over the (project_id, created_at) index range."""
    hour_ago = now - timedelta(hours=1)
    day_ago = now - timedelta(hours=RECENT_MODEL_HOURS)
    week_ago = now - timedelta(days=th.cheaper_window_days)
    cost = sa.func.coalesce(s.cost_micros, 0)
    charged = cost > 0
    end = s.created_at <= until if inclusive else s.created_at < until
    rows = await conn.execute(
        sa.select(s.model, s.provider, s.operation, sa.func.min(s.created_at),
                  _count(s.created_at < hour_ago), _sum(cost, s.created_at < hour_ago),
                  _count(s.created_at >= hour_ago), _sum(cost, s.created_at >= hour_ago),
                  _count(s.created_at < day_ago), _count(s.created_at >= day_ago), _sum(cost, s.created_at >= day_ago),
                  _sum(sa.func.coalesce(s.input_tokens, 0), s.created_at >= week_ago, charged),
                  _sum(sa.func.coalesce(s.output_tokens, 0), s.created_at >= week_ago, charged),
                  _sum(cost, s.created_at >= week_ago))
        .where(s.project_id == project_id, s.created_at >= since, end).group_by(s.model, s.provider, s.operation))
    return [ModelUsage(model=r[0], provider=r[1], operation=r[2], first_at=_aware(r[3]), base_requests=r[4],
                       base_cost_micros=int(r[5]), hour_requests=r[6], hour_cost_micros=int(r[7]),
                       before_recent_requests=r[8], recent_requests=r[9], recent_cost_micros=int(r[10]),
                       week_input_tokens=int(r[11]), week_output_tokens=int(r[12]), week_cost_micros=int(r[13]))
            for r in rows]


async def model_history(conn: AsyncConnection, project_id: str, now: datetime, th: Thresholds) -> History:
    until = now - timedelta(hours=RECENT_MODEL_HOURS)
    start = now - timedelta(days=th.baseline_days)
    return History(until=until, models=await _model_rows(conn, project_id, start, until, now, th, inclusive=False))


_SUMMED = [f for f in ModelUsage.__struct_fields__ if f not in ("model", "provider", "operation", "first_at")]


def _merge(*parts: list[ModelUsage]) -> list[ModelUsage]:
    merged: dict[tuple[str, str, str], ModelUsage] = {}
    for part in parts:
        for m in part:
            key = (m.model, m.provider, m.operation)
            have = merged.get(key)
            if have is None:
                merged[key] = msgspec.structs.replace(m)
                continue
            have.first_at = min(have.first_at, m.first_at)
            for f in _SUMMED:
                setattr(have, f, getattr(have, f) + getattr(m, f))
    return sorted(merged.values(), key=lambda m: (m.model, m.provider, m.operation))


async def activity(conn: AsyncConnection, project_id: str, now: datetime, th: Thresholds,
                   history: History | None = None) -> ProjectActivity:
    """A project's activity at ``now`` in a few aggregate statements, whatever its number of requests.
    ``history``: the per-model figures older than a day, if the caller holds a recent one."""
    hour_ago = now - timedelta(hours=1)
    cost = sa.func.coalesce(s.cost_micros, 0)

    head = (await conn.execute(
        sa.select(projects.c.status, wallets.c.balance_micros, wallets.c.reserved_micros)
        .select_from(projects.outerjoin(wallets, wallets.c.project_id == projects.c.id))
        .where(projects.c.id == project_id))).first()

    budget_rows = await conn.execute(sa.select(budgets).where(budgets.c.project_id == project_id,
                                                             budgets.c.active.is_(True)).order_by(budgets.c.id))
    figures = []
    for row in budget_rows:
        budget = Budget(**{k: row._mapping[k] for k in Budget.__struct_fields__ if k in row._mapping}).as_rolled(now)
        figures.append(BudgetFigures(id=budget.id, name=budget.name, agent_id=budget.agent_id, period=budget.period,
                                     limit_micros=budget.limit_micros, spent_micros=budget.spent_micros,
                                     reserved_micros=budget.reserved_micros, period_end=budget.period_end))

    charged = cost > 0
    if history is None or history.until > now:
        history = await model_history(conn, project_id, now, th)
    models = _merge(history.models, await _model_rows(conn, project_id, history.until, now, now, th))

    edges = [hour_ago + timedelta(seconds=BUCKET_SECONDS * n) for n in range(BURN_BUCKETS + 1)]
    edges[-1] = now + timedelta(microseconds=1)
    burn_rows = await conn.execute(
        sa.select(s.agent_id, *[_sum(cost, s.created_at >= edges[n], s.created_at < edges[n + 1])
                                for n in range(BURN_BUCKETS)])
        .where(s.project_id == project_id, s.created_at >= hour_ago, s.created_at <= now, charged)
        .group_by(s.agent_id))
    burn = {(r[0] or ""): [int(v) for v in r[1:]] for r in burn_rows}

    code = s.error["code"].as_string()
    rejection_rows = await conn.execute(
        sa.select(s.agent_id, s.key_id, code, sa.func.count(), sa.func.max(s.error["message"].as_string()))
        .where(s.project_id == project_id, s.created_at >= now - timedelta(seconds=th.rejection_window_seconds),
               s.created_at <= now, s.status == "rejected")
        .group_by(s.agent_id, s.key_id, code))
    rejections = [Rejections(agent_id=r[0], key_id=r[1], count=r[3], top_reason=r[2] or "rejected",
                             top_message=(r[4] or "")[:200]) for r in rejection_rows]

    k = api_keys.c
    idle_before = now - timedelta(days=th.idle_key_days)
    key_rows = await conn.execute(
        sa.select(k.id, k.name, k.prefix, k.created_at, k.last_used_at)
        .where(k.project_id == project_id, k.revoked_at.is_(None),
               sa.func.coalesce(k.last_used_at, k.created_at) < idle_before).order_by(k.id).limit(100))
    idle = [KeyUse(key_id=r[0], name=r[1], prefix=r[2], created_at=r[3], last_used_at=r[4]) for r in key_rows]

    providers = sorted({m.provider for m in models if m.week_cost_micros > 0})
    catalog: list[CatalogModel] = []
    if providers:
        c = catalog_models.c
        rows = await conn.execute(sa.select(catalog_models).where(c.provider.in_(providers), c.active.is_(True)))
        catalog = [CatalogModel(**{f: r._mapping[f] for f in CatalogModel.__struct_fields__}) for r in rows]

    return ProjectActivity(
        project_id=project_id, now=now, active=head is not None and head.status != "deleted",
        available_micros=(head.balance_micros or 0) - (head.reserved_micros or 0) if head is not None else 0,
        budgets=figures, burn=burn, models=models, rejections=rejections, idle_keys=idle, catalog=catalog,
        found=head is not None)


def _aware(value: datetime) -> datetime:
    """``min(created_at)``: a string on SQLite when no column type applies, naive or aware elsewhere."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SqlInsightView:
    """The evaluator's read-only view: each call opens ``db.read_only()`` (the database refuses writes)."""

    def __init__(self, db: Database, thresholds: Thresholds, history_ttl: timedelta = HISTORY_TTL) -> None:
        self.db = db
        self.thresholds = thresholds
        self.history_ttl = history_ttl
        self._history: dict[str, History] = {}  # per project; read again once older than history_ttl

    async def activity(self, project_id: str, now: datetime) -> ProjectActivity:
        history = self._history.get(project_id)
        if history is not None and not (timedelta(0) <= now - history.until - timedelta(hours=RECENT_MODEL_HOURS)
                                        < self.history_ttl):
            history = None  # too old (or from a later clock than this evaluation's)
        async with self.db.read_only() as conn:
            if history is None:
                history = await model_history(conn, project_id, now, self.thresholds)
                if len(self._history) > 10_000:
                    self._history.clear()
                self._history[project_id] = history
            return await activity(conn, project_id, now, self.thresholds, history)

    async def due(self, cutoff: datetime, limit: int) -> list[str]:
        async with self.db.read_only() as conn:
            return await due_projects(conn, cutoff, limit)

    async def open_insights(self, project_id: str) -> list[Insight]:
        async with self.db.read_only() as conn:
            return await open_insights(conn, project_id)

"""The container: built once at start-up, wires implementations into the domain (constructor
injection), and hands out units of work.

``uow(actor)`` is the only place a transaction commits: the block runs, the events it raised are
appended to the log in the same transaction, it commits, then after-commit callbacks run and the
events are published on the bus. On an exception everything is rolled back and nothing is published.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from agentic import insights as brain_insights
from agentic.pipeline import decide
from domain.base import SYSTEM, Actor
from domain.errors import Unauthorized
from domain.events import Event
from domain.insights import InsightRunner, Thresholds
from domain.ports import EventBus
from domain.scope import Deps, Scope
from domain.spend import Spending
from domain.wallet import open_wallet
from server.alerts import WebhookAlerts
from server.providers import Providers
from server.security import Passwords, Tokens
from server.settings import Settings
from storage.brain import SqlBrain
from storage.db import Database
from storage.hot import PgHotPath
from storage.insights import SqlInsightView
from storage.ratelimit import build_limiter
from storage.uow import SqlStore

log = logging.getLogger("smartspace.container")


class Container:
    def __init__(self, settings: Settings, db: Database, bus: EventBus, **extra: Any) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.tokens = Tokens(settings.resolved_jwt_secret, settings.access_token_ttl_seconds)
        self.providers = extra.pop("providers", None) or Providers(settings)
        # Rate limits: per process, or shared through Redis when configured. The brain peeks, spending acquires.
        self.limiter = extra.pop("limiter", None) or build_limiter(settings.redis_url)
        self.brain = SqlBrain(db, self.limiter, decide, settings.default_output_tokens)
        self.brain.listen(bus)  # cached policies / catalog entries drop on policy.updated / catalog.updated
        extra.setdefault("limiter", self.limiter)
        extra.setdefault("brain", self.brain)
        self.deps = Deps(passwords=Passwords(), tokens=self.tokens, settings=settings, providers=self.providers,
                         **extra)
        self.admin_emails = frozenset(e.lower() for e in settings.admin_emails)
        # Spend control: every new project gets a wallet; the spend service (decide → reserve → settle).
        self.deps.project_created_hooks.append(open_wallet)
        self.spending = Spending(
            uow=self.uow, reader=self.reader, brain=self.brain, providers=self.providers, limiter=self.limiter,
            reservation_ttl_seconds=settings.reservation_ttl_seconds,
            approval_ttl_seconds=settings.approval_ttl_seconds,
            provider_timeout_seconds=settings.provider_timeout_seconds,
            default_output_tokens=settings.default_output_tokens,
            hot=None if db.is_sqlite or not settings.hot_path else PgHotPath(db, bus.publish))
        self.deps.spending = self.spending
        metrics = extra.get("metrics")
        if metrics is not None and isinstance(self.spending.hot, PgHotPath):
            metrics.watch_hot_path(self.spending.hot.outcomes)
        self._wire_insights(settings)

    def _wire_insights(self, settings: Settings) -> None:
        """Insights (issue 11): the read-only view, the runner (after events, on a schedule), alerts."""
        self.insight_thresholds = insight_thresholds(settings)
        self.insight_view = SqlInsightView(self.db, self.insight_thresholds)
        self.alerts = WebhookAlerts(settings.alert_webhook_url, settings.alert_webhook_secret) \
            if settings.alert_webhook_url else None
        self.deps.alerts = self.alerts
        self.insights = InsightRunner(
            uow=self.uow, read=self.insight_view.activity, evaluate=brain_insights.evaluate,
            thresholds=self.insight_thresholds, due=self.insight_view.due,
            debounce_seconds=settings.insight_debounce_seconds, schedule_seconds=settings.insight_schedule_seconds,
            update_seconds=settings.insight_update_seconds, lock_first=not self.db.is_sqlite)
        if settings.insight_evaluator:
            self.bus.listen(self.insights.on_event)

    @contextlib.asynccontextmanager
    async def uow(self, actor: Actor = SYSTEM) -> AsyncIterator[Scope]:
        async with self.db.write() as conn:
            scope = Scope(SqlStore(conn), self.deps, actor)
            yield scope
            published: list[Event] = []
            if scope.pending:
                published = await scope.store.events.append(scope.pending, scope.actor.label)
        # Committed: now the world may see it.
        for callback in scope.after_commit:
            try:
                await callback()
            except Exception:
                log.exception("after-commit callback failed")
        if published:
            await self.bus.publish(published)

    @contextlib.asynccontextmanager
    async def reader(self, actor: Actor = SYSTEM) -> AsyncIterator[Scope]:
        """A read-only unit of work (GET handlers): no lock, nothing appended."""
        async with self.db.read() as conn:
            yield Scope(SqlStore(conn), self.deps, actor)

    def user_actor(self, user_id: str, email: str) -> Actor:
        return Actor(kind="user", id=user_id, user_id=user_id, email=email,
                     platform_admin=email.lower() in self.admin_emails)

    async def authenticate(self, token: str) -> Actor:
        """An access token (JWT) or a project API key → the acting principal."""
        if token.startswith("sk-"):
            async with self.uow() as scope:
                key = await scope.keys.authenticate(token)
            return Actor(kind="key", id=key.key_id, project_id=key.project_id, agent_id=key.agent_id)
        user_id = self.tokens.verify(token)
        async with self.reader() as scope:
            user = await scope.store.users.get(user_id)
        if user is None:
            raise Unauthorized("the user of this token no longer exists")
        return self.user_actor(user.id, user.email)


def insight_thresholds(settings: Settings) -> Thresholds:
    return Thresholds(
        runway_hours=settings.insight_runway_hours, spike_ratio=settings.insight_spike_ratio,
        spike_min_requests=settings.insight_spike_min_requests, baseline_days=settings.insight_baseline_days,
        rejection_count=settings.insight_rejection_count,
        rejection_window_seconds=settings.insight_rejection_window_seconds,
        idle_key_days=settings.insight_idle_key_days, cheaper_window_days=settings.insight_cheaper_window_days,
        cheaper_min_saving_micros=settings.insight_cheaper_min_saving_micros,
        cheaper_min_saving_ratio=settings.insight_cheaper_min_saving_ratio)

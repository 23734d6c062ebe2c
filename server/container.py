"""The container: built once at start-up, wires implementations into the domain (constructor
injection), and hands out units of work.

``uow(actor)`` is the only place a transaction commits: the block runs, the events it raised are
appended to the log in the same transaction, it commits, then after-commit callbacks run and the
events are published on the bus. On an exception everything is rolled back and nothing is published.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from agentic import insights as brain_insights
from agentic.assistant import Assistant
from agentic.pipeline import decide
from domain.base import SYSTEM, Actor
from domain.chat import ChatService, call_model
from domain.errors import Unauthorized
from domain.events import Event
from domain.insights import InsightRunner, Thresholds
from domain.ports import EventBus
from domain.ratelimit import RateLimiter
from domain.scope import Deps, Scope
from domain.spend import Spending
from domain.wallet import open_wallet
from server.alerts import WebhookAlerts
from server.chain.workers import ChainRuntime
from server.metrics import Metrics
from server.providers import Providers
from server.security import Passwords, Tokens
from server.settings import Settings
from storage.assistant import chat_view
from storage.brain import SqlBrain
from storage.db import Database
from storage.hot import PgHotPath
from storage.insights import SqlInsightView
from storage.ratelimit import build_limiter
from storage.sqlite_hot import SqliteHotPath
from storage.uow import SqlStore

log = logging.getLogger("smartspace.container")


class Container:
    """Every long-lived part of one server process, wired explicitly (each field typed); built once."""

    def __init__(self, settings: Settings, db: Database, bus: EventBus, *, metrics: Metrics | None = None,
                 providers: Providers | None = None, limiter: RateLimiter | None = None) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.metrics: Metrics = metrics or Metrics()
        self.tokens = Tokens(settings.resolved_jwt_secret, settings.access_token_ttl_seconds)
        self.providers: Providers = providers or Providers(settings)
        # Rate limits: per process, or shared through Redis when configured. The brain peeks, spending acquires.
        self.limiter: RateLimiter = limiter or build_limiter(settings.redis_url, self.metrics)
        self.brain = SqlBrain(db, self.limiter, decide, settings.default_output_tokens)
        self.brain.listen(bus)  # cached policies / catalog entries drop on policy.updated / catalog.updated
        # The chain opens lazily (server/chain/workers.py); the domain sees it through the runtime.
        self.chain_runtime = ChainRuntime(self, start_worker=settings.chain_worker)
        self.deps = Deps(passwords=Passwords(), tokens=self.tokens, confirmations=settings.confirmations,
                         chain=self.chain_runtime)
        self.admin_emails = frozenset(e.lower() for e in settings.admin_emails)
        # Spend control: every new project gets a wallet; the spend service (decide → reserve → execute → settle).
        self.deps.project_created_hooks.append(open_wallet)
        hot: PgHotPath | SqliteHotPath | None = None
        if settings.hot_path:
            writer = db.sqlite_writer()  # SQLite (a file): one writer thread; PostgreSQL: raw asyncpg
            hot = (SqliteHotPath(writer, bus.publish) if writer is not None
                   else None if db.is_sqlite else PgHotPath(db, bus.publish))
        self.spending = Spending(
            uow=self.uow, reader=self.reader, brain=self.brain, providers=self.providers, limiter=self.limiter,
            reservation_ttl_seconds=settings.reservation_ttl_seconds,
            approval_ttl_seconds=settings.approval_ttl_seconds, hot=hot, fee_bps=settings.platform_fee_bps)
        if hot is not None:
            self.metrics.watch_hot_path(hot.outcomes)
        # The chat assistant: read tools over the brain's read-only sessions; its model calls (LLM mode)
        # through the spend service above, like any agent's.
        model = settings.assistant_model or None
        self.chat = ChatService(uow=self.uow, reader=self.reader, history_messages=settings.assistant_history_messages,
                                responder=Assistant(lambda: chat_view(db), model=model, call_model=functools.partial(
                                    call_model, self.spending, model) if model else None))
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

    async def authenticate(self, token: str, *, count_use: bool = True, scope: Scope | None = None) -> Actor:
        """An access token (JWT) or a project API key → the acting principal. ``count_use=False``: reads only, no
        write transaction (a key's use is not counted), e.g. for a socket; ``scope``: read in that unit of work."""
        if token.startswith("sk-"):
            count_use = count_use and scope is None
            async with contextlib.AsyncExitStack() as stack:
                if scope is None:
                    scope = await stack.enter_async_context(self.uow() if count_use else self.reader())
                key = await scope.keys.authenticate(token, count_use=count_use)
            return Actor(kind="key", id=key.key_id, project_id=key.project_id, agent_id=key.agent_id,
                         scopes=key.scopes, expires_at=key.expires_at)
        user_id = self.tokens.verify(token)
        async with contextlib.AsyncExitStack() as stack:
            if scope is None:
                scope = await stack.enter_async_context(self.reader())
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

"""The application factory: settings → container → middleware → routes → Socket.IO.

Long-lived clients (engine, Redis, HTTP session, chain) are created in ``cleanup_ctx`` and closed
there. ``create_app`` does no I/O itself; everything that connects happens at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

import server.api  # noqa: F401 - registers the REST routes
from channels.chat import attach as attach_chat
from channels.hub import attach as attach_hub
from domain.errors import DomainError
from server import idempotency, keep_recursion_limit
from server.chain.workers import chain_context
from server.container import Container
from server.cors import enable_cors
from server.http import CONTAINER, routes
from server.metrics import METRICS, Metrics
from server.middleware import (
    access_middleware,
    auth_middleware,
    error_middleware,
    input_middleware,
    request_id_middleware,
)
from server.providers import configured_models
from server.settings import Settings, SettingsError
from storage.bus import LocalBus, RedisBus, channel_for, deployment_id
from storage.catalog import seed_catalog
from storage.db import Database

log = logging.getLogger("smartspace.app")
SETTINGS = web.AppKey("settings", Settings)


def build_container(settings: Settings, metrics: Metrics, *, db: Database | None = None) -> Container:
    db = db or Database(settings.resolved_database_url, pool_size=settings.database_pool_size)
    bus = (RedisBus(settings.redis_url, metrics, channel_for(settings.redis_channel_prefix),
                    deployment=deployment_id(db.url.database or "", settings.resolved_jwt_secret))
           if settings.redis_url else LocalBus(metrics))
    return Container(settings, db, bus, metrics=metrics)


def create_app(settings: Settings, *, container: Container | None = None,
               migrate: Callable[[Database], Awaitable[None]] | None = None) -> web.Application:
    keep_recursion_limit()  # the imports above brought in py_ecc (web3), which raised it
    container = container or build_container(settings, Metrics())
    metrics = container.metrics
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[SETTINGS] = settings
    app[CONTAINER] = container
    app[METRICS] = metrics
    app.middlewares.extend([
        request_id_middleware,
        access_middleware(metrics, settings.access_log),
        error_middleware,
        input_middleware,
        auth_middleware(container),
    ])
    routes.install(app)
    idempotency.install(app)  # streamed answers are recorded for Idempotency-Key replays
    own = getattr(container.bus, "listen_own", None)  # the spend series count what this process committed
    if own is not None:
        own(metrics.spend.on_event)
    enable_cors(app, settings.cors_origins)  # the route table's resources, before Socket.IO attaches

    async def declare_models(container: Container) -> None:
        declared = configured_models(container.providers.upstreams)
        if not declared:
            return
        for attempt in range(3):  # another process starting at once may insert the same rows first
            try:
                async with container.uow() as scope:
                    changed = await scope.catalog.declare(declared, source="SMARTSPACE_UPSTREAMS")
                break
            except DomainError as exc:  # e.g. an alias that already names another model
                raise SettingsError(f"SMARTSPACE_UPSTREAMS is invalid: {exc.message}") from None
            except Exception:
                if attempt == 2:
                    raise
        if changed:
            log.info("catalog models declared in configuration", extra={"models": changed})

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if migrate is not None:
            await migrate(container.db)
        await container.bus.start()
        await seed_catalog(container.db)  # missing catalog ids only; admin edits win
        await declare_models(container)  # the models SMARTSPACE_UPSTREAMS declares: added or brought in line
        log.info("smartspace started", extra={"database": container.db.dialect,
                                              "bus": type(container.bus).__name__})
        yield
        await container.providers.close()
        await container.limiter.close()
        await container.bus.close()
        await container.db.dispose()

    app.cleanup_ctx.append(lifecycle)

    async def sweeper(app: web.Application) -> AsyncIterator[None]:
        async with container.spending.sweeper(settings.sweep_interval_seconds):  # stale reservations
            yield

    app.cleanup_ctx.append(sweeper)
    app.cleanup_ctx.append(chain_context(container, start_worker=settings.chain_worker))  # payments (issue 5)

    async def insights(app: web.Application) -> AsyncIterator[None]:  # issue 11: the evaluator's schedule, alerts
        if container.alerts is not None:
            await container.alerts.start()
        if settings.insight_evaluator:
            container.insights.start()
        yield
        await container.insights.close()
        if container.alerts is not None:
            await container.alerts.close()

    app.cleanup_ctx.append(insights)
    hub = attach_hub(app, container, metrics)
    attach_chat(app, hub, container.chat)  # /chat: the assistant's message and cancel
    app.on_startup.append(after_start)  # runs after every cleanup_ctx started, the devnet's too
    return app


async def after_start(app: web.Application) -> None:
    keep_recursion_limit()  # the devnet's first start imports py-evm, which raises it again

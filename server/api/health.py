"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from server.http import container, json_response, routes
from server.metrics import METRICS


@routes.get("/health", summary="Liveness: the process answers", tag="health", auth=False)
async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/ready", summary="Readiness: the database (and Redis, when configured) answer", tag="health",
            auth=False, errors=(503,))
async def ready(request: web.Request) -> web.Response:
    c = container(request)
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(c.db.ping(), 5)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    ping = getattr(c.bus, "ping", None)
    if ping is not None:
        try:
            await asyncio.wait_for(ping(), 5)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return json_response({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


@routes.get("/metrics", summary="Prometheus metrics", tag="health", auth=False)
async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

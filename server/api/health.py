"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from server.http import container, json_response, routes
from server.metrics import METRICS


@routes.get("/health", summary="Liveness: the process answers", tag="health", auth=False)
async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/ready", summary="Readiness: 503 if the database does not answer; 200 `degraded` while Redis does not "
            "(spending goes on)", tag="health", auth=False, errors=(503,))
async def ready(request: web.Request) -> web.Response:
    c = container(request)
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(c.db.ping(), 5)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    # Redis only fans events out and shares rate-limit counts: without it this process still serves and
    # spends safely, so a Redis fault makes it "degraded", not unready.
    pings = [p for p in (getattr(c.bus, "ping", None), getattr(c.limiter, "ping", None)) if p is not None]
    if pings:
        checks["redis"] = "ok"
        try:
            for ping in pings:
                await asyncio.wait_for(ping(), 5)
        except Exception as exc:
            checks["redis"] = f"degraded: {type(exc).__name__}"
        else:
            if getattr(c.limiter, "degraded", False):
                checks["redis"] = "degraded: rate limits counted per process"
    if checks["database"] != "ok":
        return json_response({"status": "unavailable", "checks": checks}, status=503)
    degraded = any(v != "ok" for v in checks.values())
    return json_response({"status": "degraded" if degraded else "ok", "checks": checks})


@routes.get("/metrics", summary="Prometheus metrics", tag="health", auth=False)
async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    await metrics.spend.refresh(container(request).db)  # reservations outstanding, read now
    body = metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

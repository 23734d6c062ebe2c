"""Prometheus metrics, one registry per app (so tests can run many apps in one process).

The business series (:class:`SpendSeries`) are derived from the events this process publishes on the
bus — never from the spend path itself — so summing a series over every process counts each request
once. The reservations-outstanding gauges are one aggregate read when /metrics is scraped.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from domain.events import Event

log = logging.getLogger("smartspace.metrics")
UNKNOWN = "unknown"
# Rejections whose model may be anything a caller typed (not in the catalog, malformed): one label for all.
_UNLABELLED_ERRORS = {"not_found", "invalid_request", "unauthorized", "forbidden"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("smartspace_http_requests_total", "HTTP requests",
                                     ["method", "route", "status"], registry=r)
        self.http_latency = Histogram(
            "smartspace_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.sockets = Gauge("smartspace_socket_connections", "Connected Socket.IO clients", ["namespace"],
                             registry=r)
        self.events_published = Counter("smartspace_events_published_total", "Events published on the bus",
                                        registry=r)
        self.events_replayed = Counter("smartspace_events_replayed_total", "Events replayed from the log",
                                       ["namespace"], registry=r)
        self.events_delivered = Counter("smartspace_events_delivered_total",
                                        "Events emitted to Socket.IO rooms", ["namespace"], registry=r)
        self.live_lag = Histogram(
            "smartspace_live_lag_seconds", "Live delivery lag: event commit (its ts) to its emit on this process",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.worker = Gauge("smartspace_worker", "1 for the `serve --workers` worker (index, pid) that answered",
                            ["worker", "pid"], registry=r)
        self.bus_errors = Counter("smartspace_bus_errors_total", "Event bus publish/listen failures",
                                  ["op"], registry=r)
        # Rate limits while Redis is away (storage/ratelimit.py): counted per process instead of shared.
        self.ratelimit_fallbacks = Counter("smartspace_ratelimit_fallback_total",
                                           "Rate-limit checks counted per process because Redis was unavailable",
                                           ["op"], registry=r)
        self.ratelimit_outages = Counter("smartspace_ratelimit_redis_outages_total",
                                         "Times the rate limiter lost Redis and fell back to per-process counting",
                                         registry=r)
        self.ratelimit_degraded = Gauge("smartspace_ratelimit_degraded",
                                        "1 while rate limits are counted per process (Redis unavailable), else 0",
                                        registry=r)

        self.spend = SpendSeries(r)

    def watch_hot_path(self, outcomes: Mapping[str, int]) -> None:
        """Expose storage/hot.py's counters (read at scrape time) as smartspace_hot_path_total{outcome}."""
        self.registry.register(_OutcomeCollector("smartspace_hot_path", "Spend hot path operations by outcome: "
                                                 "reserve, close, express, stale, batches, split, declined, error",
                                                 outcomes))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _OutcomeCollector:
    def __init__(self, name: str, documentation: str, outcomes: Mapping[str, int]) -> None:
        self.name = name
        self.documentation = documentation
        self.outcomes = outcomes

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["outcome"])
        for outcome, count in sorted(self.outcomes.items()):
            family.add_metric([outcome], count)
        yield family


class SpendSeries:
    """Spend, tokens, requests and call durations by provider, model and outcome, from the spend events.

    Outcomes: ``settled`` (the provider answered; charged), ``failed`` (the call failed or its reservation
    expired; whatever was consumed is charged), ``rejected`` (the brain, a budget, the wallet, a rate limit
    or an approver said no; nothing held), ``expired`` (nobody approved in time). Models are catalog ids
    (``openai/gpt-4o-mini``); a rejection for an unknown model counts as ``unknown``. Tokens and cost of a
    failed request are counted only as far as its event tells (its cost; no token counts).

    The call duration runs from the moment a request's reservation was committed and it started executing
    (or was approved) to its settlement or failure, from the events' times: the provider call plus the
    settle, not the provider's latency alone (which the events do not carry)."""

    BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
    OPEN_LIMIT = 10_000  # requests remembered between their creation and their end (oldest forgotten)

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        labels = ["provider", "model", "outcome"]
        self.requests = Counter("smartspace_spend_requests_total", "Spend requests that ended, by outcome",
                                labels, registry=r)
        self.micros = Counter("smartspace_spend_micros_total", "Micro-USDC charged for spend requests",
                              labels, registry=r)
        self.tokens = Counter("smartspace_spend_tokens_total", "Tokens of spend requests (as charged)",
                              [*labels, "direction"], registry=r)
        self.duration = Histogram("smartspace_spend_call_duration_seconds",
                                  "From execution start (reservation or approval) to settlement or failure",
                                  labels, buckets=self.BUCKETS, registry=r)
        self.outstanding = Gauge("smartspace_reservations_outstanding",
                                 "Spend requests holding a reservation, by status (deployment-wide)", ["status"],
                                 registry=r)
        self.outstanding_micros = Gauge("smartspace_reservations_outstanding_micros",
                                        "Micro-USDC reserved by open spend requests, by status (deployment-wide)",
                                        ["status"], registry=r)
        self._open: OrderedDict[str, list[Any]] = OrderedDict()  # request id → [provider, model, started]

    # ------------------------------------------------------------ the bus listener
    async def on_event(self, event: Event) -> None:
        handler = self._HANDLERS.get(event.type)
        if handler is not None:
            handler(self, event, event.data)

    def _created(self, event: Event, data: dict) -> None:
        model = str(data.get("model") or "")
        provider, _, name = model.partition("/")
        self._open[data["request_id"]] = [provider if name else UNKNOWN, model or UNKNOWN, None]
        while len(self._open) > self.OPEN_LIMIT:
            self._open.popitem(last=False)

    def _decided(self, event: Event, data: dict) -> None:
        status = data.get("status")
        if status == "executing":
            self._start(data["request_id"], event)
        elif status == "rejected":
            provider, model, _ = self._open.pop(data["request_id"], [UNKNOWN, UNKNOWN, None])
            code = (data.get("error") or {}).get("code") or data.get("error_code")
            if code in _UNLABELLED_ERRORS:
                provider = model = UNKNOWN
            self.requests.labels(provider, model, "rejected").inc()

    def _resolved(self, event: Event, data: dict) -> None:
        resolution = data.get("resolution")
        if resolution == "approved":
            self._start(data["request_id"], event)
        elif resolution in ("rejected", "expired"):
            provider, model, _ = self._open.pop(data["request_id"], [UNKNOWN, UNKNOWN, None])
            self.requests.labels(provider, model, resolution).inc()

    def _settled(self, event: Event, data: dict) -> None:
        receipt = data.get("receipt") or {}
        provider, model, started = self._open.pop(data["request_id"], [None, None, None])
        model = str(receipt.get("model") or model or UNKNOWN)
        provider = model.partition("/")[0] if "/" in model else (provider or UNKNOWN)
        self._ended(provider, model, "settled", int(receipt.get("cost_micros") or 0), started, event)
        for direction in ("input", "output"):
            self.tokens.labels(provider, model, "settled", direction).inc(int(receipt.get(f"{direction}_tokens") or 0))

    def _failed(self, event: Event, data: dict) -> None:
        provider, model, started = self._open.pop(data["request_id"], [UNKNOWN, UNKNOWN, None])
        self._ended(provider, model, "failed", int(data.get("cost_micros") or 0), started, event)

    _HANDLERS = {"request.created": _created, "request.decided": _decided, "approval.resolved": _resolved,
                 "request.settled": _settled, "request.failed": _failed}

    def _start(self, request_id: str, event: Event) -> None:
        entry = self._open.get(request_id)
        if entry is not None:
            entry[2] = _when(event)

    def _ended(self, provider: str, model: str, outcome: str, cost: int, started: datetime | None,
               event: Event) -> None:
        self.requests.labels(provider, model, outcome).inc()
        self.micros.labels(provider, model, outcome).inc(max(0, cost))
        ended = _when(event)
        if started is not None and ended is not None and ended >= started:
            self.duration.labels(provider, model, outcome).observe((ended - started).total_seconds())

    # ------------------------------------------------------------ scrape time
    async def refresh(self, db: Any) -> None:
        """Read the open reservations now (one grouped query); on a database error keep the last values."""
        from storage.ops import open_reservations

        try:
            found = await open_reservations(db)
        except Exception as exc:
            log.warning("metrics: cannot read open reservations: %s", type(exc).__name__)
            return
        for status, (count, micros) in found.items():
            self.outstanding.labels(status).set(count)
            self.outstanding_micros.labels(status).set(micros)


def _when(event: Event) -> datetime | None:
    try:
        return datetime.fromisoformat(event.ts)
    except (TypeError, ValueError):
        return None


METRICS = web.AppKey("metrics", Metrics)

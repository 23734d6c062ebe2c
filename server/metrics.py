"""Prometheus metrics, one registry per app (so tests can run many apps in one process)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily


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


METRICS = web.AppKey("metrics", Metrics)

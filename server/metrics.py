"""Prometheus metrics, one registry per app (so tests can run many apps in one process)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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
        self.bus_errors = Counter("smartspace_bus_errors_total", "Event bus publish/listen failures",
                                  ["op"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)

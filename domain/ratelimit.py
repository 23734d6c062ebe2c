"""Rate limiting as the domain sees it: sliding windows keyed by scope, a port with peek and acquire.

The brain only *peeks* (how many requests each window already holds); the spend service *acquires*
when it reserves — all windows at once, all or nothing — so the limits hold across processes when
the Redis implementation is configured (``storage/ratelimit.py``). A limiter never fails a request for
its own infrastructure: while Redis does not answer, the Redis limiter counts per process instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import msgspec

WINDOWS = {"per_minute": 60, "per_hour": 3600, "per_day": 86400}


class RateLimit(msgspec.Struct, frozen=True, kw_only=True):
    key: str  # the scope, e.g. "key:key_123", "agent:agt_1", "project:prj_1"
    window_seconds: int
    limit: int
    source: str = "project_policy"  # project_policy | system_policy | key (the key's own limits; for the reason)

    @property
    def bucket(self) -> str:
        return f"{self.key}:{self.window_seconds}"

    def describe(self) -> str:
        unit = {60: "minute", 3600: "hour", 86400: "day"}.get(self.window_seconds, f"{self.window_seconds}s")
        own = " (the key's own limit)" if self.source == "key" else ""
        return f"{self.limit} requests per {unit} for {self.key}{own}"


class RateLimiter(Protocol):
    async def peek(self, limits: Sequence[RateLimit], now: datetime) -> list[int]:
        """How many requests each window holds at ``now`` (not counting a new one)."""
        ...

    async def acquire(self, limits: Sequence[RateLimit], now: datetime) -> None:
        """Count one request in every window iff each has room; else raise ``RateLimited`` with the
        seconds until the fullest window frees a slot, and count nothing."""
        ...

    async def close(self) -> None: ...


def ts(now: datetime) -> float:
    return now.timestamp()

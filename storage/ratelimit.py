"""Rate limiters: sliding-window logs, in memory (one process) or in Redis (shared by every process).

A window holds the timestamps of the requests it counted; a request fits when every window it
belongs to holds fewer than its limit. ``acquire`` checks and counts all windows in one step — a
Lua script on Redis, so two processes can never both take the last slot.

Redis is never load-bearing for money (that lives in the database), so a Redis fault never fails a
request: the Redis limiter then counts per process (in memory), logs that once per outage, counts it
on /metrics, and probes Redis in the background until it answers again, when counting is shared
again. A pooled connection that died while Redis was away is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from domain.errors import RateLimited
from domain.ratelimit import RateLimit

log = logging.getLogger("smartspace.ratelimit")


def _retry_after(wait_seconds: float) -> int:
    return max(1, int(-(-wait_seconds // 1)))


def _refuse(limit: RateLimit, wait_seconds: float) -> RateLimited:
    return RateLimited(f"rate limit reached: {limit.describe()}", retry_after=_retry_after(wait_seconds),
                       details={"scope": limit.key, "window_seconds": limit.window_seconds, "limit": limit.limit})


class MemoryLimiter:
    """Per process. Right for one server process (the embedded default) and for tests."""

    def __init__(self) -> None:
        self._logs: dict[str, list[float]] = {}

    def _log(self, limit: RateLimit, now: float) -> list[float]:
        floor = now - limit.window_seconds
        log = self._logs.get(limit.bucket)
        if log is None:
            log = self._logs[limit.bucket] = []
        elif log and min(log) <= floor:
            log[:] = [t for t in log if t > floor]
        return log

    async def peek(self, limits: Sequence[RateLimit], now: datetime) -> list[int]:
        t = now.timestamp()
        return [len(self._log(limit, t)) for limit in limits]

    async def acquire(self, limits: Sequence[RateLimit], now: datetime) -> None:
        # No await between the check and the count: atomic within the event loop.
        t = now.timestamp()
        worst: tuple[float, RateLimit] | None = None
        for limit in limits:
            log = self._log(limit, t)
            if len(log) >= limit.limit:
                wait = max(sorted(log)[len(log) - limit.limit] + limit.window_seconds - t, 0.001)
                if worst is None or wait > worst[0]:
                    worst = (wait, limit)
        if worst is not None:
            raise _refuse(worst[1], worst[0])
        for limit in limits:
            self._log(limit, t).append(t)

    async def close(self) -> None:
        self._logs.clear()


# KEYS: one sorted set per window. ARGV: now_ms, member, then window_ms, limit per key.
# Returns 0 when counted, else the ms until the fullest window frees a slot and the index of that window.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local wait, worst = 0, 0
for i = 1, #KEYS do
  local window = tonumber(ARGV[1 + 2 * i])
  local limit = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[i])
  if count >= limit then
    local entry = redis.call('ZRANGE', KEYS[i], count - limit, count - limit, 'WITHSCORES')
    local free_at = tonumber(entry[2]) + window - now
    if free_at > wait then wait, worst = free_at, i end
    if wait < 1 then wait, worst = 1, i end
  end
end
if wait > 0 then return {wait, worst} end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1 + 2 * i]))
end
return {0, 0}
"""


class RedisLimiter:
    """Shared across processes: every server process pointing at one Redis sees the same windows.

    While Redis does not answer, each process counts on its own (``local``): a limit then holds per
    process. ``shared`` is set while counting goes to Redis.
    """

    def __init__(self, url: str | None = None, *, client: aioredis.Redis | None = None,
                 prefix: str = "smartspace:rl:", metrics=None, timeout_seconds: float = 2.0,
                 probe_seconds: float = 0.5) -> None:
        # A connection that died while Redis was away fails its next command at once (reset, EOF): one
        # immediate retry reconnects it. Timeouts are not retried (that would only double the wait);
        # the health check re-pings a connection idle for 30 s before using it.
        self.redis = client or aioredis.Redis.from_url(
            url or "redis://127.0.0.1:6379/0", socket_connect_timeout=timeout_seconds, socket_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), health_check_interval=30)
        self._owns_client = client is None
        self.prefix = prefix
        self.metrics = metrics
        self.probe_seconds = probe_seconds
        self._acquire = self.redis.register_script(_ACQUIRE)
        self.local = MemoryLimiter()
        self.shared = asyncio.Event()
        self.shared.set()
        self._probe: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        return not self.shared.is_set()

    async def ping(self) -> None:
        await self.redis.ping()

    async def peek(self, limits: Sequence[RateLimit], now: datetime) -> list[int]:
        if not limits:
            return []
        if self.shared.is_set():
            now_ms = int(now.timestamp() * 1000)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for limit in limits:
                        pipe.zcount(self.prefix + limit.bucket, f"({now_ms - limit.window_seconds * 1000}", "+inf")
                    return [int(n) for n in await pipe.execute()]
            except Exception as exc:  # any Redis fault: count here instead, never fail the request
                self._lost(exc)
        self._counted_locally("peek")
        return await self.local.peek(limits, now)

    async def acquire(self, limits: Sequence[RateLimit], now: datetime) -> None:
        if not limits:
            return
        if self.shared.is_set():
            now_ms = int(now.timestamp() * 1000)
            args: list[int | str] = [now_ms, f"{now_ms}-{uuid.uuid4().hex}"]
            for limit in limits:
                args += [limit.window_seconds * 1000, limit.limit]
            try:
                wait_ms, worst = await self._acquire(keys=[self.prefix + limit.bucket for limit in limits], args=args)
            except Exception as exc:  # any Redis fault: count here instead, never fail the request
                self._lost(exc)
            else:
                if int(wait_ms) > 0:
                    raise _refuse(limits[int(worst) - 1], int(wait_ms) / 1000)
                return
        self._counted_locally("acquire")
        await self.local.acquire(limits, now)

    def _counted_locally(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.ratelimit_fallbacks.labels(op).inc()

    def _lost(self, exc: Exception) -> None:
        if not self.shared.is_set():
            return  # already degraded: logged and counted when the outage began
        self.shared.clear()
        if self.metrics is not None:
            self.metrics.ratelimit_outages.inc()
            self.metrics.ratelimit_degraded.set(1)
        log.warning("redis unavailable: rate limits are counted per process until it answers again",
                    extra={"error": repr(exc)})
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._until_redis_answers(), name="ratelimit-redis-probe")

    async def _until_redis_answers(self) -> None:
        while True:
            await asyncio.sleep(self.probe_seconds)
            try:
                await self.redis.ping()
            except Exception:  # still away (any fault: the probe must not die while degraded)
                continue
            break
        self.shared.set()
        if self.metrics is not None:
            self.metrics.ratelimit_degraded.set(0)
        log.info("redis answers again: rate limits are shared across processes again")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        await self.local.close()
        if self._owns_client:
            await self.redis.aclose()


def build_limiter(redis_url: str, metrics=None) -> MemoryLimiter | RedisLimiter:
    return RedisLimiter(redis_url, metrics=metrics) if redis_url else MemoryLimiter()

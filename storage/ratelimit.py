"""Rate limiters: sliding-window logs, in memory (one process) or in Redis (shared by every process).

A window holds the timestamps of the requests it counted; a request fits when every window it
belongs to holds fewer than its limit. ``acquire`` checks and counts all windows in one step — a
Lua script on Redis, so two processes can never both take the last slot.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import redis.asyncio as aioredis

from domain.errors import RateLimited
from domain.ratelimit import RateLimit


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
    """Shared across processes: every server process pointing at one Redis sees the same windows."""

    def __init__(self, url: str | None = None, *, client: aioredis.Redis | None = None,
                 prefix: str = "smartspace:rl:") -> None:
        self.redis = client or aioredis.Redis.from_url(url or "redis://127.0.0.1:6379/0")
        self._owns_client = client is None
        self.prefix = prefix
        self._acquire = self.redis.register_script(_ACQUIRE)

    async def peek(self, limits: Sequence[RateLimit], now: datetime) -> list[int]:
        if not limits:
            return []
        now_ms = int(now.timestamp() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for limit in limits:
                pipe.zcount(self.prefix + limit.bucket, f"({now_ms - limit.window_seconds * 1000}", "+inf")
            return [int(n) for n in await pipe.execute()]

    async def acquire(self, limits: Sequence[RateLimit], now: datetime) -> None:
        if not limits:
            return
        now_ms = int(now.timestamp() * 1000)
        args: list[int | str] = [now_ms, f"{now_ms}-{uuid.uuid4().hex}"]
        for limit in limits:
            args += [limit.window_seconds * 1000, limit.limit]
        wait_ms, worst = await self._acquire(keys=[self.prefix + limit.bucket for limit in limits], args=args)
        if int(wait_ms) > 0:
            raise _refuse(limits[int(worst) - 1], int(wait_ms) / 1000)

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()


def build_limiter(redis_url: str) -> MemoryLimiter | RedisLimiter:
    return RedisLimiter(redis_url) if redis_url else MemoryLimiter()

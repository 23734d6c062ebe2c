"""Rate limiters: sliding windows, all-or-nothing acquire, and Redis windows shared by two processes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from domain.errors import RateLimited
from domain.ratelimit import RateLimit
from storage.ratelimit import MemoryLimiter, RedisLimiter, build_limiter

T0 = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)


def minute(limit: int, key: str = "key:k1") -> RateLimit:
    return RateLimit(key=key, window_seconds=60, limit=limit)


@pytest.fixture(params=["memory", "redis"])
async def limiter(request):
    if request.param == "memory":
        made = MemoryLimiter()
    else:
        url = request.getfixturevalue("redis_url")
        made = RedisLimiter(url, prefix=f"smartspace:test:rl:{uuid.uuid4().hex[:8]}:")
    yield made
    await made.close()


async def test_acquire_counts_until_the_limit_then_refuses_with_retry_after(limiter):
    limits = [minute(3)]
    for i in range(3):
        await limiter.acquire(limits, T0 + timedelta(seconds=i))
    assert await limiter.peek(limits, T0 + timedelta(seconds=3)) == [3]
    with pytest.raises(RateLimited) as exc:
        await limiter.acquire(limits, T0 + timedelta(seconds=10))
    # the first entry (t=0) leaves the window at t=60: 50 s from t=10
    assert exc.value.retry_after == 50 and exc.value.status == 429
    assert exc.value.details["scope"] == "key:k1"
    assert await limiter.peek(limits, T0 + timedelta(seconds=10)) == [3]  # the refusal counted nothing


async def test_the_window_slides(limiter):
    limits = [minute(2)]
    await limiter.acquire(limits, T0)
    await limiter.acquire(limits, T0 + timedelta(seconds=30))
    with pytest.raises(RateLimited):
        await limiter.acquire(limits, T0 + timedelta(seconds=59))
    await limiter.acquire(limits, T0 + timedelta(seconds=60))  # t=0 has left the window
    assert await limiter.peek(limits, T0 + timedelta(seconds=60)) == [2]
    assert await limiter.peek(limits, T0 + timedelta(seconds=200)) == [0]


async def test_acquire_is_all_or_nothing_across_windows(limiter):
    roomy, full = minute(10, "key:a"), RateLimit(key="project:p", window_seconds=3600, limit=1)
    await limiter.acquire([full], T0)
    with pytest.raises(RateLimited) as exc:
        await limiter.acquire([roomy, full], T0 + timedelta(seconds=1))
    assert exc.value.details["scope"] == "project:p" and exc.value.retry_after == 3599
    assert await limiter.peek([roomy, full], T0 + timedelta(seconds=1)) == [0, 1]


async def test_separate_scopes_do_not_share_counts(limiter):
    await limiter.acquire([minute(1, "key:a")], T0)
    await limiter.acquire([minute(1, "key:b")], T0)
    assert await limiter.peek([minute(1, "key:a"), minute(1, "key:b"), minute(1, "key:c")], T0) == [1, 1, 0]


async def test_no_limits_is_a_no_op(limiter):
    await limiter.acquire([], T0)
    assert await limiter.peek([], T0) == []


async def test_concurrent_acquires_never_exceed_the_limit(limiter):
    limits = [minute(7)]

    async def one() -> bool:
        try:
            await limiter.acquire(limits, T0)
            return True
        except RateLimited:
            return False

    results = await asyncio.gather(*(one() for _ in range(40)))
    assert sum(results) == 7


async def test_two_processes_share_redis_windows(redis_url):
    prefix = f"smartspace:test:rl:{uuid.uuid4().hex[:8]}:"
    first, second = RedisLimiter(redis_url, prefix=prefix), RedisLimiter(redis_url, prefix=prefix)
    try:
        limits = [minute(10)]

        async def hammer(limiter: RedisLimiter) -> int:
            ok = 0
            for _ in range(15):
                try:
                    await limiter.acquire(limits, T0)
                    ok += 1
                except RateLimited:
                    pass
            return ok

        counted = await asyncio.gather(hammer(first), hammer(second), hammer(first), hammer(second))
        assert sum(counted) == 10
        assert await first.peek(limits, T0) == await second.peek(limits, T0) == [10]
        with pytest.raises(RateLimited):
            await second.acquire(limits, T0 + timedelta(seconds=59))
        await first.acquire(limits, T0 + timedelta(seconds=60))
    finally:
        await first.close()
        await second.close()


def test_the_container_picks_redis_only_when_configured(redis_url):
    assert isinstance(build_limiter(""), MemoryLimiter)
    assert isinstance(build_limiter(redis_url), RedisLimiter)

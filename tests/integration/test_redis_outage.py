"""Redis is never load-bearing for money: with Redis cut (a TCP proxy between the server and the shared Redis,
never the Redis server itself) spending goes on, rate limits hold per process, /metrics counts the fallback and
/ready says Redis is degraded; when Redis is back counting is shared again, and connections that died while it
was away are retried on a fresh one instead of failing requests.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from domain.errors import RateLimited
from domain.ratelimit import RateLimit
from server.app import create_app
from server.container import Container
from server.metrics import Metrics
from storage.bus import RedisBus
from storage.ratelimit import RedisLimiter
from tests.factories import create_key
from tests.integration import test_bus
from tests.integration.spend_helpers import assert_books_balance, funded_project, set_policy, spend
from tests.integration.test_bus import Recorder, connected, errors, event, through, until_errors
from tests.live import WAIT

T0 = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)


proxy = test_bus.proxy  # the fixture: a cuttable TCP proxy in front of the test Redis


def minute(limit: int, key: str = "key:k1") -> RateLimit:
    return RateLimit(key=key, window_seconds=60, limit=limit)


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def fallbacks(metrics: Metrics, op: str = "acquire") -> float:
    return sample(metrics, "smartspace_ratelimit_fallback_total", {"op": op})


async def shared_again(*limiters: RedisLimiter) -> None:
    async with asyncio.timeout(WAIT):
        for limiter in limiters:
            await limiter.shared.wait()


async def outcome(limiter: RedisLimiter, limits: list[RateLimit], now: datetime) -> str:
    try:
        await limiter.acquire(limits, now)
        return "counted"
    except RateLimited:
        return "limited"


@pytest.fixture
async def limiters(redis_url, proxy):
    """Limiters through the proxy, all on one fresh key prefix (as two server processes would be)."""
    prefix = f"smartspace:test:rl:{uuid.uuid4().hex[:8]}:"
    made: list[RedisLimiter] = []

    def make(**options) -> RedisLimiter:
        limiter = RedisLimiter(through(proxy, redis_url), prefix=prefix, metrics=Metrics(),
                               probe_seconds=0.05, **options)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


# ---------------------------------------------------------------- the limiter
async def test_with_redis_cut_each_limiter_counts_on_its_own_and_shares_again_when_it_is_back(
        limiters, proxy, caplog):
    a, b = limiters(), limiters()
    limits = [minute(3)]
    assert [await outcome(x, limits, T0) for x in (a, b, a, b)] == ["counted"] * 3 + ["limited"]  # shared

    await proxy.cut()
    caplog.set_level(logging.INFO, logger="smartspace.ratelimit")
    caplog.clear()
    # Per process now: each has a window of its own (empty at first), and each enforces the limit in it.
    assert [await outcome(a, limits, T0) for _ in range(4)] == ["counted"] * 3 + ["limited"]
    assert [await outcome(b, limits, T0) for _ in range(4)] == ["counted"] * 3 + ["limited"]
    assert await a.peek(limits, T0) == [3]
    assert a.degraded and b.degraded
    assert fallbacks(a.metrics) == fallbacks(b.metrics) == 4
    assert fallbacks(a.metrics, "peek") == 1
    assert sample(a.metrics, "smartspace_ratelimit_redis_outages_total") == 1
    assert sample(a.metrics, "smartspace_ratelimit_degraded") == 1
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("per process" in r.getMessage() for r in warned)  # once per limiter

    await proxy.restore()
    await shared_again(a, b)
    assert sample(a.metrics, "smartspace_ratelimit_degraded") == 0
    assert any("shared across processes again" in r.getMessage() for r in caplog.records)
    # Shared again: both see the window Redis kept (3 of 3), and a fresh one fills across both.
    assert await a.peek(limits, T0) == await b.peek(limits, T0) == [3]
    fresh = [minute(2, "key:k2")]
    assert [await outcome(x, fresh, T0) for x in (a, b, a, b)] == ["counted", "counted", "limited", "limited"]
    # Fired at once on pooled connections that died in the cut: retried on fresh ones, none falls back.
    roomy = [minute(1000, "key:k3")]
    before = fallbacks(a.metrics)
    assert await asyncio.gather(*(outcome(x, roomy, T0) for x in (a, b) * 15)) == ["counted"] * 30
    assert await a.peek(roomy, T0) == [30]
    assert fallbacks(a.metrics) == before and sample(a.metrics, "smartspace_ratelimit_redis_outages_total") == 1


async def test_connections_that_died_while_redis_was_away_are_retried_on_fresh_ones(limiters, proxy):
    limiter = limiters()
    limits = [minute(1000)]
    await asyncio.gather(*(limiter.acquire(limits, T0) for _ in range(20)))  # twenty pooled connections
    await proxy.cut()  # every one of them dies; nothing uses them while Redis is away
    await proxy.restore()
    results = await asyncio.gather(*(limiter.acquire(limits, T0) for _ in range(20)),
                                   *(limiter.peek(limits, T0) for _ in range(20)), return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert await limiter.peek(limits, T0) == [40]  # counted in Redis, not in the fallback
    assert fallbacks(limiter.metrics) == fallbacks(limiter.metrics, "peek") == 0
    assert not limiter.degraded


async def test_a_redis_that_stops_answering_is_a_fallback_not_a_hang(limiters, proxy):
    limiter = limiters(timeout_seconds=0.2)
    limits = [minute(2)]
    await limiter.acquire(limits, T0)
    proxy.freeze()  # connections stay open, nothing comes back
    assert [await outcome(limiter, limits, T0) for _ in range(3)] == ["counted", "counted", "limited"]
    assert limiter.degraded and fallbacks(limiter.metrics) == 3
    proxy.thaw()
    await shared_again(limiter)
    # (The command that timed out may still have run once Redis got it: a timeout errs towards refusing.)
    fresh = [minute(5, "key:k2")]
    await limiter.acquire(fresh, T0)
    assert await limiter.peek(fresh, T0) == [1] and fallbacks(limiter.metrics) == 3  # counted in Redis again


# ---------------------------------------------------------------- two apps on one database
async def outage_app(aiohttp_client, settings, db, url: str, channel: str):
    """An app whose event bus and rate limiter both reach Redis at ``url`` (the limiter built from settings)."""
    metrics = Metrics()
    bus = RedisBus(url, metrics, channel=channel, max_backoff_seconds=0.2)
    container = Container(msgspec.structs.replace(settings, redis_url=url), db, bus, metrics=metrics)
    assert isinstance(container.limiter, RedisLimiter)
    client = await aiohttp_client(create_app(settings, container=container))
    await connected(bus)
    return client, container


async def scrape(client) -> dict[tuple[str, tuple[str, ...]], float]:
    """/metrics as {(sample name, label values): value}."""
    text = await (await client.get("/metrics")).text()
    return {(s.name, tuple(s.labels.values())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def chat(client, key: str) -> int:
    resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "local/echo-1", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 1})
    await resp.read()
    return resp.status


async def test_with_redis_cut_spending_goes_on_with_per_process_limits_then_shares_again(
        settings, db, redis_url, proxy, aiohttp_client):
    url, channel = through(proxy, redis_url), f"smartspace:test:{uuid.uuid4().hex[:8]}"
    a, ca = await outage_app(aiohttp_client, settings, db, url, channel)
    b, cb = await outage_app(aiohttp_client, settings, db, url, channel)
    _, owner = await funded_project(a, 1_000_000)
    key = (await create_key(a, owner))["key"]
    await set_policy(a, owner, rate_limits={"project": {"per_minute": 3}})
    own = {**owner.headers}
    body = {"project_id": owner.project_id}
    assert (await spend(a, own, body))[0] == 200
    assert (await spend(b, own, body))[0] == 200  # 2 of 3, counted in Redis

    await proxy.cut()
    for client in (a, b):  # each process: a gateway call and REST calls, up to the limit in its own window
        assert await chat(client, key) == 200
        assert [(await spend(client, own, body))[0] for _ in range(2)] == [200, 200]
        status, refused = await spend(client, own, body)
        assert status == 429 and refused["error"]["code"] == "rate_limited"
        assert await chat(client, key) == 429
    ready = await a.get("/ready")
    assert ready.status == 200
    report = await ready.json()
    assert report["status"] == "degraded" and report["checks"]["database"] == "ok"
    assert report["checks"]["redis"].startswith("degraded")
    scraped = await scrape(a)
    # 3 counted per process; the brain refused the 4th and 5th on its peek at the (local) window
    assert scraped[("smartspace_ratelimit_fallback_total", ("acquire",))] == 3
    assert scraped[("smartspace_ratelimit_fallback_total", ("peek",))] == 5
    assert scraped[("smartspace_ratelimit_redis_outages_total", ())] == 1
    assert scraped[("smartspace_ratelimit_degraded", ())] == 1
    await assert_books_balance(db, owner.project_id)

    await proxy.restore()
    await shared_again(ca.limiter, cb.limiter)
    # At once, on pooled connections the cut killed: no 500, and the count is shared again — Redis holds the
    # 2 from before the cut, so exactly one of these fits, whichever process it reaches.
    statuses = await asyncio.gather(*(spend(x, own, body) for x in (a, b) * 4), chat(a, key), chat(b, key))
    codes = sorted(s if isinstance(s, int) else s[0] for s in statuses)
    assert codes == [200] + [429] * 9
    assert fallbacks(ca.metrics) == fallbacks(cb.metrics) == 3
    assert fallbacks(ca.metrics, "peek") == fallbacks(cb.metrics, "peek") == 5
    ready = await a.get("/ready")
    assert (ready.status, await ready.json()) == (200, {"status": "ok", "checks": {"database": "ok", "redis": "ok"}})
    await assert_books_balance(db, owner.project_id)


async def test_requests_right_after_a_redis_blip_do_not_fail(settings, db, redis_url, proxy, aiohttp_client):
    url, channel = through(proxy, redis_url), f"smartspace:test:{uuid.uuid4().hex[:8]}"
    a, ca = await outage_app(aiohttp_client, settings, db, url, channel)
    _, owner = await funded_project(a, 1_000_000)
    key = (await create_key(a, owner))["key"]
    await set_policy(a, owner, rate_limits={"project": {"per_minute": 100}})
    body = {"project_id": owner.project_id}
    warm = await asyncio.gather(*(spend(a, owner.headers, body) for _ in range(8)))  # several pooled connections
    assert [s for s, _ in warm] == [200] * 8
    await proxy.cut()
    await proxy.restore()
    ready = await a.get("/ready")  # pings on pooled connections the blip killed
    assert (ready.status, (await ready.json())["status"]) == (200, "ok")
    statuses = await asyncio.gather(*(spend(a, owner.headers, body) for _ in range(8)),
                                    *(chat(a, key) for _ in range(4)))
    assert [s if isinstance(s, int) else s[0] for s in statuses] == [200] * 12
    assert fallbacks(ca.metrics) == fallbacks(ca.metrics, "peek") == 0  # served by Redis throughout
    await assert_books_balance(db, owner.project_id)


# ---------------------------------------------------------------- the event bus
async def test_the_first_publish_after_a_redis_blip_goes_out_on_a_fresh_connection(redis_url, proxy):
    metrics = Metrics()
    sender = RedisBus(through(proxy, redis_url), metrics, channel=f"smartspace:test:{uuid.uuid4().hex}",
                      max_backoff_seconds=0.2)
    receiver = RedisBus(redis_url, Metrics(), channel=sender.channel)
    far = Recorder()
    receiver.listen(far)
    await sender.start()
    await receiver.start()
    try:
        await connected(sender)
        await connected(receiver)
        await sender.publish([event(1)])
        await far.until(lambda: far.seqs == [1], "the first message")
        await proxy.cut()  # the publisher's pooled connection dies; nothing is published meanwhile
        await proxy.restore()
        await sender.publish([event(2)])
        await far.until(lambda: far.seqs == [1, 2], "the message after the blip")
        assert errors(metrics, "publish") == 0  # sent at the first try, on a fresh connection
    finally:
        await sender.close()
        await receiver.close()


# ---------------------------------------------------------------- key revocation
async def test_a_key_revoked_on_another_process_during_a_cut_cannot_spend_here(
        settings, db, redis_url, proxy, aiohttp_client):
    # A's gateway key cache never hears this key.revoked while Redis is cut; the spend decision reads the key
    # from the database, so the key spends nothing on A all the same.
    name = f"smartspace:test:{uuid.uuid4().hex[:8]}"
    a, ca = await outage_app(aiohttp_client, settings, db, through(proxy, redis_url), name)
    b, _ = await outage_app(aiohttp_client, settings, db, redis_url, name)
    _, owner = await funded_project(a, 1_000_000)
    key = await create_key(a, owner)
    assert await chat(a, key["key"]) == 200  # A's gateway has the key cached now
    await proxy.cut()
    await until_errors(ca.metrics, "listen")  # A's listener noticed
    resp = await b.delete(f"/api/v1/projects/{owner.project_id}/keys/{key['id']}", headers=owner.headers)
    assert resp.status in (200, 204), await resp.text()
    before = await assert_books_balance(db, owner.project_id)
    assert [await chat(a, key["key"]) for _ in range(3)] in ([401] * 3, [403] * 3)
    status, _ = await spend(a, {"Authorization": f"Bearer {key['key']}"})
    assert status in (401, 403)
    assert await assert_books_balance(db, owner.project_id) == before

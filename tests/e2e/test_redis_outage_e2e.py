"""Redis cut under two real ``smartspace serve`` processes (fresh PostgreSQL; Redis through a TCP proxy the test
cuts, never the shared Redis itself): spending goes on on both, each process enforces the rate limit on its
own, /ready is 200 ``degraded`` and /metrics counts the fallback; once Redis is back the limit is shared again
and requests fired at once on the connections the cut killed do not fail.

Runs whenever SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) and SMARTSPACE_TEST_REDIS_URL are set.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from urllib.parse import urlparse

import aiohttp
import pytest

from tests.e2e.procs import fresh_database, server_env, serving
from tests.e2e.test_spend_race import books
from tests.e2e.test_two_processes import Cluster
from tests.live import WAIT, TcpProxy

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SMARTSPACE_TEST_REDIS_URL", "")
ADMIN = "outage-admin@smartspace.test"
SPEND = {"model": "local/echo-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (PG_URL.startswith("postgresql") and REDIS_URL),
                       reason="needs SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) and SMARTSPACE_TEST_REDIS_URL"),
]


@pytest.fixture
async def cluster(tmp_path):
    redis = urlparse(REDIS_URL)
    proxy = await TcpProxy(redis.hostname or "127.0.0.1", redis.port or 6379).start()
    try:
        async with fresh_database(PG_URL, "smartspace_outage_") as database, aiohttp.ClientSession() as http:
            netloc = f"{redis.username or ''}{':' + redis.password if redis.password else ''}"
            env = server_env(database, tmp_path / "data", admin_emails=ADMIN, log_level="WARNING",
                             access_log="false", redis_url=redis._replace(
                                 netloc=(f"{netloc}@" if netloc else "") + f"127.0.0.1:{proxy.port}").geturl())
            async with serving(["A", "B"], env, tmp_path, http) as (a, b):
                cluster = Cluster(a, b, proxy, http)
                cluster.database = database
                yield cluster
    finally:
        await proxy.close()


async def register(cluster: Cluster, email: str) -> tuple[str, str]:
    status, body = await cluster.request("POST", cluster.a, "/api/v1/auth/register",
                                         json={"email": email, "password": "correct horse", "name": "Outage"})
    assert status == 201, body
    token = body["access_token"]
    _, projects = await cluster.request("GET", cluster.a, "/api/v1/projects", token)
    return token, projects["items"][0]["id"]


async def ready(cluster: Cluster, server) -> tuple[int, dict]:
    return await cluster.request("GET", server, "/ready")


async def test_two_processes_keep_spending_through_a_redis_cut(cluster: Cluster):
    a, b = cluster.a, cluster.b
    admin, _ = await register(cluster, ADMIN)
    owner, project_id = await register(cluster, f"owner-{uuid.uuid4().hex[:8]}@example.com")
    status, body = await cluster.request("POST", a, f"/api/v1/admin/projects/{project_id}/credits", admin,
                                         json={"amount_micros": 10_000_000, "reason": "outage"})
    assert status == 201, body
    status, key = await cluster.request("POST", a, f"/api/v1/projects/{project_id}/keys", owner, json={"name": "k"})
    assert status == 201, key
    status, body = await cluster.request("PUT", a, f"/api/v1/projects/{project_id}/policy", owner,
                                         json={"rate_limits": {"project": {"per_minute": 3}}})
    assert status == 200, body

    async def spend(server) -> int:
        return (await cluster.request("POST", server, "/api/v1/requests", owner,
                                      json={**SPEND, "project_id": project_id}))[0]

    async def chat(server) -> int:
        return (await cluster.request("POST", server, "/v1/chat/completions", key["key"], json=SPEND))[0]

    assert [await spend(a), await spend(b)] == [200, 200]  # 2 of 3, shared through Redis

    await cluster.proxy.cut()
    for server in (a, b):  # each process on its own window: three fit, then rate_limited
        assert [await chat(server), await spend(server), await spend(server)] == [200, 200, 200]
        assert [await spend(server), await chat(server)] == [429, 429]
        status, report = await ready(cluster, server)
        assert status == 200 and report["status"] == "degraded", report
        assert report["checks"] == {"database": "ok", "redis": report["checks"]["redis"]}
        assert report["checks"]["redis"].startswith("degraded")
        assert await cluster.metric(server, "smartspace_ratelimit_fallback_total", 'op="acquire"') == 3
        assert await cluster.metric(server, "smartspace_ratelimit_degraded") == 1

    await cluster.proxy.restore()
    async with asyncio.timeout(WAIT):
        for server in (a, b):
            while (await ready(cluster, server))[1]["status"] != "ok":  # noqa: ASYNC110 - polling HTTP
                await asyncio.sleep(0.05)
    # At once, across both processes: no 500, and the count is shared again (Redis still holds the 2 from
    # before the cut, so exactly one fits).
    codes = sorted(await asyncio.gather(*(spend(s) for s in (a, b) * 4), chat(a), chat(b)))
    assert codes == [200] + [429] * 9
    for server in (a, b):
        assert await cluster.metric(server, "smartspace_ratelimit_fallback_total", 'op="acquire"') == 3
        assert await cluster.metric(server, "smartspace_ratelimit_redis_outages_total") == 1

    closing = await books(cluster, project_id)  # the ledger sums to the balance
    assert closing["reserved"] == 0 and closing["status_settled"] == 2 + 6 + 1

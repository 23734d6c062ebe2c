"""Two real ``smartspace serve`` processes sharing PostgreSQL and Redis.

A fresh PostgreSQL database is created for the test (and dropped after). Redis is reached through a
TCP proxy on loopback that the test cuts: every connection closed and new ones refused for a moment,
while process B keeps changing the project. A Socket.IO client on process A must end up with every
event exactly once, in order — through A's resync from the log after its Redis listener reconnects,
and, for a client that was away, by re-subscribing with ``since``.

Runs whenever SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) and SMARTSPACE_TEST_REDIS_URL are set.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from urllib.parse import urlparse

import aiohttp
import pytest

from tests.e2e.procs import Server, fresh_database, server_env, serving
from tests.live import WAIT, LiveClient, TcpProxy

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SMARTSPACE_TEST_REDIS_URL", "")
CUT_SECONDS = 1.5

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (PG_URL.startswith("postgresql") and REDIS_URL),
                       reason="needs SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) and SMARTSPACE_TEST_REDIS_URL"),
]


class Cluster:
    def __init__(self, a: Server, b: Server, proxy: TcpProxy, http: aiohttp.ClientSession) -> None:
        self.a, self.b, self.proxy, self.http = a, b, proxy, http

    async def request(self, method: str, server: Server, path: str, token: str | None = None, **kw):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, server.url + path, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=WAIT), **kw) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body

    async def metric(self, server: Server, name: str, labels: str = "") -> float:
        async with self.http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + ("{" + labels if labels else "")):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
async def cluster(tmp_path):
    redis = urlparse(REDIS_URL)
    proxy = await TcpProxy(redis.hostname or "127.0.0.1", redis.port or 6379).start()
    try:
        async with fresh_database(PG_URL) as database, aiohttp.ClientSession() as http:
            netloc = f"{redis.username or ''}{':' + redis.password if redis.password else ''}"
            env = server_env(database, tmp_path / "data", log_level="INFO", redis_url=redis._replace(
                netloc=(f"{netloc}@" if netloc else "") + f"127.0.0.1:{proxy.port}").geturl())
            async with serving(["A", "B"], env, tmp_path, http) as (a, b):
                yield Cluster(a, b, proxy, http)
    finally:
        await proxy.close()


async def test_events_cross_processes_and_survive_a_redis_cut(cluster: Cluster):
    a, b = cluster.a, cluster.b
    status, body = await cluster.request("POST", b, "/api/v1/auth/register",
                                         json={"email": f"e2e-{uuid.uuid4().hex[:8]}@example.com",
                                               "password": "correct horse", "name": "E2E"})
    assert status == 201, body
    token = body["access_token"]
    status, projects = await cluster.request("GET", b, "/api/v1/projects", token)
    project_id = projects["items"][0]["id"]

    async def change(name: str) -> None:
        status, body = await cluster.request("PATCH", b, f"/api/v1/projects/{project_id}", token, json={"name": name})
        assert status == 200, body

    stayer = await LiveClient(a.url, token).connect()  # connected throughout
    leaver = await LiveClient(a.url, token).connect()  # away during the cut, re-subscribes after
    try:
        assert await stayer.subscribe(project_id) == {"ok": True, "project_id": project_id, "seq": 1}
        assert (await leaver.subscribe(project_id))["ok"] is True

        # 1. caused on B, seen on A
        await change("first")
        await stayer.until_seq(2)
        await leaver.until_seq(2)
        assert stayer.received[-1]["type"] == "project.updated"
        assert stayer.received[-1]["data"]["project"]["name"] == "first"
        leaver_last = leaver.last_seq
        await leaver.disconnect()

        # 2. Redis cut: every connection closed, new ones refused; B keeps changing the project
        listen_errors_before = await cluster.metric(a, "smartspace_bus_errors_total", 'op="listen"')
        await cluster.proxy.cut()
        cut_at = time.monotonic()
        for i in range(5):
            await change(f"during cut {i}")
        status, ready = await cluster.request("GET", a, "/ready")
        assert status == 200 and ready["status"] == "degraded" and ready["checks"]["redis"] != "ok", ready
        await asyncio.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))  # the outage lasts this long
        await cluster.proxy.restore()

        # 3. the connected client gets all of them (A resyncs from the log; B's queued publishes are dropped
        #    as duplicates) — exactly once, in order
        await stayer.until_seq(7)
        assert stayer.seqs() == [1, 2, 3, 4, 5, 6, 7]
        assert await cluster.metric(a, "smartspace_bus_errors_total", 'op="listen"') > listen_errors_before

        # 4. the client that was away re-subscribes with the last seq it saw and gets the rest, once
        back = await LiveClient(a.url, token).connect()
        try:
            ack = await back.subscribe(project_id, since=leaver_last)
            assert ack == {"ok": True, "project_id": project_id, "seq": 7}
            assert back.seqs() == [3, 4, 5, 6, 7]
            assert [e["data"]["project"]["name"] for e in back.received] == [f"during cut {i}" for i in range(5)]

            # 5. live again across processes, exactly once each
            await change("after")
            await stayer.until_seq(8)
            await back.until_seq(8)
            await change("last")
            await stayer.until_seq(9)
            await back.until_seq(9)
            assert stayer.seqs() == list(range(1, 10))
            assert back.seqs() == list(range(3, 10))
            async with asyncio.timeout(WAIT):
                while (await cluster.request("GET", a, "/ready"))[1]["status"] != "ok":  # noqa: ASYNC110 - polling HTTP
                    await asyncio.sleep(0.1)
            listen = await cluster.metric(a, "smartspace_bus_errors_total", 'op="listen"')
            replayed = await cluster.metric(a, "smartspace_events_replayed_total")
            publish = await cluster.metric(b, "smartspace_bus_errors_total", 'op="publish"')
            print(f"\nA: listen errors {listen}, events replayed {replayed}; B: publish errors {publish}")
        finally:
            await back.disconnect()
    finally:
        await stayer.disconnect()
        await leaver.disconnect()

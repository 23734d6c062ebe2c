"""Two real ``smartspace serve`` processes on one PostgreSQL database and Redis evaluate the same project
(each hears every event through Redis): an insight is raised exactly once, then updated — never twice.

An agent's key is refused again and again through both processes at once (a blocked model), so both
evaluators run on the project concurrently; the per-project advisory lock and the open-slot index keep
it to one ``rejection_burst``. A Socket.IO client on A awaits the events.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import aiohttp
import pytest

from tests.e2e.procs import fresh_database, server_env, serving
from tests.live import WAIT, LiveClient

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SMARTSPACE_TEST_REDIS_URL", "")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (PG_URL.startswith("postgresql") and REDIS_URL),
                       reason="needs SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) and SMARTSPACE_TEST_REDIS_URL"),
]


async def call(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=WAIT), **kw) as resp:
        return resp.status, await resp.json(content_type=None)


def bursts(lc: LiveClient, type_: str) -> list[dict]:
    return [e["data"] for n, e in zip(lc.names, lc.received, strict=True)
            if n == type_ and e["data"]["kind"] == "rejection_burst"]


async def test_two_processes_raise_an_insight_once(tmp_path):
    async with fresh_database(PG_URL) as database, aiohttp.ClientSession() as http:
        env = server_env(database, tmp_path / "data", log_level="INFO", redis_url=REDIS_URL,
                         insight_debounce_seconds="0.1", insight_update_seconds="0", chain_worker="false")
        async with serving(["A", "B"], env, tmp_path, http) as (a, b):
            status, body = await call(http, "POST", b.url + "/api/v1/auth/register", json={
                "email": f"e2e-{uuid.uuid4().hex[:8]}@example.com", "password": "correct horse", "name": "E2E"})
            assert status == 201, body
            token = body["access_token"]
            project_id = (await call(http, "GET", b.url + "/api/v1/projects", token))[1]["items"][0]["id"]
            status, key = await call(http, "POST", f"{b.url}/api/v1/projects/{project_id}/keys", token,
                                     json={"name": "looping agent"})
            assert status == 201, key
            status, body = await call(http, "PUT", f"{a.url}/api/v1/projects/{project_id}/policy", token,
                                      json={"blocked_models": ["local/echo-1"]})
            assert status == 200, body

            live = await LiveClient(a.url, token).connect()
            try:
                assert (await live.subscribe(project_id))["ok"] is True

                async def refused(server, i: int) -> None:
                    status, body = await call(http, "POST", server.url + "/v1/chat/completions", key["key"], json={
                        "model": "local/echo-1", "messages": [{"role": "user", "content": f"try {i}"}]})
                    assert status == 403, body

                await asyncio.gather(*(refused(a if i % 2 else b, i) for i in range(12)))
                await live.until(lambda: bursts(live, "insight.created"), WAIT, "insight.created rejection_burst")
                [created] = bursts(live, "insight.created")
                assert created["subject"] == {"key_id": key["id"]}

                # more refusals through both: the open insight is updated, not raised again
                await asyncio.gather(*(refused(a if i % 2 else b, i) for i in range(12, 18)))
                await live.until(lambda: any(u["evidence"]["rejections"] == 18
                                             for u in bursts(live, "insight.updated")),
                                 WAIT, "insight.updated with 18 rejections")
                assert len(bursts(live, "insight.created")) == 1
                assert {u["id"] for u in bursts(live, "insight.updated")} == {created["id"]}
            finally:
                await live.disconnect()

            status, listed = await call(http, "GET", f"{b.url}/api/v1/projects/{project_id}/insights?status=all",
                                        token)
            assert status == 200
            assert [i["id"] for i in listed["items"] if i["kind"] == "rejection_burst"] == [created["id"]]
            status, log = await call(http, "GET", f"{a.url}/api/v1/projects/{project_id}/audit?type=insight.created",
                                     token)
            assert [e["data"]["id"] for e in log["items"]] == [created["id"]]
            status, verify = await call(http, "GET", f"{a.url}/api/v1/projects/{project_id}/audit/verify", token)
            assert verify["ok"] is True

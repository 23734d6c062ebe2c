"""An Idempotency-Key whose first request died is never stuck, and is charged once: a real ``smartspace serve``
is killed (SIGKILL) while its gateway call waits on the provider, with the money reserved; a second process
on the same PostgreSQL database takes the key over once the lease lapsed, releases what the dead request held,
runs the call anew and answers every later retry with that one answer.

Runs whenever SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web

from tests.e2e.procs import Server, asyncpg_dsn, fresh_database, migrate, server_env
from tests.fakes.upstream import Behavior, FakeUpstream
from tests.live import WAIT

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
ADMIN = "idem-admin@smartspace.test"
UPSTREAM_KEY = "sk-e2e-upstream-key-0000000000000000"
FUNDS = 5_000_000

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs SMARTSPACE_TEST_DATABASE_URL (PostgreSQL)"),
]


async def call(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kw):
    headers = {**kw.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    async with http.request(method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=WAIT), **kw) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


@dataclass
class SignallingUpstream(FakeUpstream):
    """The fake provider, telling when a call has arrived."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def _receive(self, request: web.Request) -> dict[str, Any]:
        body = await super()._receive(request)
        self.arrived.set()
        return body


async def test_a_key_whose_process_was_killed_is_taken_over_and_charged_once(tmp_path):
    fake = await SignallingUpstream().start()
    async with fresh_database(PG_URL, "smartspace_idem_") as database, aiohttp.ClientSession() as http:
        env = server_env(database, tmp_path / "data", admin_emails=ADMIN, log_level="WARNING", access_log="false",
                         database_pool_size="4", idempotency_lease_seconds="1", upstreams=msgspec.json.encode([{
                             "provider": "openai", "kind": "openai", "base_url": fake.base_url,
                             "api_key": UPSTREAM_KEY}]).decode())
        await migrate(env)
        first = Server("A", env, tmp_path, ready_path="/health")
        second: Server | None = None
        try:
            await first.ready(http)
            a = first.url
            _, admin, _ = await call(http, "POST", a + "/api/v1/auth/register",
                                     json={"email": ADMIN, "password": "correct horse", "name": "Admin"})
            _, owner, _ = await call(http, "POST", a + "/api/v1/auth/register",
                                     json={"email": "owner@smartspace.test", "password": "correct horse",
                                           "name": "Owner"})
            token = owner["access_token"]
            _, projects, _ = await call(http, "GET", a + "/api/v1/projects", token)
            project_id = projects["items"][0]["id"]
            status, _, _ = await call(http, "POST", f"{a}/api/v1/admin/projects/{project_id}/credits",
                                      admin["access_token"], json={"amount_micros": FUNDS, "reason": "e2e"})
            assert status == 201
            _, key, _ = await call(http, "POST", f"{a}/api/v1/projects/{project_id}/keys", token, json={"name": "k"})
            body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello once"}],
                    "max_tokens": 20}
            keyed = {"Idempotency-Key": "kill-1"}

            fake.plan(Behavior(delay=WAIT * 4))  # the provider holds the first call until the process is gone
            doomed = asyncio.create_task(call(http, "POST", a + "/v1/chat/completions", key["key"], json=body,
                                              headers=keyed))
            await asyncio.wait_for(fake.arrived.wait(), WAIT)  # the first call reached the provider
            os.killpg(first.proc.pid, signal.SIGKILL)
            first.proc.wait(WAIT)
            with contextlib.suppress(aiohttp.ClientError):
                await doomed
            conn = await asyncpg.connect(asyncpg_dsn(database))
            try:
                held = await conn.fetchrow("SELECT reserved_micros FROM wallets WHERE project_id = $1", project_id)
                assert held["reserved_micros"] > 0  # it died holding money

                second = Server("B", env, tmp_path, ready_path="/health")
                await second.ready(http)
                b = second.url
                # A client retrying as told: 409 "in progress" carries retry_after_seconds until the lease lapses.
                for _ in range(30):
                    status, answer, headers = await call(http, "POST", b + "/v1/chat/completions", key["key"],
                                                         json=body, headers=keyed)
                    if status != 409:
                        break
                    assert "in progress" in answer["error"]["message"]
                    await asyncio.sleep(answer["error"]["details"]["retry_after_seconds"])
                assert status == 200, answer
                assert answer["choices"][0]["message"]["content"].startswith("Reply")
                cost = int(headers["x-smartspace-cost-micros"])
                status, again, again_headers = await call(http, "POST", b + "/v1/chat/completions", key["key"],
                                                          json=body, headers=keyed)
                assert status == 200 and again == answer and again_headers["Idempotent-Replayed"] == "true"
                assert len(fake.received) == 2  # the dead call and the one that answered; never a third

                rows = await conn.fetch("SELECT status, error FROM spend_requests WHERE project_id = $1 "
                                        "ORDER BY created_at", project_id)
                assert [r["status"] for r in rows] == ["failed", "settled"]
                assert msgspec.json.decode(rows[0]["error"])["code"] == "reservation_expired"
                wallet = await conn.fetchrow("SELECT balance_micros, reserved_micros FROM wallets "
                                             "WHERE project_id = $1", project_id)
                assert (wallet["balance_micros"], wallet["reserved_micros"]) == (FUNDS - cost, 0)
                ledger = await conn.fetchval("SELECT sum(amount_micros) FROM ledger_entries WHERE project_id = $1",
                                             project_id)
                assert ledger == FUNDS - cost
            finally:
                await conn.close()
        finally:
            first.stop()
            if second is not None:
                second.stop()
            await fake.stop()

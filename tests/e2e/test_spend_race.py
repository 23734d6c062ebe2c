"""THE RACE: two real ``smartspace serve`` processes on one fresh PostgreSQL database (+ Redis).

A budget that fits exactly 50 requests (prices fixed so each reservation costs exactly COST), 200
concurrent requests split across both processes → exactly 50 settle and 150 are refused with
``budget_exceeded``; a monitor polling the budget and wallet rows the whole time sees
``spent + reserved <= limit`` (and ``reserved <= balance``) at every sample. Then the same with a
wallet funded for exactly 50 requests and no budget → 150 ``insufficient_funds``.

Runs whenever SMARTSPACE_TEST_DATABASE_URL (PostgreSQL) is set; Redis is used when
SMARTSPACE_TEST_REDIS_URL is set too (shared rate limits and event fan-out across the processes).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import aiohttp
import asyncpg
import pytest

from tests.e2e.procs import Server, asyncpg_dsn, fresh_database, server_env, serving

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SMARTSPACE_TEST_REDIS_URL", "")
ADMIN = "race-admin@smartspace.test"
FITS = 50
CALLS = 200
COST = 8 * 1000 + 1 * 2000  # "hi" (8 input tokens) + max_tokens=1 at the prices set below
PRICES = {"input_micros_per_mtok": 1_000_000_000, "output_micros_per_mtok": 2_000_000_000}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs SMARTSPACE_TEST_DATABASE_URL (PostgreSQL)"),
]


class Cluster:
    def __init__(self, servers: list[Server], http: aiohttp.ClientSession, database) -> None:
        self.servers, self.http, self.database = servers, http, database

    async def call(self, method: str, path: str, token: str | None = None, server: int = 0, **kw):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.servers[server].url + path, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=120), **kw) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def cluster(tmp_path):
    connector = aiohttp.TCPConnector(limit=CALLS * 2)
    async with fresh_database(PG_URL, "smartspace_race_") as database, \
            aiohttp.ClientSession(connector=connector) as http:
        redis = {"redis_url": REDIS_URL} if REDIS_URL else {}
        env = server_env(database, tmp_path / "data", admin_emails=ADMIN, log_level="WARNING", access_log="false",
                         database_pool_size="4", **redis)
        async with serving(["A", "B"], env, tmp_path, http, ready_path="/health") as servers:
            yield Cluster(servers, http, database)


class Monitor:
    """Polls the project's budget and wallet rows while the race runs, checking the invariants at
    every sample (not only at the end)."""

    def __init__(self, database, project_id: str) -> None:
        self.database, self.project_id = database, project_id
        self.samples = 0
        self.violations: list[str] = []
        self.max_reserved = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(self.database))
        try:
            while not self._stop.is_set():
                budgets = await conn.fetch("SELECT id, limit_micros, spent_micros, reserved_micros FROM budgets "
                                           "WHERE project_id = $1", self.project_id)
                wallet = await conn.fetchrow("SELECT balance_micros, reserved_micros FROM wallets "
                                             "WHERE project_id = $1", self.project_id)
                self.samples += 1
                for b in budgets:
                    if b["spent_micros"] + b["reserved_micros"] > b["limit_micros"] or b["reserved_micros"] < 0:
                        self.violations.append(f"budget {dict(b)}")
                if wallet["reserved_micros"] > wallet["balance_micros"] or wallet["reserved_micros"] < 0:
                    self.violations.append(f"wallet {dict(wallet)}")
                self.max_reserved = max(self.max_reserved, wallet["reserved_micros"])
                await asyncio.sleep(0.002)
        finally:
            await conn.close()

    def stop(self) -> None:
        self._stop.set()


async def setup_project(cluster: Cluster, admin_token: str, name: str, fund: int) -> tuple[str, str, str]:
    """(owner token, project id, agent key) for a new user's default project funded with ``fund``."""
    status, body = await cluster.call("POST", "/api/v1/auth/register", json={
        "email": f"{name}-{uuid.uuid4().hex[:8]}@example.com", "password": "correct horse", "name": name})
    assert status == 201, body
    token = body["access_token"]
    _, projects = await cluster.call("GET", "/api/v1/projects", token)
    project_id = projects["items"][0]["id"]
    status, body = await cluster.call("POST", f"/api/v1/admin/projects/{project_id}/credits", admin_token,
                                      json={"amount_micros": fund, "reason": "race"})
    assert status == 201, body
    status, key = await cluster.call("POST", f"/api/v1/projects/{project_id}/keys", token, json={"name": "racer"})
    assert status == 201, key
    return token, project_id, key["key"]


async def race(cluster: Cluster, project_id: str, key: str) -> tuple[list[tuple[int, dict]], Monitor]:
    monitor = Monitor(cluster.database, project_id)
    watcher = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.05)
    body = {"model": "local/echo-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    start = asyncio.Event()

    async def one(i: int) -> tuple[int, dict]:
        await start.wait()
        return await cluster.call("POST", "/api/v1/requests", key, server=i % 2, json=body)

    calls = [asyncio.create_task(one(i)) for i in range(CALLS)]
    start.set()
    results = await asyncio.gather(*calls)
    await asyncio.sleep(0.05)
    monitor.stop()
    await watcher
    return results, monitor


def tally(results: list[tuple[int, dict]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for status, _ in results:
        counts[status] = counts.get(status, 0) + 1
    return counts


async def books(cluster: Cluster, project_id: str) -> dict[str, int]:
    conn = await asyncpg.connect(asyncpg_dsn(cluster.database))
    try:
        wallet = await conn.fetchrow("SELECT balance_micros, reserved_micros FROM wallets WHERE project_id = $1",
                                     project_id)
        ledger = await conn.fetchval("SELECT COALESCE(SUM(amount_micros), 0) FROM ledger_entries "
                                     "WHERE project_id = $1", project_id)
        budget = await conn.fetchrow("SELECT COALESCE(SUM(spent_micros), 0) AS spent, "
                                     "COALESCE(SUM(reserved_micros), 0) AS reserved FROM budgets "
                                     "WHERE project_id = $1", project_id)
        statuses = dict(await conn.fetch("SELECT status, count(*) FROM spend_requests WHERE project_id = $1 "
                                         "GROUP BY status", project_id))
        checks = {r["conname"] for r in await conn.fetch("SELECT conname FROM pg_constraint WHERE contype = 'c'")}
    finally:
        await conn.close()
    assert {"ck_budgets_within_limit", "ck_wallets_available_nonneg", "ck_wallets_reserved_nonneg"} <= checks
    assert wallet["balance_micros"] == ledger  # the ledger sums to the balance
    return {"balance": wallet["balance_micros"], "reserved": wallet["reserved_micros"], "spent": budget["spent"],
            "budget_reserved": budget["reserved"], **{f"status_{k}": v for k, v in statuses.items()}}


async def test_two_processes_never_overspend_a_budget_or_a_wallet(cluster: Cluster):
    status, body = await cluster.call("POST", "/api/v1/auth/register", json={
        "email": ADMIN, "password": "correct horse", "name": "Race admin"})
    assert status == 201, body
    admin = body["access_token"]
    status, body = await cluster.call("PATCH", "/api/v1/admin/models/local/echo-1", admin, json=PRICES)
    assert status == 200, body

    # 1. A budget that fits exactly 50 requests; the wallet holds plenty.
    owner, project_id, key = await setup_project(cluster, admin, "budget", 1000 * COST)
    status, budget = await cluster.call("POST", f"/api/v1/projects/{project_id}/budgets", owner, json={
        "name": "race", "limit_micros": FITS * COST, "period": "total"})
    assert status == 201, budget
    results, monitor = await race(cluster, project_id, key)
    by_status = tally(results)
    settled = [b for s, b in results if s == 200]
    refused = [b for s, b in results if s != 200]
    assert by_status == {200: FITS, 402: CALLS - FITS}, by_status
    assert all(b["status"] == "settled" and b["receipt"]["cost_micros"] == COST for b in settled)
    assert {b["error"]["code"] for b in refused} == {"budget_exceeded"}
    assert all(b["error"]["details"]["request_id"].startswith("req_") for b in refused)
    assert monitor.violations == [] and monitor.samples > 10, (monitor.samples, monitor.violations[:3])
    final = await books(cluster, project_id)
    assert final["spent"] == FITS * COST and final["budget_reserved"] == 0 and final["reserved"] == 0
    assert final["balance"] == 1000 * COST - FITS * COST
    assert final["status_settled"] == FITS and final["status_rejected"] == CALLS - FITS
    print(f"\nbudget race: {by_status}, {monitor.samples} monitor samples, max wallet reserved "
          f"{monitor.max_reserved} µUSDC")

    # 2. A wallet funded for exactly 50 requests, no budget.
    _, project_id, key = await setup_project(cluster, admin, "wallet", FITS * COST)
    results, monitor = await race(cluster, project_id, key)
    by_status = tally(results)
    assert by_status == {200: FITS, 402: CALLS - FITS}, by_status
    assert {b["error"]["code"] for s, b in results if s != 200} == {"insufficient_funds"}
    assert monitor.violations == [] and monitor.samples > 10, (monitor.samples, monitor.violations[:3])
    final = await books(cluster, project_id)
    assert final["balance"] == 0 and final["reserved"] == 0
    assert final["status_settled"] == FITS and final["status_rejected"] == CALLS - FITS
    print(f"wallet race: {by_status}, {monitor.samples} monitor samples, max wallet reserved "
          f"{monitor.max_reserved} µUSDC")

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
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from sqlalchemy.engine import make_url

PG_URL = os.environ.get("SMARTSPACE_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SMARTSPACE_TEST_REDIS_URL", "")
ROOT = Path(__file__).resolve().parents[2]
ADMIN = "race-admin@smartspace.test"
FITS = 50
CALLS = 200
COST = 8 * 1000 + 1 * 2000  # "hi" (8 input tokens) + max_tokens=1 at the prices set below
PRICES = {"input_micros_per_mtok": 1_000_000_000, "output_micros_per_mtok": 2_000_000_000}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs SMARTSPACE_TEST_DATABASE_URL (PostgreSQL)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dsn(url) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def fresh_database():
    server = make_url(PG_URL)
    name = f"smartspace_race_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn(server))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield server.set(database=name)
    finally:
        admin = await asyncpg.connect(dsn(server))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


class Server:
    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self, http: aiohttp.ClientSession, within: float = 90.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} was not ready within {within}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self._log.close()


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
    servers: list[Server] = []
    connector = aiohttp.TCPConnector(limit=CALLS * 2)
    async with fresh_database() as database, aiohttp.ClientSession(connector=connector) as http:
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPACE_")}
            env.update(SMARTSPACE_DATABASE_URL=database.render_as_string(hide_password=False),
                       SMARTSPACE_JWT_SECRET="race-" + uuid.uuid4().hex * 2, SMARTSPACE_ADMIN_EMAILS=ADMIN,
                       SMARTSPACE_DATA_DIR=str(tmp_path / "data"), SMARTSPACE_LOG_LEVEL="WARNING",
                       SMARTSPACE_ACCESS_LOG="false", SMARTSPACE_DATABASE_POOL_SIZE="4", PYTHONUNBUFFERED="1")
            if REDIS_URL:
                env["SMARTSPACE_REDIS_URL"] = REDIS_URL
            migrate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.cli", "migrate", cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            output, _ = await asyncio.wait_for(migrate.communicate(), 120)
            assert migrate.returncode == 0, output.decode(errors="replace")
            servers += [Server("A", env, tmp_path), Server("B", env, tmp_path)]
            for server in servers:
                await server.ready(http)
            yield Cluster(servers, http, database)
        except BaseException:
            for server in servers:
                print(f"----- {server.name} log tail -----\n{server.tail()}", file=sys.stderr)
            raise
        finally:
            for server in servers:
                server.stop()


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
        conn = await asyncpg.connect(dsn(self.database))
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
    conn = await asyncpg.connect(dsn(cluster.database))
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

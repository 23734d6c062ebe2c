"""Reservations + settlements per second on PostgreSQL: one hot budget vs many budgets.

Each operation is the real money path of a spend request, through the container's units of work
(events appended to the hash-chained log in the same transactions):

    reserve tx  — insert the request, wallet hold, every applicable budget reserved (conditional UPDATEs)
    settle tx   — status transition, wallet capture + release of the rest, budgets settled, ledger entry

``--full`` adds the brain's read-only decision (``Spending.prepare``) in front of each reservation.

Scenarios: ``hot`` — every worker spends from ONE project (one wallet row, one budget row, one event
head: all contended); ``many`` — each worker has its own project. The baseline, measured in the same
run with the same workers and the same contention, is a bare transaction doing one INSERT and one
UPDATE … RETURNING (``INSERT INTO ledger_entries`` + ``UPDATE wallets SET balance = balance + 1``).

    .venv/bin/python bench/reserve.py [--seconds 5] [--workers 16] [--full]

The database: SMARTSPACE_BENCH_DATABASE_URL, else SMARTSPACE_TEST_DATABASE_URL, else the local
PostgreSQL test database. The script works in a fresh schema and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import msgspec
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.base import Actor, new_id, utcnow
from domain.decisions import Decision
from domain.providers import Usage
from domain.spend import SpendCommand, SpendRequest
from server.container import Container
from server.metrics import Metrics
from server.settings import Settings
from storage.bus import LocalBus
from storage.catalog import seed_catalog
from storage.db import Database
from storage.models import (
    agents,
    budgets,
    event_heads,
    ledger_entries,
    memberships,
    metadata,
    policies,
    projects,
    users,
    wallets,
)

URL = (os.environ.get("SMARTSPACE_BENCH_DATABASE_URL") or os.environ.get("SMARTSPACE_TEST_DATABASE_URL")
       or "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
MODEL = "local/echo-1"
MESSAGES = [{"role": "user", "content": "hi"}]


async def _on_server(statement: str) -> None:
    admin = Database(URL)
    try:
        async with admin.engine.begin() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await admin.dispose()


async def create_schema(prefix: str) -> str:
    """A fresh schema on the bench database (the scripts work in one and drop it at the end)."""
    schema = f"{prefix}{uuid.uuid4().hex[:10]}"
    await _on_server(f'CREATE SCHEMA "{schema}"')
    return schema


async def drop_schema(schema: str) -> None:
    await _on_server(f'DROP SCHEMA "{schema}" CASCADE')


async def make_project(db: Database, n: int) -> str:
    now = utcnow()
    user_id, project_id = new_id("usr"), new_id("prj")
    async with db.write() as conn:
        await conn.execute(sa.insert(users).values(id=user_id, email=f"bench-{n}-{uuid.uuid4().hex[:6]}@x.test",
                                                   name="bench", password_hash="x", created_at=now))
        await conn.execute(sa.insert(projects).values(id=project_id, name=f"bench {n}", owner_id=user_id,
                                                      created_at=now, updated_at=now))
        await conn.execute(sa.insert(memberships).values(project_id=project_id, user_id=user_id, role="owner",
                                                         created_at=now))
        await conn.execute(sa.insert(event_heads).values(project_id=project_id, seq=0, hash="0" * 64))
        await conn.execute(sa.insert(wallets).values(project_id=project_id, balance_micros=10**14,
                                                     reserved_micros=0, updated_at=now))
        await conn.execute(sa.insert(ledger_entries).values(
            id=new_id("led"), project_id=project_id, kind="admin_credit", amount_micros=10**14,
            balance_after_micros=10**14, memo="bench", actor="system:bench", created_at=now))
        await conn.execute(sa.insert(budgets).values(
            id=new_id("bud"), project_id=project_id, name="bench", period="month", limit_micros=10**13,
            spent_micros=0, reserved_micros=0, period_start=now.replace(day=1, hour=0, minute=0, second=0,
                                                                        microsecond=0),
            alert_thresholds=[50, 80, 100], alerted=[], active=True, created_at=now, updated_at=now))
        await conn.execute(sa.insert(agents).values(id=new_id("agt"), project_id=project_id, name="bench",
                                                    status="active", created_at=now))
    return project_id


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(workers: int, seconds: float, op) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - start)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    elapsed = time.perf_counter() - started
    return {"ops": len(latencies), "per_s": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "cpu_ms": (time.process_time() - cpu) * 1000 / max(1, len(latencies))}


def spend_decision(estimate: int) -> Decision:
    return Decision(outcome="APPROVED", reasons=[], risk_score=1.0, risk_factors=[], estimated_cost_micros=estimate,
                    model=MODEL, provider="local", upstream_model="echo-1", max_output_tokens=1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="also run the brain's decision before reserving")
    args = parser.parse_args()

    schema = await create_schema("bench_")
    db = Database(URL, schema=schema, pool_size=args.workers)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await seed_catalog(db)
        async with db.write() as conn:  # no platform-wide rate cap: the bench measures the money path
            await conn.execute(sa.insert(policies).values(
                project_id="*", version=1, rules={"max_rate_per_minute": None}, created_by="system:bench",
                created_at=utcnow()))
        metrics = Metrics()
        settings = Settings(data_dir="/tmp/smartspace-bench", jwt_secret="b" * 40, access_log=False)
        container = Container(settings, db, LocalBus(metrics), metrics=metrics)
        spending = container.spending  # on PostgreSQL: the hot path (storage/hot.py)
        # The generic path (SQLAlchemy units of work) for the "reserve tx + settle tx" rows.
        generic = Container(msgspec.structs.replace(settings, hot_path=False), db, LocalBus(metrics), metrics=metrics)
        hot = await make_project(db, 0)
        many = [await make_project(db, i + 1) for i in range(args.workers)]
        estimate = -(-(8 * 100_000 + 1 * 200_000) // 1_000_000)  # "hi" + 1 output token on local/echo-1
        decision = spend_decision(estimate)

        def project_for(scenario: str, i: int) -> str:
            return hot if scenario == "hot" else many[i]

        async def baseline(scenario: str, i: int) -> None:
            project_id = project_for(scenario, i)
            async with db.write() as conn:
                await conn.execute(sa.insert(ledger_entries).values(
                    id=new_id("led"), project_id=project_id, kind="bench", amount_micros=1, balance_after_micros=0,
                    memo="", actor="system:bench", created_at=utcnow()))
                await conn.execute(sa.update(wallets).where(wallets.c.project_id == project_id).values(
                    balance_micros=wallets.c.balance_micros + 1).returning(wallets.c.balance_micros))

        async def money_path(scenario: str, i: int) -> None:
            project_id = project_for(scenario, i)
            actor = Actor(kind="system", id="bench")
            now = utcnow()
            row = SpendRequest(
                id=new_id("req"), project_id=project_id, agent_id=None, key_id=None, actor=actor.label,
                source="api", operation="chat", model=MODEL, provider="local", status="rejected",
                decision={"outcome": "APPROVED"}, params={"upstream_model": "echo-1", "input_tokens": 8,
                                                          "max_output_tokens": 1, "messages": MESSAGES},
                metadata={}, estimated_cost_micros=estimate, reserved_micros=0, cost_micros=None, input_tokens=8,
                output_tokens=None, risk_score=1.0, budget_ids=[], error=None, idempotency_key=None, response=None,
                reservation_expires_at=None, approval_expires_at=None, resolved_by=None, tx_hash=None,
                settlement_batch_id=None, created_at=now, settled_at=None)
            cold = generic.spending
            cold._plan(row, decision, False, now)
            async with generic.uow(actor) as scope:
                row = await cold._reserve(scope, row, decision, False)
            await cold.settle(cold._prepared(row), Usage(input_tokens=8, output_tokens=1))

        async def full_path(scenario: str, i: int) -> None:
            project_id = project_for(scenario, i)
            actor = Actor(kind="system", id="bench")
            prepared = await spending.prepare(actor, SpendCommand(model=MODEL, messages=MESSAGES, max_tokens=1,
                                                                  project_id=project_id))
            await spending.settle(prepared, Usage(input_tokens=8, output_tokens=1))

        rows = []
        for scenario in ("hot", "many"):
            base = await drive(args.workers, args.seconds, lambda i, s=scenario: baseline(s, i))
            money = await drive(args.workers, args.seconds, lambda i, s=scenario: money_path(s, i))
            rows.append((scenario, "baseline INSERT+UPDATE tx", base, base))
            rows.append((scenario, "generic reserve + settle", money, base))
            if args.full:
                full = await drive(args.workers, args.seconds, lambda i, s=scenario: full_path(s, i))
                rows.append((scenario, "decide + hot reserve + settle", full, base))

        # The books must still balance after all that.
        async with db.engine.connect() as conn:
            for project_id in [hot, *many]:
                w = (await conn.execute(sa.select(wallets).where(wallets.c.project_id == project_id))).one()
                total = (await conn.execute(sa.select(sa.func.sum(ledger_entries.c.amount_micros)).where(
                    ledger_entries.c.project_id == project_id))).scalar_one()
                b = (await conn.execute(sa.select(budgets).where(budgets.c.project_id == project_id))).one()
                assert w.reserved_micros == 0 and b.reserved_micros == 0
                assert w.balance_micros == total and b.spent_micros + b.reserved_micros <= b.limit_micros

        print(f"PostgreSQL {db.url.host}, {args.workers} concurrent workers, {args.seconds:g}s per measurement")
        print(f"{'scenario':8} {'operation':28} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs baseline':>12} "
              f"{'cpu ms/op':>10}")
        for scenario, name, r, base in rows:
            print(f"{scenario:8} {name:28} {r['per_s']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                  f"{r['per_s'] / base['per_s']:11.2f}x {r['cpu_ms']:10.2f}")
    finally:
        await db.dispose()
        await drop_schema(schema)


if __name__ == "__main__":
    asyncio.run(main())

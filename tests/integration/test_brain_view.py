"""The brain through its real read-only view (storage/brain.py) on SQLite and PostgreSQL.

The view cannot write — the database itself refuses — and decisions read the real tables:
catalog, policies, wallet, budgets, the spend-request history (risk baseline) and the rate limiter.
On PostgreSQL the prefetch goes through a raw read-only asyncpg connection and the SQLAlchemy
read-only transaction is opened only on a cache miss (tests at the end).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import sqlalchemy as sa

from agentic.pipeline import decide
from domain.base import new_id
from domain.decisions import SpendInput
from domain.ratelimit import RateLimit
from server.container import Container
from server.settings import Settings
from storage.brain import SqlBrain, SqlBrainView, brain_view, decide_for
from storage.bus import LocalBus
from storage.catalog import seed_catalog
from storage.db import Database
from storage.models import budgets, catalog_models, policies, spend_requests
from storage.ratelimit import MemoryLimiter, RedisLimiter
from tests.conftest import PG_URL
from tests.factories import create_agent, create_key, register

USDC = 1_000_000


def postgresql_only(test):
    """Only the PostgreSQL variant of a test (the conftest ``backend`` fixture is parametrised over both)."""
    test = pytest.mark.parametrize("backend", ["postgresql"])(test)
    return pytest.mark.skipif(not PG_URL, reason="PostgreSQL only: SMARTSPACE_TEST_DATABASE_URL is not set")(test)


def spend(project_id: str, **kw) -> SpendInput:
    values = dict(project_id=project_id, key_id=None, agent_id=None, actor="user:x", model="openai/gpt-4o-mini",
                  operation="chat", input_tokens=1000, max_output_tokens=1000, metadata={})
    values.update(kw)
    return SpendInput(**values)


async def fund(container: Container, project_id: str, amount: int) -> None:
    async with container.uow() as scope:
        await scope.wallets.credit(project_id, amount, kind="admin_credit", ref=new_id("test"), memo="test")


async def add_history(db: Database, project_id: str, n: int, at: datetime, *, status: str = "settled",
                      model: str = "openai/gpt-4o-mini", cost: int = 1000, agent_id: str | None = None) -> None:
    rows = [dict(id=new_id("req"), project_id=project_id, agent_id=agent_id, actor="user:x", source="api",
                 operation="chat", model=model, provider=model.split("/")[0], status=status, params={},
                 metadata={}, estimated_cost_micros=cost, reserved_micros=0, cost_micros=cost, budget_ids=[],
                 created_at=at - timedelta(seconds=i)) for i in range(n)]
    async with db.write() as conn:
        await conn.execute(sa.insert(spend_requests), rows)


# ---------------------------------------------------------------- read-only, proved in the database
async def test_a_write_through_the_brains_view_fails_in_the_database(db):
    await seed_catalog(db)
    async with brain_view(db, MemoryLimiter()) as view:
        assert len(await view.models("openai/gpt-4o-mini")) == 1  # reading works
        with pytest.raises(sa.exc.DBAPIError) as exc:
            await (await view.connection()).execute(sa.update(catalog_models).values(input_micros_per_mtok=0))
    message = str(exc.value).lower()
    assert "readonly" in message or "read-only" in message or "read only" in message
    async with db.read() as conn:
        prices = (await conn.execute(sa.select(catalog_models.c.input_micros_per_mtok))).scalars().all()
    assert prices and 0 not in prices


async def test_inserts_are_refused_too_and_normal_writes_still_work_afterwards(db):
    async with db.read_only() as conn:
        view = SqlBrainView(conn, MemoryLimiter())
        with pytest.raises(sa.exc.DBAPIError):
            await view.conn.execute(sa.insert(policies).values(
                project_id="prj_x", version=1, rules={}, created_by="brain", created_at=datetime.now(UTC)))
    # the pooled connection is writable again for the next unit of work
    async with db.write() as conn:
        await conn.execute(sa.insert(policies).values(
            project_id="prj_x", version=1, rules={}, created_by="test", created_at=datetime.now(UTC)))
    async with db.read() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(policies))).scalar_one() == 1


@pytest.mark.parametrize("backend", ["sqlite"])  # SQLite's own reader threads (PostgreSQL: the test above)
async def test_a_write_through_the_sqlite_reader_fails_in_the_database(db):
    """SQLite: the brain's prefetch connection (``Database.sqlite_reader()``) is ``query_only`` for good."""
    reader = db.sqlite_reader()
    assert reader is not None
    await seed_catalog(db)
    for _ in range(3):  # every pooled connection, each time it is handed out again
        assert await reader.run(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(
            catalog_models)).scalar_one()) > 0  # reading works
        with pytest.raises(sa.exc.DBAPIError) as exc:
            await reader.run(lambda conn: conn.execute(sa.update(catalog_models).values(input_micros_per_mtok=0)))
        assert read_only_message(exc.value)
    async with db.read() as conn:
        prices = (await conn.execute(sa.select(catalog_models.c.input_micros_per_mtok))).scalars().all()
    assert prices and 0 not in prices


# ---------------------------------------------------------------- decisions from the real tables
async def test_a_funded_project_is_approved_and_an_empty_wallet_is_not(client, container):
    owner = await register(client)
    now = datetime.now(UTC)
    decision = await container.brain.decide(spend(owner.project_id), now)
    assert decision.outcome == "REJECTED" and decision.error_code == "insufficient_funds"
    await fund(container, owner.project_id, 10 * USDC)
    decision = await container.brain.decide(spend(owner.project_id), now)
    assert decision.outcome == "APPROVED", decision.reasons
    assert decision.estimated_cost_micros == 750 and decision.model == "openai/gpt-4o-mini"


async def test_bare_ids_resolve_through_the_catalog_table(client, container):
    owner = await register(client)
    await fund(container, owner.project_id, USDC)
    decision = await container.brain.decide(spend(owner.project_id, model="claude-3-haiku"), datetime.now(UTC))
    assert decision.outcome == "APPROVED" and decision.model == "anthropic/claude-3-haiku"
    decision = await container.brain.decide(spend(owner.project_id, model="anthropic/gpt-4o"), datetime.now(UTC))
    assert decision.error_code == "not_found"


async def test_the_saved_policy_is_enforced_with_its_version(client, container):
    owner = await register(client)
    await fund(container, owner.project_id, USDC)
    resp = await client.put(f"/api/v1/projects/{owner.project_id}/policy", headers=owner.headers,
                            json={"blocked_providers": ["openai"]})
    assert resp.status == 200
    decision = await container.brain.decide(spend(owner.project_id), datetime.now(UTC))
    assert decision.outcome == "REJECTED" and decision.reasons[0].code == "provider_blocked"
    assert decision.policy_version == 1
    decision = await container.brain.decide(spend(owner.project_id, model="local/echo-1"), datetime.now(UTC))
    assert decision.outcome == "APPROVED" and decision.policy_version == 1


async def test_the_system_policy_is_read_from_the_table(client, container):
    admin = await register(client, email="admin@smartspace.test")
    await fund(container, admin.project_id, USDC)
    resp = await client.put("/api/v1/admin/policy", headers=admin.headers, json={"blocked_models": ["local/echo-1"]})
    assert resp.status == 200
    decision = await container.brain.decide(spend(admin.project_id, model="local/echo-1"), datetime.now(UTC))
    assert decision.reasons[0].code == "system_model_blocked"


async def test_budgets_for_the_project_and_its_agents(client, container):
    owner = await register(client)
    agent = await create_agent(client, owner)
    other = await create_agent(client, owner)
    await fund(container, owner.project_id, USDC)
    now = datetime.now(UTC)
    rows = [dict(id=bid, project_id=owner.project_id, agent_id=aid, name=bid, period="total", limit_micros=limit,
                 spent_micros=spent, reserved_micros=0, period_start=now, alert_thresholds=[], alerted=[],
                 created_at=now, updated_at=now)
            for bid, aid, limit, spent in (("bud_project", None, 10_000, 9_250), ("bud_agent", agent["id"], 750, 0),
                                           ("bud_other", other["id"], 1, 1))]
    async with container.db.write() as conn:
        await conn.execute(sa.insert(budgets), rows)
    decision = await container.brain.decide(spend(owner.project_id, agent_id=agent["id"]), now)
    assert decision.outcome == "APPROVED", decision.reasons
    assert decision.budget_ids == ["bud_agent", "bud_project"]
    decision = await container.brain.decide(spend(owner.project_id, agent_id=agent["id"], input_tokens=1001), now)
    assert decision.error_code == "budget_exceeded"
    assert {r.message.split("'")[1] for r in decision.reasons} == {"bud_agent", "bud_project"}


async def test_revoked_keys_and_agent_keys(client, container):
    owner = await register(client)
    agent = await create_agent(client, owner)
    key = await create_key(client, owner, agent_id=agent["id"])
    await fund(container, owner.project_id, USDC)
    decision = await container.brain.decide(spend(owner.project_id, key_id=key["id"]), datetime.now(UTC))
    assert decision.outcome == "APPROVED"
    resp = await client.delete(f"/api/v1/projects/{owner.project_id}/keys/{key['id']}", headers=owner.headers)
    assert resp.status == 200
    decision = await container.brain.decide(spend(owner.project_id, key_id=key["id"]), datetime.now(UTC))
    assert decision.reasons[0].code == "key_revoked"


@pytest.mark.parametrize("samples,fires", [(10, True), (9, False)])
async def test_the_risk_baseline_counts_from_ten_settled_requests(client, container, samples, fires):
    owner = await register(client)
    await fund(container, owner.project_id, USDC)
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    await add_history(container.db, owner.project_id, samples, now - timedelta(days=1))
    await add_history(container.db, owner.project_id, 5, now - timedelta(days=31))  # outside the window
    await add_history(container.db, owner.project_id, 3, now - timedelta(hours=1), status="rejected")
    decision = await container.brain.decide(spend(owner.project_id, model="anthropic/claude-3-haiku"), now)
    factors = {f.type for f in decision.risk_factors}
    assert ("provider" in factors) is fires and ("model" in factors) is fires
    assert "rejections" in factors  # 3 in the last 24 h: +1
    expected = 1.0 + 1.0 + (1.0 + 0.5 if fires else 0)
    assert decision.risk_score == expected


async def test_activity_figures_come_from_the_history(client, container):
    owner = await register(client)
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    await add_history(container.db, owner.project_id, 12, now - timedelta(days=2), cost=2000, agent_id=None)
    await add_history(container.db, owner.project_id, 4, now - timedelta(minutes=5), cost=500)
    await add_history(container.db, owner.project_id, 2, now - timedelta(minutes=5), status="rejected")
    async with brain_view(container.db, MemoryLimiter()) as view:
        activity = await view.activity(owner.project_id, now)
    assert activity.samples == 16
    assert activity.avg_cost_micros == (12 * 2000 + 4 * 500) // 16
    assert activity.requests_today == 6 and activity.spent_today_micros == 2000
    assert activity.recent_rejections == 2
    assert activity.providers == ["openai"] and activity.models == ["openai/gpt-4o-mini"]
    assert activity.hours == [11, 12]


async def test_rate_limits_are_peeked_from_the_limiter(client, container):
    owner = await register(client)
    await fund(container, owner.project_id, USDC)
    await client.put(f"/api/v1/projects/{owner.project_id}/policy", headers=owner.headers,
                     json={"rate_limits": {"project": {"per_minute": 2}}})
    now = datetime.now(UTC)
    decision = await container.brain.decide(spend(owner.project_id), now)
    assert decision.outcome == "APPROVED"
    window = RateLimit(key=f"project:{owner.project_id}", window_seconds=60, limit=2)
    assert window in decision.rate_limits
    await container.limiter.acquire(decision.rate_limits, now)
    await container.limiter.acquire(decision.rate_limits, now)
    decision = await container.brain.decide(spend(owner.project_id), now)
    assert decision.outcome == "REJECTED" and decision.error_code == "rate_limited"
    assert decision.retry_after_seconds == 60


async def test_decide_for_opens_a_view_and_runs_the_pipeline(client, container):
    await register(client)
    decision = await decide_for(container.db, MemoryLimiter(), spend("prj_nope"),
                                datetime.now(UTC), decide=decide)
    assert decision.reasons[0].code == "project_not_found"


async def test_the_container_uses_redis_for_rate_limits_when_configured(db, tmp_path, redis_url):
    settings = Settings(data_dir=str(tmp_path), jwt_secret="x" * 40, redis_url=redis_url)
    container = Container(settings, db, LocalBus(None))
    try:
        assert isinstance(container.limiter, RedisLimiter)
        assert container.spending.limiter is container.limiter
        assert isinstance(container.brain, SqlBrain) and container.spending.brain is container.brain
    finally:
        await container.limiter.close()


# ---------------------------------------------------------------- PostgreSQL: raw prefetch, lazy SQLAlchemy
def read_only_message(exc: BaseException) -> bool:
    message = str(exc).lower()
    return "readonly" in message or "read-only" in message or "read only" in message


@postgresql_only
async def test_a_write_through_the_brains_raw_connection_fails_in_the_database(db):
    await seed_catalog(db)
    async with brain_view(db, MemoryLimiter()) as view:
        for _ in range(3):  # every pooled session, each time it is handed out again
            async with view.raw() as conn:
                assert await conn.fetchval("SHOW transaction_read_only") == "on"
                assert await conn.fetchval("SELECT count(*) FROM catalog_models") > 0  # reading works
                with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError) as exc:
                    await conn.execute("UPDATE catalog_models SET input_micros_per_mtok = 0")
                assert read_only_message(exc.value)
                with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
                    await conn.execute("INSERT INTO policies (project_id, version, rules, created_by, created_at) "
                                       "VALUES ('prj_x', 1, '{}', 'brain', now())")
    async with db.read() as conn:
        prices = (await conn.execute(sa.select(catalog_models.c.input_micros_per_mtok))).scalars().all()
        assert (await conn.execute(sa.select(sa.func.count()).select_from(policies))).scalar_one() == 0
    assert prices and 0 not in prices


async def test_the_raw_prefetch_reads_what_the_sqlalchemy_prefetch_reads(client, container):
    """PostgreSQL: the raw asyncpg prefetch; SQLite: the same statement on the synchronous reader."""
    owner = await register(client)
    agent = await create_agent(client, owner)
    other = await create_agent(client, owner)
    key = await create_key(client, owner, agent_id=agent["id"])
    plain_key = await create_key(client, owner)
    await fund(container, owner.project_id, 3 * USDC)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    rows = [dict(id=bid, project_id=owner.project_id, agent_id=aid, name=bid, period="month", limit_micros=USDC,
                 spent_micros=spent, reserved_micros=7, period_start=start, alert_thresholds=[], alerted=[],
                 active=active, created_at=start, updated_at=start)
            for bid, aid, spent, active in (("bud_b", None, 5, True), ("bud_a", agent["id"], 6, True),
                                            ("bud_c", other["id"], 8, True), ("bud_off", None, 9, False))]
    async with container.db.write() as conn:
        await conn.execute(sa.insert(budgets), rows)
    db, limiter = container.db, MemoryLimiter()
    requests = [spend(owner.project_id), spend(owner.project_id, key_id=key["id"]),
                spend(owner.project_id, key_id=key["id"], agent_id=other["id"]),
                spend(owner.project_id, key_id=plain_key["id"]), spend(owner.project_id, agent_id="agt_nope"),
                spend(owner.project_id, key_id="key_nope"), spend("prj_nope", key_id=key["id"])]
    for req in requests:
        async with brain_view(db, limiter) as raw_view:
            await raw_view.prefetch(req)
            assert raw_view.conn is None  # the prefetch did not need the SQLAlchemy connection
        async with db.read_only() as conn:
            orm_view = SqlBrainView(conn, limiter)
            await orm_view.prefetch(req)
        assert raw_view._snap == orm_view._snap, req
        for budget in raw_view._snap.get("budgets", []):
            assert budget.period_start == start and budget.period_start.tzinfo is UTC
    snap = raw_view._snap  # the last request named an unknown project
    assert "project" not in snap and snap["agent_id"] is None
    async with brain_view(db, limiter) as view:
        await view.prefetch(spend(owner.project_id, key_id=key["id"]))
        snap = view._snap
    assert snap["key"].agent_id == agent["id"] and snap["agent_id"] == agent["id"] and not snap["key"].revoked
    assert snap["agent"].id == agent["id"] and snap["wallet"].balance_micros == 3 * USDC
    assert [b.id for b in snap["budgets"]] == ["bud_a", "bud_b", "bud_c"]  # active ones, by id


class SqlCheckouts:
    """Counts SQLAlchemy pool checkouts made by the current task (the app's background tasks are not counted)."""

    def __init__(self, db: Database) -> None:
        self.engine = db.engine.sync_engine
        self.task = asyncio.current_task()
        self.count = 0

    def _on_checkout(self, *_: object) -> None:
        if asyncio.current_task() is self.task:
            self.count += 1

    def __enter__(self) -> SqlCheckouts:
        sa.event.listen(self.engine, "checkout", self._on_checkout)
        return self

    def __exit__(self, *_: object) -> None:
        sa.event.remove(self.engine, "checkout", self._on_checkout)


@postgresql_only
async def test_a_warm_decision_on_postgresql_opens_no_sqlalchemy_connection(client, container):
    owner = await register(client)
    agent = await create_agent(client, owner)
    key = await create_key(client, owner, agent_id=agent["id"])
    container.brain.cache.ttl = 60.0  # the cache stays warm however slow the machine
    now = datetime.now(UTC)
    req = spend(owner.project_id, key_id=key["id"])
    with SqlCheckouts(container.db) as checkouts:
        decision = await container.brain.decide(req, now)  # cold: policies, catalog, activity are read
    assert decision.error_code == "insufficient_funds" and checkouts.count == 1
    await fund(container, owner.project_id, USDC)
    with SqlCheckouts(container.db) as checkouts:
        decision = await container.brain.decide(req, now)  # warm: the raw prefetch only, money read fresh
        again = await container.brain.decide(req, now)
    assert decision.outcome == "APPROVED" and again.outcome == "APPROVED", decision.reasons
    assert checkouts.count == 0


@postgresql_only
async def test_a_cache_miss_on_postgresql_opens_the_read_only_connection_and_closes_it(client, container):
    owner = await register(client)
    await fund(container, owner.project_id, USDC)
    container.brain.cache.ttl = 60.0
    now = datetime.now(UTC)
    pool = container.db.engine.pool
    assert (await container.brain.decide(spend(owner.project_id), now)).outcome == "APPROVED"  # warm
    resp = await client.put(f"/api/v1/projects/{owner.project_id}/policy", headers=owner.headers,
                            json={"blocked_providers": ["openai"]})  # policy.updated: the policies are dropped
    assert resp.status == 200
    in_use = pool.checkedout()
    with SqlCheckouts(container.db) as checkouts:
        decision = await container.brain.decide(spend(owner.project_id), now)
    assert decision.reasons[0].code == "provider_blocked" and decision.policy_version == 1
    assert checkouts.count == 1 and pool.checkedout() == in_use  # opened once, returned to the pool
    container.brain.cache.drop()  # everything missing: one connection serves every read
    with SqlCheckouts(container.db) as checkouts:
        decision = await container.brain.decide(spend(owner.project_id, model="local/echo-1"), now)
    assert decision.outcome == "APPROVED" and decision.policy_version == 1, decision.reasons
    assert checkouts.count == 1 and pool.checkedout() == in_use
    with SqlCheckouts(container.db) as checkouts:  # warm again
        decision = await container.brain.decide(spend(owner.project_id, model="local/echo-1"), now)
    assert decision.outcome == "APPROVED" and checkouts.count == 0

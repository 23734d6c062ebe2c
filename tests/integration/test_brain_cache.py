"""The brain's per-process cache (policies, catalog, activity): a change applies at once.

The cache keeps entries up to two seconds, but policy.updated / catalog.updated events drop them, so
the very next decision after a PUT / PATCH sees the change; money (wallet, budgets) is never cached."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from storage.brain import BrainCache
from tests.factories import register
from tests.integration.test_brain_view import USDC, fund, spend


async def test_a_policy_change_applies_to_the_next_decision(client, container):
    owner = await register(client)
    await fund(container, owner.project_id, USDC)
    decision = await container.brain.decide(spend(owner.project_id), datetime.now(UTC))
    assert decision.outcome == "APPROVED" and decision.policy_version == 0  # the default policy, now cached
    resp = await client.put(f"/api/v1/projects/{owner.project_id}/policy", headers=owner.headers,
                            json={"blocked_providers": ["openai"]})
    assert resp.status == 200
    decision = await container.brain.decide(spend(owner.project_id), datetime.now(UTC))
    assert decision.outcome == "REJECTED" and decision.reasons[0].code == "provider_blocked"
    assert decision.policy_version == 1


async def test_a_system_policy_change_applies_to_the_next_decision(client, container):
    admin = await register(client, email="admin@smartspace.test")
    await fund(container, admin.project_id, USDC)
    decision = await container.brain.decide(spend(admin.project_id, model="local/echo-1"), datetime.now(UTC))
    assert decision.outcome == "APPROVED"
    resp = await client.put("/api/v1/admin/policy", headers=admin.headers, json={"blocked_models": ["local/echo-1"]})
    assert resp.status == 200
    decision = await container.brain.decide(spend(admin.project_id, model="local/echo-1"), datetime.now(UTC))
    assert decision.reasons[0].code == "system_model_blocked"


async def test_a_catalog_price_change_applies_to_the_next_estimate(client, container):
    admin = await register(client, email="admin@smartspace.test")
    await fund(container, admin.project_id, USDC)
    before = await container.brain.decide(spend(admin.project_id), datetime.now(UTC))
    assert before.estimated_cost_micros == 750 and before.input_micros_per_mtok == 150_000
    resp = await client.patch("/api/v1/admin/models/openai/gpt-4o-mini", headers=admin.headers,
                              json={"input_micros_per_mtok": 300_000})
    assert resp.status == 200
    after = await container.brain.decide(spend(admin.project_id), datetime.now(UTC))
    assert after.input_micros_per_mtok == 300_000 and after.estimated_cost_micros == 900


async def test_wallet_funds_are_never_cached(client, container):
    owner = await register(client)
    now = datetime.now(UTC)
    decision = await container.brain.decide(spend(owner.project_id), now)
    assert decision.error_code == "insufficient_funds"
    await fund(container, owner.project_id, USDC)
    assert (await container.brain.decide(spend(owner.project_id), now)).outcome == "APPROVED"


async def test_entries_expire_and_a_read_racing_an_invalidation_is_not_kept():
    clock = [0.0]
    cache = BrainCache(ttl=2.0, clock=lambda: clock[0])
    reads = []

    async def fetch():
        reads.append(1)
        return len(reads)

    assert await cache.get("policy", "p", fetch) == 1
    assert await cache.get("policy", "p", fetch) == 1  # cached
    clock[0] = 2.5
    assert await cache.get("policy", "p", fetch) == 2  # expired: read again
    gate = asyncio.Event()

    async def slow():
        await gate.wait()
        return "stale"

    task = asyncio.create_task(cache.get("catalog", "m", slow))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cache.get("catalog", "m", fetch))  # joins the read in flight
    await asyncio.sleep(0)
    await cache.on_event(type("E", (), {"type": "catalog.updated"})())  # changed while the read ran
    gate.set()
    assert await task == "stale"
    await waiter
    assert await cache.get("catalog", "m", fetch) not in ("stale",)  # the racing read was not stored

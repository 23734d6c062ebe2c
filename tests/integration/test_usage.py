"""Usage: totals and breakdowns by model, agent and day, with estimate-vs-actual variance."""

from __future__ import annotations

from domain.base import utcnow
from tests.factories import add_member, bearer, create_agent, create_key, register
from tests.integration.spend_helpers import COST, fix_prices, funded_project, own_spend, spend


async def test_usage_totals_and_breakdowns(client, db):
    admin, alice = await funded_project(client, 5_000_000)
    await fix_prices(client, admin, "local/embed-1", 1_000_000_000, 0)
    agent = await create_agent(client, alice)
    agent_key = await create_key(client, alice, agent_id=agent["id"])
    costs = []
    for _ in range(2):
        status, body = await own_spend(client, alice)  # exact: estimate == actual == COST
        assert status == 200
        costs.append(body["cost_micros"])
    status, body = await spend(client, bearer(agent_key["key"]), max_tokens=50)  # over-estimated
    assert status == 200
    agent_cost, agent_estimate = body["cost_micros"], body["estimated_cost_micros"]
    assert agent_cost < agent_estimate
    status, body = await spend(client, bearer(agent_key["key"]), {"model": "local/embed-1", "operation": "embedding",
                                                                   "input": "hello world", "messages": None})
    assert status == 200, body
    embed_cost = body["cost_micros"]
    assert (await own_spend(client, alice, model="local/nope"))[0] == 404  # rejected: not in the totals

    resp = await client.get(f"/api/v1/projects/{alice.project_id}/usage", headers=alice.headers)
    assert resp.status == 200
    usage = await resp.json()
    total = sum(costs) + agent_cost + embed_cost
    estimated = 2 * COST + agent_estimate + body["estimated_cost_micros"]
    assert usage["totals"]["requests"] == 4 and usage["totals"]["cost_micros"] == total
    assert usage["totals"]["estimated_cost_micros"] == estimated
    assert usage["totals"]["variance_micros"] == estimated - total
    assert usage["totals"]["variance_pct"] == round((estimated - total) * 100 / estimated, 2)
    by_model = {r["key"]: r for r in usage["by_model"]}
    assert by_model["local/echo-1"]["requests"] == 3 and by_model["local/embed-1"]["cost_micros"] == embed_cost
    by_agent = {r["key"]: r for r in usage["by_agent"]}
    assert by_agent[agent["id"]]["cost_micros"] == agent_cost + embed_cost
    assert by_agent[None]["cost_micros"] == 2 * COST and by_agent[None]["variance_micros"] == 0
    assert [r["key"] for r in usage["by_day"]] == [utcnow().strftime("%Y-%m-%d")]
    assert usage["by_day"][0]["cost_micros"] == total
    assert usage["requests_by_status"] == {"settled": 4, "rejected": 1}
    assert usage["ledger"] == {"admin_credit": 5_000_000, "spend": -total}

    window = await client.get(
        f"/api/v1/projects/{alice.project_id}/usage?since=2020-01-01T00:00:00Z&until=2020-02-01T00:00:00Z",
        headers=alice.headers)
    assert window.status == 200
    body = await window.json()
    assert body["totals"]["requests"] == 0 and body["by_model"] == [] and body["totals"]["variance_pct"] is None


async def test_usage_access_and_validation(client, db):
    _, alice = await funded_project(client)
    viewer = await register(client)
    await add_member(client, alice, viewer, "viewer")
    assert (await client.get(f"/api/v1/projects/{alice.project_id}/usage", headers=viewer.headers)).status == 200
    eve = await register(client)
    assert (await client.get(f"/api/v1/projects/{alice.project_id}/usage", headers=eve.headers)).status == 404
    for query in ("since=yesterday", "since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
                  "since=2020-01-01T00:00:00Z&until=2026-01-01T00:00:00Z"):
        resp = await client.get(f"/api/v1/projects/{alice.project_id}/usage?{query}", headers=alice.headers)
        assert resp.status == 422, query

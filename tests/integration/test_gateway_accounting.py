"""Accounting: after N mixed gateway calls (JSON and streaming, OpenAI and Anthropic upstreams, embeddings,
upstreams that omit usage), the ledger, the budgets and GET /usage agree to the micro with the fake
upstream's reported usage — and with the cost each response carried."""

from __future__ import annotations

import re

import pytest

from domain.catalog import SEED, cost_micros
from tests.fakes.gateway import start_gateway
from tests.fakes.upstream import Behavior

PRICES = {m.id: m for m in SEED}
COMMENT = re.compile(rb": smartspace cost_micros=(\d+) request_id=(\S+)")


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics)
    yield env
    await env.close()


async def call(gw, model: str, *, stream: bool = False, embedding: bool = False, i: int = 0) -> tuple[str, int]:
    headers = {"Authorization": f"Bearer {gw.key['key']}"}
    if embedding:
        resp = await gw.client.post("/v1/embeddings", headers=headers,
                                    json={"model": model, "input": [f"text number {i}", "x" * i]})
        assert resp.status == 200, await resp.text()
        return resp.headers["x-smartspace-request-id"], int(resp.headers["x-smartspace-cost-micros"])
    body = {"model": model, "messages": [{"role": "user", "content": f"question {i} " + "word " * i}],
            "max_tokens": 40, "stream": stream}
    resp = await gw.client.post("/v1/chat/completions", headers=headers, json=body)
    assert resp.status == 200, await resp.text()
    if not stream:
        await resp.read()
        return resp.headers["x-smartspace-request-id"], int(resp.headers["x-smartspace-cost-micros"])
    found = COMMENT.search(await resp.read())
    assert found is not None
    assert found.group(2).decode() == resp.headers["x-smartspace-request-id"]
    return found.group(2).decode(), int(found.group(1))


async def test_ledger_budgets_and_usage_agree_with_reported_usage(gw):
    resp = await gw.client.post(f"/api/v1/projects/{gw.project_id}/budgets", headers=gw.owner.headers,
                                json={"name": "month", "limit_micros": 40_000_000, "period": "month"})
    assert resp.status == 201, await resp.text()
    budget_id = (await resp.json())["id"]
    start = await gw.wallet()

    plan = []  # (model, stream, embedding, omit_usage)
    for i in range(16):
        model = ["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku", "openai/gpt-4o"][i % 3]
        plan.append((model, i % 2 == 1, False, i % 7 == 3))
    plan += [("openai/text-embedding-3-small", False, True, False), ("openai/text-embedding-3-small", False, True,
                                                                     True), ("local/echo-1", True, False, False)]
    total = 0
    expected: dict[str, int] = {}
    for i, (model, stream, embedding, omit) in enumerate(plan):
        reported_before = len(gw.fake.reported)
        if omit:
            gw.fake.plan(Behavior(omit_usage=True))
        request_id, cost = await call(gw, model, stream=stream, embedding=embedding, i=i)
        total += cost
        assert cost > 0, f"call {i} ({model}) was priced at zero"
        if not omit and not model.startswith("local/"):
            reported = gw.fake.reported[reported_before]
            assert cost == cost_micros(PRICES[model], reported.input_tokens, reported.output_tokens), (i, model)
        expected[request_id] = cost

    end = await gw.wallet()
    assert end.reserved_micros == 0
    assert start.balance_micros - end.balance_micros == total

    # the ledger: one spend entry per request, summing to the same total
    resp = await gw.client.get(f"/api/v1/projects/{gw.project_id}/usage", headers=gw.owner.headers)
    assert resp.status == 200, await resp.text()
    usage = await resp.json()
    assert usage["totals"]["cost_micros"] == total
    assert usage["totals"]["requests"] == len(plan)
    assert -usage["ledger"].get("spend", 0) == total
    by_model = {row["key"]: row["cost_micros"] for row in usage["by_model"]}
    assert sum(by_model.values()) == total

    resp = await gw.client.get(f"/api/v1/projects/{gw.project_id}/budgets/{budget_id}", headers=gw.owner.headers)
    budget = await resp.json()
    assert budget["spent_micros"] == total and budget["reserved_micros"] == 0

    for request_id, cost in expected.items():
        resp = await gw.client.get(f"/api/v1/requests/{request_id}", headers=gw.owner.headers)
        row = await resp.json()
        assert row["status"] == "settled" and row["cost_micros"] == cost and row["source"] == "gateway"

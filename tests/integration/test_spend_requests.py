"""POST /api/v1/requests: decide → reserve → execute (local provider) → settle; rejections; replays."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from domain.base import Actor, utcnow
from domain.spend import SpendCommand
from storage.models import budgets, catalog_models, spend_requests, wallets
from tests.factories import add_member, bearer, create_key, register
from tests.integration.spend_helpers import (
    COST,
    MESSAGES,
    assert_books_balance,
    create_budget,
    events,
    funded_project,
    get_budget,
    own_spend,
    set_policy,
    spend,
    wallet,
)


async def test_an_approved_request_executes_and_settles(client, db):
    _, alice = await funded_project(client, 1_000_000)
    key = await create_key(client, alice)
    status, body = await spend(client, bearer(key["key"]), metadata={"task": "greet"})
    assert status == 200, body
    assert body["status"] == "settled" and body["id"].startswith("req_")
    decision = body["decision"]
    assert decision["outcome"] == "APPROVED" and decision["estimated_cost_micros"] == COST
    assert {"reasons", "risk_score", "risk_factors"} <= decision.keys()
    assert body["response"]["object"] == "chat.completion"
    assert body["response"]["choices"][0]["message"]["role"] == "assistant"
    receipt = body["receipt"]
    assert receipt == {"request_id": body["id"], "model": "local/echo-1", "input_tokens": 8, "output_tokens": 1,
                       "estimated_cost_micros": COST, "cost_micros": COST, "settled_at": receipt["settled_at"],
                       "tx_hash": None, "fee_micros": 0}
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000 - COST, 0)
    ledger = await (await client.get(f"/api/v1/projects/{alice.project_id}/wallet/ledger",
                                     headers=alice.headers)).json()
    assert ledger["items"][0]["kind"] == "spend" and ledger["items"][0]["amount_micros"] == -COST
    assert ledger["items"][0]["ref"] == body["id"]
    audit = await (await client.get(f"/api/v1/projects/{alice.project_id}/audit?limit=100",
                                    headers=alice.headers)).json()
    types = [e["type"] for e in reversed(audit["items"]) if e["data"].get("request_id") == body["id"]
             or e["data"].get("change", {}).get("ref") == body["id"]]
    assert types == ["request.created", "request.decided", "wallet.updated", "wallet.updated", "request.settled"]
    settled = (await events(client, alice, "request.settled"))[0]["data"]
    assert settled["receipt"]["cost_micros"] == COST
    again = await (await client.get(f"/api/v1/requests/{body['id']}", headers=alice.headers)).json()
    assert again["status"] == "settled" and again["receipt"]["cost_micros"] == COST
    await assert_books_balance(db, alice.project_id)


async def test_actual_cost_below_the_estimate_releases_the_rest(client, db):
    _, alice = await funded_project(client, 1_000_000)
    budget = await create_budget(client, alice, 500_000, "month")
    status, body = await own_spend(client, alice, max_tokens=100)
    assert status == 200, body
    estimate, cost = body["estimated_cost_micros"], body["cost_micros"]
    assert estimate == 8 * 1000 + 100 * 2000 and cost < estimate
    assert cost == 8 * 1000 + body["output_tokens"] * 2000
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000 - cost, 0)
    b = await get_budget(client, alice, budget["id"])
    assert (b["spent_micros"], b["reserved_micros"]) == (cost, 0)
    assert body["budget_ids"] == [budget["id"]]
    await assert_books_balance(db, alice.project_id)


async def test_insufficient_funds_is_a_402_with_the_request_id_and_holds_nothing(client, db):
    _, alice = await funded_project(client, COST - 1)
    status, body = await own_spend(client, alice)
    assert status == 402 and body["error"]["code"] == "insufficient_funds"
    request_id = body["error"]["details"]["request_id"]
    stored = await (await client.get(f"/api/v1/requests/{request_id}", headers=alice.headers)).json()
    assert stored["status"] == "rejected" and stored["decision"]["outcome"] == "REJECTED"
    assert stored["reserved_micros"] == 0
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (COST - 1, 0)
    await assert_books_balance(db, alice.project_id)


async def test_budget_exceeded_policy_violation_unknown_model_and_rate_limit(client, db):
    _, alice = await funded_project(client, 1_000_000)
    budget = await create_budget(client, alice, COST, "day")
    assert (await own_spend(client, alice))[0] == 200
    status, body = await own_spend(client, alice)
    assert status == 402 and body["error"]["code"] == "budget_exceeded"
    assert body["error"]["details"]["request_id"].startswith("req_")
    await client.delete(f"/api/v1/projects/{alice.project_id}/budgets/{budget['id']}", headers=alice.headers)

    await set_policy(client, alice, blocked_models=["local/echo-1"])
    status, body = await own_spend(client, alice)
    assert status == 403 and body["error"]["code"] == "policy_violation"

    status, body = await own_spend(client, alice, model="local/no-such-model")
    assert status == 404 and body["error"]["code"] == "not_found"

    await set_policy(client, alice, rate_limits={"project": {"per_minute": 1}})
    assert (await own_spend(client, alice))[0] == 200
    resp = await client.post("/api/v1/requests", headers=alice.headers,
                             json={"model": "local/echo-1", "prompt": "hi", "max_tokens": 1,
                                   "project_id": alice.project_id})
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "rate_limited"
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000 - 2 * COST, 0)
    rejected = await (await client.get(f"/api/v1/projects/{alice.project_id}/requests?status=rejected",
                                       headers=alice.headers)).json()
    assert len(rejected["items"]) == 4
    await assert_books_balance(db, alice.project_id)


async def test_bad_input_is_refused_and_changes_nothing(client, db):
    _, alice = await funded_project(client, 1_000_000)
    for bad in ({"model": "local/echo-1", "project_id": alice.project_id},  # no messages
                {"model": "local/echo-1", "messages": [{"role": "user", "content": "x"}]},  # user token, no project
                {"model": "local/echo-1", "prompt": "x", "max_tokens": 0, "project_id": alice.project_id},
                {"model": "local/echo-1", "prompt": "x", "project_id": alice.project_id, "surprise": 1}):
        resp = await client.post("/api/v1/requests", json=bad, headers=alice.headers)
        assert resp.status in (400, 422), (bad, await resp.text())
        assert (await resp.json())["error"]["code"] == "invalid_request"
    eve = await register(client)
    status, _ = await spend(client, eve.headers, project_id=alice.project_id)
    assert status == 404
    viewer = await register(client)
    await add_member(client, alice, viewer, "viewer")
    status, _ = await spend(client, viewer.headers, project_id=alice.project_id)
    assert status == 403
    async with db.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(spend_requests))).scalar_one() == 0
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000


async def test_idempotent_replay_returns_the_first_response_and_charges_once(client, db):
    _, alice = await funded_project(client, 1_000_000)
    headers = {**alice.headers, "Idempotency-Key": "run-1"}
    body = {"model": "local/echo-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "project_id": alice.project_id}
    first = await client.post("/api/v1/requests", json=body, headers=headers)
    assert first.status == 200
    first_body = await first.json()
    again = await client.post("/api/v1/requests", json=body, headers=headers)
    assert again.status == 200 and await again.json() == first_body
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await client.post("/api/v1/requests", json={**body, "max_tokens": 2}, headers=headers)
    assert other.status == 409 and (await other.json())["error"]["code"] == "conflict"
    w = await wallet(client, alice)
    assert w["balance_micros"] == 1_000_000 - COST
    assert first_body["idempotency_key"] == "run-1"
    # A rejection is replayed as the same rejection.
    await set_policy(client, alice, blocked_models=["local/echo-1"])
    h2 = {**alice.headers, "Idempotency-Key": "run-2"}
    r1 = await client.post("/api/v1/requests", json=body, headers=h2)
    await set_policy(client, alice)
    r2 = await client.post("/api/v1/requests", json=body, headers=h2)
    assert r1.status == r2.status == 403 and await r1.json() == await r2.json()
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000 - COST
    await assert_books_balance(db, alice.project_id)


async def test_a_failure_after_reserving_releases_the_reservation(client, db):
    _, alice = await funded_project(client, 1_000_000)
    budget = await create_budget(client, alice, 900_000, "total")
    # openai/* is in the catalog but no upstream is configured in tests: the call fails after the reservation.
    status, body = await own_spend(client, alice, model="openai/gpt-4o-mini")
    assert status >= 400, body
    request_id = body["error"]["details"]["request_id"]
    stored = await (await client.get(f"/api/v1/requests/{request_id}", headers=alice.headers)).json()
    assert stored["status"] == "failed" and stored["error"]["code"] == body["error"]["code"]
    assert stored["reserved_micros"] > 0  # it did reserve before failing
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000, 0)
    b = await get_budget(client, alice, budget["id"])
    assert (b["spent_micros"], b["reserved_micros"]) == (0, 0)
    assert [e["data"]["request_id"] for e in await events(client, alice, "request.failed")] == [request_id]
    await assert_books_balance(db, alice.project_id)


async def test_requests_are_listed_per_project_and_hidden_from_outsiders(client, db):
    _, alice = await funded_project(client, 1_000_000)
    ids = [(await own_spend(client, alice))[1]["id"] for _ in range(3)]
    page = await (await client.get(f"/api/v1/projects/{alice.project_id}/requests?limit=2",
                                   headers=alice.headers)).json()
    assert [r["id"] for r in page["items"]] == ids[::-1][:2] and page["next_cursor"]
    settled = await (await client.get(f"/api/v1/projects/{alice.project_id}/requests?status=settled",
                                      headers=alice.headers)).json()
    assert len(settled["items"]) == 3
    bad = await client.get(f"/api/v1/projects/{alice.project_id}/requests?status=nope", headers=alice.headers)
    assert bad.status == 422
    eve = await register(client)
    assert (await client.get(f"/api/v1/requests/{ids[0]}", headers=eve.headers)).status == 404
    await assert_books_balance(db, alice.project_id)


async def test_concurrent_requests_never_pass_the_budget_or_the_wallet(client, db):
    """In-process race on both databases (the two-process one is tests/e2e/test_spend_race.py)."""
    admin, alice = await funded_project(client, 100 * COST)
    await create_budget(client, alice, 10 * COST, "total")
    key = await create_key(client, alice)
    results = await asyncio.gather(*(spend(client, bearer(key["key"])) for _ in range(30)))
    codes = sorted((body.get("error") or {}).get("code", "ok") for _, body in results)
    assert codes == ["budget_exceeded"] * 20 + ["ok"] * 10
    books = await assert_books_balance(db, alice.project_id)
    assert books == {"balance": 90 * COST, "reserved": 0}

    _, bob = await funded_project(client, 5 * COST, admin)
    bob_key = await create_key(client, bob)
    results = await asyncio.gather(*(spend(client, bearer(bob_key["key"])) for _ in range(15)))
    codes = sorted((body.get("error") or {}).get("code", "ok") for _, body in results)
    assert codes == ["insufficient_funds"] * 10 + ["ok"] * 5
    assert await assert_books_balance(db, bob.project_id) == {"balance": 0, "reserved": 0}


async def test_the_database_itself_refuses_an_overspend(client, db):
    """Defence in depth: even a write that skipped the conditional UPDATE is refused by the CHECKs."""
    _, alice = await funded_project(client, 1_000)
    budget = await create_budget(client, alice, 500, "day")
    for stmt in (sa.update(wallets).where(wallets.c.project_id == alice.project_id).values(reserved_micros=1_001),
                 sa.update(wallets).where(wallets.c.project_id == alice.project_id).values(reserved_micros=-1),
                 sa.update(budgets).where(budgets.c.id == budget["id"]).values(spent_micros=400, reserved_micros=101)):
        with pytest.raises(sa.exc.IntegrityError):
            async with db.engine.begin() as conn:
                await conn.execute(stmt)
    await assert_books_balance(db, alice.project_id)


class _HangingProvider:
    """A provider that never answers (the edge faked: an upstream that hangs)."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def complete(self, call):
        self.called.set()
        await asyncio.Event().wait()

    async def embed(self, call):
        return await self.complete(call)


async def test_a_cancelled_call_gives_the_reservation_back(client, db, container):
    _, alice = await funded_project(client, 1_000_000)
    hanging = _HangingProvider()
    container.providers._adapters["hang"] = hanging
    async with db.engine.begin() as conn:
        await conn.execute(sa.insert(catalog_models).values(
            id="hang/forever", provider="hang", name="forever", kind="chat", input_micros_per_mtok=1_000_000_000,
            output_micros_per_mtok=1_000_000_000, context_window=1000, max_output_tokens=100, active=True,
            updated_at=utcnow()))
    actor = Actor(kind="user", id=alice.id, user_id=alice.id)
    cmd = SpendCommand(model="hang/forever", messages=MESSAGES, max_tokens=10, project_id=alice.project_id)
    task = asyncio.create_task(container.spending.run(actor, cmd))
    await asyncio.wait_for(hanging.called.wait(), 30)
    assert (await wallet(client, alice))["reserved_micros"] > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000, 0)
    failed = await (await client.get(f"/api/v1/projects/{alice.project_id}/requests?status=failed",
                                     headers=alice.headers)).json()
    assert len(failed["items"]) == 1
    await assert_books_balance(db, alice.project_id)

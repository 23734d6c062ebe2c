"""Approvals: held requests keep their reservation; approve runs them, reject and expiry release them;
the gateway's wait_for_approval sees a decision made through REST."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import sqlalchemy as sa

from domain.base import Actor, utcnow
from domain.errors import ApprovalRequired
from domain.providers import Usage
from domain.spend import ApprovalExpired, ApprovalRejected, SpendCommand
from storage.models import spend_requests
from tests.factories import add_member, create_key, register
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
    wallet,
)


async def held_request(client, owner) -> dict:
    await set_policy(client, owner, require_approval_above_micros=COST)
    status, body = await own_spend(client, owner)
    assert status == 202, body
    assert body["status"] == "pending_approval" and body["decision"]["outcome"] == "REQUIRES_REVIEW"
    assert body["reserved_micros"] == COST and body["approval_expires_at"]
    return body


async def test_a_held_request_keeps_its_reservation_and_runs_when_approved(client, db):
    _, alice = await funded_project(client, 1_000_000)
    budget = await create_budget(client, alice, 10 * COST, "day")
    held = await held_request(client, alice)
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000, COST)
    requested = await events(client, alice, "approval.requested")
    assert [e["data"]["request_id"] for e in requested] == [held["id"]]
    assert requested[0]["data"]["estimated_cost_micros"] == COST
    pending = await (await client.get(f"/api/v1/projects/{alice.project_id}/requests?status=pending_approval",
                                      headers=alice.headers)).json()
    assert [r["id"] for r in pending["items"]] == [held["id"]]
    member = await register(client)
    await add_member(client, alice, member, "member")
    resp = await client.post(f"/api/v1/requests/{held['id']}/approve", headers=member.headers)
    assert resp.status == 403
    resp = await client.post(f"/api/v1/requests/{held['id']}/approve", json={"reason": "ok"}, headers=alice.headers)
    assert resp.status == 200
    done = await resp.json()
    assert done["status"] == "settled" and done["receipt"]["cost_micros"] == COST
    assert done["resolved_by"] == f"user:{alice.id}" and done["response"]["object"] == "chat.completion"
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000 - COST, 0)
    b = await get_budget(client, alice, budget["id"])
    assert (b["spent_micros"], b["reserved_micros"]) == (COST, 0)
    resolved = await events(client, alice, "approval.resolved")
    assert [(e["data"]["request_id"], e["data"]["resolution"]) for e in resolved] == [(held["id"], "approved")]
    again = await client.post(f"/api/v1/requests/{held['id']}/approve", headers=alice.headers)
    assert again.status == 409
    await assert_books_balance(db, alice.project_id)


async def test_reject_releases_the_reservation(client, db):
    _, alice = await funded_project(client, 1_000_000)
    budget = await create_budget(client, alice, 10 * COST, "day")
    held = await held_request(client, alice)
    resp = await client.post(f"/api/v1/requests/{held['id']}/reject", json={"reason": "not today"},
                             headers=alice.headers)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "rejected" and "not today" in body["error"]["message"]
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000, 0)
    b = await get_budget(client, alice, budget["id"])
    assert (b["spent_micros"], b["reserved_micros"]) == (0, 0)
    resolved = await events(client, alice, "approval.resolved")
    assert [(e["data"]["resolution"], e["data"]["reason"]) for e in resolved] == [("rejected", "not today")]
    assert (await client.post(f"/api/v1/requests/{held['id']}/approve", headers=alice.headers)).status == 409
    await assert_books_balance(db, alice.project_id)


async def test_unanswered_approvals_expire_and_release(client, db, container):
    _, alice = await funded_project(client, 1_000_000)
    held = await held_request(client, alice)
    async with db.engine.begin() as conn:  # the approval window ran out
        past = utcnow() - timedelta(seconds=1)
        await conn.execute(sa.update(spend_requests).where(spend_requests.c.id == held["id"]).values(
            approval_expires_at=past, reservation_expires_at=past))
    assert await container.spending.sweep() == 1
    assert await container.spending.sweep() == 0
    stored = await (await client.get(f"/api/v1/requests/{held['id']}", headers=alice.headers)).json()
    assert stored["status"] == "expired" and stored["error"]["code"] == "approval_expired"
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000, 0)
    resolved = await events(client, alice, "approval.resolved")
    assert [e["data"]["resolution"] for e in resolved] == ["expired"]
    assert (await client.post(f"/api/v1/requests/{held['id']}/approve", headers=alice.headers)).status == 409
    await assert_books_balance(db, alice.project_id)


async def test_the_gateway_waits_for_a_decision_made_over_rest(client, db, container):
    _, alice = await funded_project(client, 1_000_000)
    await set_policy(client, alice, require_approval_above_micros=COST)
    key = await create_key(client, alice)
    agent = Actor(kind="key", id=key["id"], project_id=alice.project_id)
    spending = container.spending
    cmd = SpendCommand(model="local/echo-1", messages=MESSAGES, max_tokens=1)

    with pytest.raises(ApprovalRequired) as held:
        await spending.prepare(agent, cmd, source="gateway")
    request_id = held.value.details["request_id"]
    with pytest.raises(ApprovalRequired):  # nobody answered within the wait
        await spending.wait_for_approval(request_id, 0.3)

    waiter = asyncio.create_task(spending.wait_for_approval(request_id, 30))
    await asyncio.sleep(0.1)
    resp = await client.post(f"/api/v1/requests/{request_id}/approve", headers=alice.headers)
    assert resp.status == 200 and (await resp.json())["status"] == "approved"  # the gateway runs it, not REST
    prepared = await waiter
    assert prepared.request_id == request_id and prepared.reserved_micros == COST
    receipt = await spending.settle(prepared, Usage(input_tokens=8, output_tokens=1), {"ok": True})
    assert receipt.cost_micros == COST

    with pytest.raises(ApprovalRequired) as held:
        await spending.prepare(agent, cmd, source="gateway")
    rejected_id = held.value.details["request_id"]
    waiter = asyncio.create_task(spending.wait_for_approval(rejected_id, 30))
    await asyncio.sleep(0.1)
    await client.post(f"/api/v1/requests/{rejected_id}/reject", headers=alice.headers)
    with pytest.raises(ApprovalRejected):
        await waiter

    with pytest.raises(ApprovalRequired) as held:
        await spending.prepare(agent, cmd, source="gateway")
    expired_id = held.value.details["request_id"]
    async with db.engine.begin() as conn:
        await conn.execute(sa.update(spend_requests).where(spend_requests.c.id == expired_id).values(
            reservation_expires_at=utcnow() - timedelta(seconds=1)))
    await spending.sweep()
    with pytest.raises(ApprovalExpired):
        await spending.wait_for_approval(expired_id, 5)

    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000 - COST, 0)
    await assert_books_balance(db, alice.project_id)

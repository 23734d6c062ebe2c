"""Idempotency-Key on the REST money routes (server/idempotency.py): one claim per project and key in the
database, compared as parsed JSON, with a lease that frees the key of a request that died and a retention
after which keys are forgotten. Run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import msgspec
import pytest
import sqlalchemy as sa

from domain.base import utcnow
from domain.errors import Conflict
from domain.providers import Usage
from domain.spend import RequestCreate, SpendCommand
from server.idempotency import fingerprint
from storage.idempotency import Claimed, IdempotencyKeys
from storage.models import idempotency_keys, spend_requests
from tests.factories import bearer, create_key
from tests.integration.spend_helpers import COST, MESSAGES, assert_books_balance, funded_project, wallet

LEASE = timedelta(seconds=30)
DAY = timedelta(hours=24)


def request_body(project_id: str) -> dict:
    return {"model": "local/echo-1", "messages": MESSAGES, "max_tokens": 1, "project_id": project_id}


async def post(client, headers: dict, key: str, body: dict | bytes):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post("/api/v1/requests", data=data,
                             headers={**headers, "Idempotency-Key": key, "Content-Type": "application/json"})
    return resp.status, await resp.json(), resp.headers


async def request_rows(db, project_id: str) -> list:
    async with db.engine.connect() as conn:
        return (await conn.execute(sa.select(spend_requests).where(spend_requests.c.project_id == project_id)
                                   .order_by(spend_requests.c.created_at))).all()


async def key_rows(db) -> list:
    async with db.engine.connect() as conn:
        return (await conn.execute(sa.select(idempotency_keys))).all()


async def backdated_claim(db, project_id: str, key: str, actor: str, fp: str, ago: timedelta) -> Claimed:
    """The claim a request took ``ago`` and never renewed: what a process killed mid-request leaves."""
    async with db.write() as conn:
        claim = await IdempotencyKeys(conn).claim(project_id, key, actor, fp, utcnow() - ago, LEASE, DAY)
    assert isinstance(claim, Claimed)
    return claim


def body_fingerprint(body: dict) -> str:
    """The fingerprint server/idempotency.py computes for this body on /api/v1/requests."""
    return fingerprint("POST", "/api/v1/requests", msgspec.json.decode(json.dumps(body), type=RequestCreate))


async def test_the_same_json_reformatted_is_the_same_request(client, db):
    _, alice = await funded_project(client)
    body = request_body(alice.project_id)
    status, first, _ = await post(client, alice.headers, "fmt-1", json.dumps(body, separators=(",", ":")).encode())
    assert status == 200, first
    spaced = json.dumps(dict(reversed(list(body.items()))), indent=4).encode()  # other order, other whitespace
    status, again, headers = await post(client, alice.headers, "fmt-1", spaced)
    assert status == 200 and again == first and headers["Idempotent-Replayed"] == "true"
    status, other, _ = await post(client, alice.headers, "fmt-1", {**body, "max_tokens": 2})
    assert status == 409 and other["error"]["code"] == "conflict"
    assert len(await request_rows(db, alice.project_id)) == 1
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000 - COST
    await assert_books_balance(db, alice.project_id)


async def test_twenty_concurrent_requests_from_two_actors_with_one_key_charge_once(client, db):
    _, alice = await funded_project(client)
    api_key = bearer((await create_key(client, alice))["key"])
    body = request_body(alice.project_id)
    results = await asyncio.gather(*[post(client, alice.headers if i % 2 else api_key, "race-1", body)
                                     for i in range(20)])
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 409}, statuses
    answered = {b["id"] for status, b, _ in results if status == 200}
    assert len(answered) == 1, statuses  # every 200 is the one request (the first answer or its replay)
    assert all(b["error"]["code"] == "conflict" for status, b, _ in results if status == 409)
    rows = await request_rows(db, alice.project_id)
    assert [r.id for r in rows] == list(answered) and rows[0].status == "settled"
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000 - COST, 0)
    claims = await key_rows(db)
    assert len(claims) == 1 and claims[0].status == 200
    # The winner's actor gets the answer again; the other actor of the project is refused, charged nothing.
    winner = alice.headers if claims[0].actor.startswith("user:") else api_key
    loser = api_key if winner is alice.headers else alice.headers
    status, again, headers = await post(client, winner, "race-1", body)
    assert status == 200 and again["id"] in answered and headers["Idempotent-Replayed"] == "true"
    status, refused, _ = await post(client, loser, "race-1", body)
    assert status == 409 and "another caller" in refused["error"]["message"]
    assert len(await request_rows(db, alice.project_id)) == 1
    await assert_books_balance(db, alice.project_id)


async def test_a_key_in_progress_is_busy_until_its_lease_lapses_then_the_retry_runs(client, db):
    _, alice = await funded_project(client)
    body = request_body(alice.project_id)
    fp = body_fingerprint(body)
    await backdated_claim(db, alice.project_id, "live-1", f"user:{alice.id}", fp, timedelta(seconds=1))
    status, busy, headers = await post(client, alice.headers, "live-1", body)
    assert status == 409 and "in progress" in busy["error"]["message"]
    assert 1 <= busy["error"]["details"]["retry_after_seconds"] <= 30
    assert headers["Retry-After"] == str(busy["error"]["details"]["retry_after_seconds"])
    assert await request_rows(db, alice.project_id) == []
    # A claim whose lease lapsed long ago, with nothing done: its request died before reserving.
    await backdated_claim(db, alice.project_id, "dead-1", f"user:{alice.id}", fp, timedelta(minutes=5))
    status, ran, _ = await post(client, alice.headers, "dead-1", body)
    assert status == 200 and ran["status"] == "settled"
    status, again, headers = await post(client, alice.headers, "dead-1", body)
    assert status == 200 and again == ran and headers["Idempotent-Replayed"] == "true"
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000 - COST
    await assert_books_balance(db, alice.project_id)


async def reserved_then_died(client, container, db, key: str):
    """A project whose request with ``key`` claimed it and reserved, and whose process then died: its claim's
    lease long lapsed, the request executing with its money held, no answer stored. (owner, body, request)"""
    _, alice = await funded_project(client)
    body = request_body(alice.project_id)
    actor = container.user_actor(alice.id, alice.email)
    await backdated_claim(db, alice.project_id, key, actor.label, body_fingerprint(body), timedelta(minutes=5))
    cmd = SpendCommand(model="local/echo-1", messages=MESSAGES, max_tokens=1, project_id=alice.project_id)
    return alice, body, await container.spending.prepare(actor, cmd, idempotency_key=key)


async def test_a_dead_request_that_reserved_is_released_and_the_retry_charges_once(client, container, db):
    alice, body, orphan = await reserved_then_died(client, container, db, "died-1")
    assert (await wallet(client, alice))["reserved_micros"] == COST

    status, ran, _ = await post(client, alice.headers, "died-1", body)
    assert status == 200 and ran["status"] == "settled" and ran["id"] != orphan.request_id
    first, second = await request_rows(db, alice.project_id)
    assert first.id == orphan.request_id and first.status == "failed"
    assert first.error["code"] == "reservation_expired" and second.id == ran["id"]
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000 - COST, 0)
    # Were the first process alive after all, its late settlement finds the request closed: no second charge.
    with pytest.raises(Conflict):
        await container.spending.settle(orphan, Usage(input_tokens=8, output_tokens=1), None)
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000 - COST
    await assert_books_balance(db, alice.project_id)


async def test_a_dead_request_the_sweeper_released_lets_the_retry_run_once(client, container, db):
    alice, body, orphan = await reserved_then_died(client, container, db, "died-3")
    spending = container.spending
    later = utcnow() + timedelta(seconds=container.settings.reservation_ttl_seconds + 1)
    spending.clock = lambda: later  # the sweeper runs after the orphan's reservation ran out
    try:
        assert await spending.sweep() == 1
    finally:
        spending.clock = utcnow
    assert (await wallet(client, alice))["reserved_micros"] == 0
    status, ran, _ = await post(client, alice.headers, "died-3", body)
    assert status == 200 and ran["status"] == "settled" and ran["id"] != orphan.request_id
    assert [r.status for r in await request_rows(db, alice.project_id)] == ["failed", "settled"]
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000 - COST
    await assert_books_balance(db, alice.project_id)


async def test_a_dead_request_that_settled_is_the_retrys_answer(client, container, db):
    alice, body, first = await reserved_then_died(client, container, db, "died-2")
    # … except that it settled first, and died before it stored the answer.
    await container.spending.settle(first, Usage(input_tokens=8, output_tokens=1), None)

    status, got, headers = await post(client, alice.headers, "died-2", body)
    assert status == 200 and got["id"] == first.request_id and got["status"] == "settled"
    assert headers["Idempotent-Replayed"] == "true"
    assert len(await request_rows(db, alice.project_id)) == 1
    status, again, _ = await post(client, alice.headers, "died-2", body)
    assert status == 200 and again == got
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000 - COST
    await assert_books_balance(db, alice.project_id)


async def test_keys_are_forgotten_after_the_retention_and_pruned(client, db):
    _, alice = await funded_project(client)
    body = request_body(alice.project_id)
    old = await backdated_claim(db, alice.project_id, "old-1", f"user:{alice.id}", "0" * 64, timedelta(hours=25))
    async with db.write() as conn:
        await IdempotencyKeys(conn).answer(alice.project_id, "old-1", old.token, 200, "application/json", {}, b"{}")
    await backdated_claim(db, alice.project_id, "old-2", f"user:{alice.id}", "0" * 64, timedelta(hours=30))
    # old-1 answered another body a day ago: past the retention it is a new key, not a 409.
    status, ran, _ = await post(client, alice.headers, "old-1", body)
    assert status == 200 and ran["status"] == "settled"
    remaining = {r.key: r for r in await key_rows(db)}
    assert set(remaining) == {"old-1"}  # old-2 was pruned on claim
    assert remaining["old-1"].expires_at > utcnow() + timedelta(hours=23)
    await assert_books_balance(db, alice.project_id)


async def test_refusals_release_the_key(client, db):
    admin, alice = await funded_project(client)
    body = request_body(alice.project_id)
    status, refused, _ = await post(client, admin.headers, "k-1", body)  # not a member of alice's project
    assert status == 404, refused
    assert await key_rows(db) == []  # a refusal that ran nothing holds no key: alice's own use is unharmed
    # A provider this server does not reach: refused after reserving, released, and the key with it.
    status, failed, _ = await post(client, alice.headers, "k-2", {**body, "model": "openai/gpt-4o-mini"})
    assert status == 404 and failed["error"]["details"]["request_id"], failed
    assert await key_rows(db) == []
    for key in ("k-1", "k-2"):
        status, ran, _ = await post(client, alice.headers, key, body)
        assert status == 200 and ran["status"] == "settled"
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000 - 2 * COST
    await assert_books_balance(db, alice.project_id)


async def test_a_bad_key_is_refused_and_changes_nothing(client, db):
    _, alice = await funded_project(client)
    body = request_body(alice.project_id)
    for bad in ("x" * 201, "tab\tinside"):
        status, refused, _ = await post(client, alice.headers, bad, body)
        assert status == 422 and refused["error"]["details"]["header"] == "Idempotency-Key", bad
    assert await request_rows(db, alice.project_id) == [] and await key_rows(db) == []

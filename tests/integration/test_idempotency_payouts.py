"""Withdrawals through the one Idempotency-Key mechanism (server/idempotency.py): concurrent retries pay once,
re-formatted JSON is the same request, and a withdrawal whose process died after committing answers the retry.
On the in-process EVM with the real token, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import msgspec
import pytest
import sqlalchemy as sa

from domain.base import utcnow
from domain.payments import WithdrawalCreate
from server.idempotency import fingerprint
from storage.idempotency import Claimed, IdempotencyKeys
from storage.models import payments
from tests.integration.payments_support import USDC, funded, payment_settings, run_worker
from tests.integration.spend_helpers import assert_books_balance, wallet


@pytest.fixture
def settings(settings):
    return payment_settings(settings)


async def post(client, user, key: str, data: bytes):
    resp = await client.post(f"/api/v1/projects/{user.project_id}/withdrawals", data=data,
                             headers={**user.headers, "Idempotency-Key": key, "Content-Type": "application/json"})
    return resp.status, await resp.json(), resp.headers


async def payment_rows(db, project_id: str) -> list:
    async with db.engine.connect() as conn:
        return (await conn.execute(sa.select(payments).where(payments.c.project_id == project_id))).all()


async def test_ten_concurrent_withdrawals_with_one_key_pay_once(client, db):
    alice, rt, to = await funded(client, 10 * USDC)
    data = json.dumps({"to_address": to, "amount_micros": 2 * USDC}).encode()
    results = await asyncio.gather(*[post(client, alice, "burst-1", data) for _ in range(10)])
    assert {status for status, _, _ in results} <= {201, 409}, [b for _, b, _ in results]
    assert len({b["id"] for status, b, _ in results if status == 201}) == 1
    assert len(await payment_rows(db, alice.project_id)) == 1
    assert (await wallet(client, alice))["reserved_micros"] == 2 * USDC
    await run_worker(rt)
    assert await rt.devnet.balance_micros(to) == 2 * USDC
    w = await wallet(client, alice)
    assert (w["balance_micros"], w["reserved_micros"]) == (8 * USDC, 0)
    await assert_books_balance(db, alice.project_id)


async def test_a_reformatted_withdrawal_is_the_same_request(client, db):
    alice, _, to = await funded(client, 10 * USDC)
    compact = json.dumps({"to_address": to, "amount_micros": USDC}, separators=(",", ":")).encode()
    status, first, _ = await post(client, alice, "fmt-1", compact)
    assert status == 201, first
    spaced = json.dumps({"amount_micros": USDC, "to_address": to}, indent=2).encode()
    status, again, headers = await post(client, alice, "fmt-1", spaced)
    assert status == 201 and again["id"] == first["id"] and headers["Idempotent-Replayed"] == "true"
    status, other, _ = await post(client, alice, "fmt-1", json.dumps({"to_address": to, "amount_micros": 2}).encode())
    assert status == 409 and other["error"]["code"] == "conflict"
    assert len(await payment_rows(db, alice.project_id)) == 1


async def test_a_withdrawal_whose_process_died_after_committing_answers_the_retry(client, container, db):
    alice, rt, to = await funded(client, 10 * USDC)
    body = {"to_address": to, "amount_micros": 3 * USDC}
    actor = container.user_actor(alice.id, alice.email)
    path = f"/api/v1/projects/{alice.project_id}/withdrawals"
    fp = fingerprint("POST", path, msgspec.json.decode(json.dumps(body), type=WithdrawalCreate))
    async with db.write() as conn:  # the first request's claim, never renewed: its process was killed
        claim = await IdempotencyKeys(conn).claim(alice.project_id, "died-1", actor.label, fp,
                                                  utcnow() - timedelta(minutes=5), timedelta(seconds=30),
                                                  timedelta(hours=24))
    assert isinstance(claim, Claimed)
    fees = await (await rt.get()).fees()
    async with container.uow(actor) as uow:  # … after its payout transaction committed
        made = await uow.payments.withdraw(alice.project_id, WithdrawalCreate(to_address=to, amount_micros=3 * USDC),
                                           "died-1", fees)
    status, got, headers = await post(client, alice, "died-1", json.dumps(body).encode())
    assert status == 201 and got["id"] == made.id and headers["Idempotent-Replayed"] == "true"
    assert len(await payment_rows(db, alice.project_id)) == 1
    await run_worker(rt)
    assert await rt.devnet.balance_micros(to) == 3 * USDC
    await assert_books_balance(db, alice.project_id)

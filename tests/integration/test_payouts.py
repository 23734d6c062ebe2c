"""Payouts from the treasury: Idempotency-Key required, the wallet held in the transaction that records the
payout, signed bytes stored before broadcast, one nonce allocator per sender, statuses pending → submitted →
confirmed | failed, and a reverted payout credited back. On the in-process EVM with the real token."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from eth_account import Account
from eth_account.typed_transactions import TypedTransaction
from eth_utils import keccak
from hexbytes import HexBytes

from domain.chain import checksum_address
from domain.payments import Payment
from storage.models import chain_nonces, payments
from tests.factories import add_member, register
from tests.integration.payments_support import (
    USDC,
    deposit,
    event_data,
    event_types,
    funded,
    payment_row,
    payment_settings,
    run_worker,
    runtime,
    withdraw,
)
from tests.integration.spend_helpers import assert_books_balance, wallet
from tests.live import LiveClient


@pytest.fixture
def settings(settings):
    return payment_settings(settings)


async def test_a_withdrawal_needs_an_idempotency_key_and_changes_nothing_without_one(client, db):
    alice, _, to = await funded(client, 5 * USDC)
    status, body, _ = await withdraw(client, alice, to, USDC, key=None)
    assert status == 422 and body["error"]["code"] == "invalid_request"
    assert body["error"]["details"]["header"] == "Idempotency-Key"
    status, body, _ = await withdraw(client, alice, "0xnot-an-address", USDC, key="k1")
    assert status == 422
    w = await wallet(client, alice)
    assert w["balance_micros"] == 5 * USDC and w["reserved_micros"] == 0
    async with db.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(payments))).scalar_one() == 0


async def test_a_payout_is_held_then_confirmed_and_debited(client, db):
    alice, rt, to = await funded(client, 10 * USDC)
    treasury_before = await rt.devnet.balance_micros(rt.chain.treasury_address)

    status, created, _ = await withdraw(client, alice, to, 4 * USDC, key="payout-1")
    assert status == 201, created
    assert created["status"] == "pending" and created["tx_hash"].startswith("0x") and created["block_number"] is None
    w = await wallet(client, alice)
    assert w["balance_micros"] == 10 * USDC and w["reserved_micros"] == 4 * USDC  # held in the same transaction
    assert not (await rt.chain.lookup(created["tx_hash"])).known  # stored, not yet broadcast

    await run_worker(rt)
    resp = await client.get(f"/api/v1/payments/{created['id']}", headers=alice.headers)
    got = await resp.json()
    assert got["status"] == "confirmed" and got["tx_hash"] == created["tx_hash"]
    assert got["block_number"] is not None and got["confirmations"] >= 1 and got["submitted_at"]
    assert await rt.devnet.balance_micros(to) == 4 * USDC
    assert await rt.devnet.balance_micros(rt.chain.treasury_address) == treasury_before - 4 * USDC
    w = await wallet(client, alice)
    assert w["balance_micros"] == 6 * USDC and w["reserved_micros"] == 0
    await assert_books_balance(db, alice.project_id)

    types = await event_types(db, alice.project_id)
    payment_events = [t for t in types if t.startswith("payment.")]
    assert payment_events == ["payment.created", "payment.submitted", "payment.confirmed"]
    confirmed = (await event_data(db, alice.project_id, "payment.confirmed"))[0]
    assert confirmed["tx_hash"] == created["tx_hash"] and confirmed["amount_micros"] == 4 * USDC
    listed = await (await client.get(f"/api/v1/projects/{alice.project_id}/payments", headers=alice.headers)).json()
    assert [p["id"] for p in listed["items"]] == [created["id"]]
    assert "raw_tx" not in got


async def test_an_idempotent_retry_sends_nothing_new(client, db):
    alice, rt, to = await funded(client, 10 * USDC)
    status, first, _ = await withdraw(client, alice, to, 3 * USDC, key="same-key")
    assert status == 201
    status, again, headers = await withdraw(client, alice, to, 3 * USDC, key="same-key")
    assert status == 201 and again["id"] == first["id"] and again["tx_hash"] == first["tx_hash"]
    assert headers.get("Idempotent-Replayed") == "true"
    await run_worker(rt)
    status, after, _ = await withdraw(client, alice, to, 3 * USDC, key="same-key")  # after confirmation too
    assert status == 201 and after["id"] == first["id"] and after["status"] == "confirmed"
    status, body, _ = await withdraw(client, alice, to, 2 * USDC, key="same-key")  # same key, other body
    assert status == 409 and body["error"]["code"] == "conflict"
    await run_worker(rt)

    assert await rt.devnet.balance_micros(to) == 3 * USDC
    async with db.engine.connect() as conn:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(payments))).scalar_one()
    assert count == 1
    w = await wallet(client, alice)
    assert w["balance_micros"] == 7 * USDC and w["reserved_micros"] == 0


async def test_twenty_concurrent_payouts_get_consecutive_nonces_and_all_confirm(client, db):
    alice = await register(client)
    rt = await runtime(client)
    await deposit(client, alice, 100 * USDC)
    recipients = [rt.devnet.new_account() for _ in range(4)]
    start_nonce = await rt.chain.next_nonce(rt.chain.treasury_address)

    results = await asyncio.gather(*[
        withdraw(client, alice, recipients[i % 4], (i + 1) * 100_000, key=f"burst-{i}") for i in range(20)])
    assert all(status == 201 for status, _, _ in results), [b for s, b, _ in results if s != 201]
    created = [body for _, body, _ in results]
    nonces = sorted(p["nonce"] for p in created)
    assert nonces == list(range(start_nonce, start_nonce + 20))  # no collision, no gap
    assert len({p["tx_hash"] for p in created}) == 20

    await run_worker(rt)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(sa.select(payments.c.status, payments.c.nonce))).all()
        allocator = (await conn.execute(sa.select(chain_nonces.c.next_nonce))).scalar_one()
    assert {r.status for r in rows} == {"confirmed"} and len(rows) == 20
    assert allocator == start_nonce + 20 == await rt.chain.next_nonce(rt.chain.treasury_address)
    total = sum((i + 1) * 100_000 for i in range(20))
    paid = [await rt.devnet.balance_micros(r) for r in recipients]
    assert sum(paid) == total
    assert paid[0] == sum((i + 1) * 100_000 for i in range(0, 20, 4))
    w = await wallet(client, alice)
    assert w["balance_micros"] == 100 * USDC - total and w["reserved_micros"] == 0
    await assert_books_balance(db, alice.project_id)


async def test_a_reverted_payout_fails_and_credits_the_wallet_back(client, db):
    alice = await register(client)
    rt = await runtime(client)
    await deposit(client, alice, 5 * USDC)
    # Empty the treasury first (its own transaction, before the allocator is seeded): the payout will revert.
    chain = rt.chain
    balance = await rt.devnet.balance_micros(chain.treasury_address)
    drain = chain.sign_transfer(rt.devnet.new_account(), balance, await chain.next_nonce(chain.treasury_address),
                                await chain.fees())
    assert (await chain.broadcast(drain.raw_tx))[0] == "sent"
    to = rt.devnet.new_account()

    status, created, _ = await withdraw(client, alice, to, 5 * USDC, key="doomed")
    assert status == 201
    assert (await wallet(client, alice))["available_micros"] == 0
    await run_worker(rt)

    got = await (await client.get(f"/api/v1/payments/{created['id']}", headers=alice.headers)).json()
    assert got["status"] == "failed" and got["error"] and got["block_number"] is not None
    receipt = (await chain.lookup(created["tx_hash"])).receipt
    assert receipt is not None and receipt.status == 0  # mined, reverted
    assert await rt.devnet.balance_micros(to) == 0
    w = await wallet(client, alice)
    assert w["balance_micros"] == 5 * USDC and w["reserved_micros"] == 0 and w["available_micros"] == 5 * USDC
    types = [t for t in await event_types(db, alice.project_id) if t.startswith("payment.")]
    assert types == ["payment.created", "payment.submitted", "payment.failed"]
    await assert_books_balance(db, alice.project_id)


async def test_a_payout_beyond_the_available_balance_is_refused_without_using_a_nonce(client, db):
    alice, rt, to = await funded(client, 2 * USDC)
    status, body, _ = await withdraw(client, alice, to, 3 * USDC, key="too-much")
    assert status == 402 and body["error"]["code"] == "insufficient_funds"
    status, ok, _ = await withdraw(client, alice, to, 2 * USDC, key="fits")
    assert status == 201
    assert ok["nonce"] == await rt.chain.next_nonce(rt.chain.treasury_address)  # the refused one took none
    status, body, _ = await withdraw(client, alice, to, 1, key="nothing-left")
    assert status == 402
    await run_worker(rt)
    assert await rt.devnet.balance_micros(to) == 2 * USDC


async def test_only_admins_withdraw_and_strangers_see_no_payments(client, db):
    alice, bob, eve = await register(client), await register(client), await register(client)
    rt = await runtime(client)
    await add_member(client, alice, bob, "member")
    await deposit(client, alice, 2 * USDC)
    to = rt.devnet.new_account()
    status, body, _ = await withdraw(client, bob, to, USDC, key="k", project_id=alice.project_id)
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, created, _ = await withdraw(client, alice, to, USDC, key="k")
    assert status == 201
    assert (await client.get(f"/api/v1/payments/{created['id']}", headers=eve.headers)).status == 404
    assert (await client.get(f"/api/v1/payments/{created['id']}", headers=bob.headers)).status == 200
    assert (await client.get(f"/api/v1/projects/{alice.project_id}/payments", headers=eve.headers)).status == 404
    status, _, _ = await withdraw(client, alice, "0x" + "0" * 40, USDC, key="zero")
    assert status == 422
    for own in (rt.chain.treasury_address, rt.chain.token_address):
        assert (await withdraw(client, alice, own, USDC, key=f"own-{own}"))[0] == 422


async def test_the_stored_transaction_is_signed_by_the_treasury_for_the_configured_chain_and_token(client, db):
    alice, rt, to = await funded(client, 2 * USDC)
    status, created, _ = await withdraw(client, alice, to, USDC, key="inspect")
    assert status == 201
    row = await payment_row(db, created["id"])
    raw = HexBytes(row.raw_tx)
    tx = TypedTransaction.from_bytes(raw).as_dict()
    assert tx["chainId"] == rt.chain.chain_id and tx["nonce"] == row.nonce == created["nonce"]
    assert HexBytes(tx["to"]).to_0x_hex().lower() == rt.chain.token_address
    assert HexBytes(tx["data"]).to_0x_hex().endswith(hex(USDC)[2:].rjust(64, "0"))  # transfer(to, 1 USDC)
    assert to[2:] in HexBytes(tx["data"]).to_0x_hex()
    assert Account.recover_transaction(raw).lower() == rt.chain.treasury_address
    assert keccak(raw).hex() == created["tx_hash"][2:]  # the hash stored is the hash of these bytes
    assert "raw_tx" not in Payment.__struct_fields__


async def test_payment_events_stream_live_on_payments_and_wallet_updates_on_budgets(client, db):
    alice = await register(client)
    rt = await runtime(client)
    url = str(client.make_url("/"))
    payments_ns = await LiveClient(url, alice.token, "/payments").connect()
    budgets_ns = await LiveClient(url, alice.token, "/budgets").connect()
    try:
        assert (await payments_ns.subscribe(alice.project_id))["ok"]
        assert (await budgets_ns.subscribe(alice.project_id))["ok"]
        await deposit(client, alice, 5 * USDC)
        status, created, _ = await withdraw(client, alice, rt.devnet.new_account(), 2 * USDC, key="live")
        assert status == 201
        await run_worker(rt)

        await payments_ns.until(lambda: "payment.confirmed" in payments_ns.names, what="payment.confirmed")
        assert payments_ns.names == ["deposit.credited", "payment.created", "payment.submitted", "payment.confirmed"]
        assert payments_ns.received[-1]["data"]["tx_hash"] == created["tx_hash"]
        await budgets_ns.until(lambda: any(e["data"].get("balance_micros") == 3 * USDC
                                           for e in budgets_ns.received if e["type"] == "wallet.updated"),
                               what="the wallet after the payout")
        assert not any(n.startswith(("payment.", "deposit.")) for n in budgets_ns.names)
    finally:
        await payments_ns.disconnect()
        await budgets_ns.disconnect()


async def test_a_withdrawal_address_must_be_exact_and_pass_its_checksum(client, db):
    alice, rt, to = await funded(client, 10 * USDC)
    good = checksum_address(to)
    letters = [i for i, c in enumerate(good) if i > 1 and c.isalpha()]
    i = next(i for i in letters if (good[:i] + good[i].swapcase() + good[i + 1:])[2:] not in
             (to[2:], to[2:].upper()))  # one letter's case flipped, still mixed case
    mistyped = good[:i] + good[i].swapcase() + good[i + 1:]
    for bad in (mistyped, to + "\n", good + "\n", " " + to, to + " ", to[:-1], to + "a", "0x" + "0" * 40):
        status, body, _ = await withdraw(client, alice, bad, USDC, key=f"bad-{bad!r}")
        assert status == 422 and body["error"]["code"] == "invalid_request", (bad, body)
        assert "to_address" in body["error"]["message"] or "to_address" in body["error"]["details"], (bad, body)
    w = await wallet(client, alice)
    assert w["balance_micros"] == 10 * USDC and w["reserved_micros"] == 0
    async with db.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(payments))).scalar_one() == 0

    for n, spelling in enumerate((good, to, "0x" + to[2:].upper(), to[2:])):  # one address, four spellings
        status, body, _ = await withdraw(client, alice, spelling, USDC, key=f"good-{n}")
        assert status == 201 and body["to_address"] == to, (spelling, body)
    await run_worker(rt)
    assert await rt.devnet.balance_micros(to) == 4 * USDC
    await assert_books_balance(db, alice.project_id)

"""Restart safety. The payout's signed bytes and hash are stored before broadcast, so a process killed after
signing, after broadcasting, or before confirmation is resumed by a fresh worker (a new container on the same
database and chain, as a restarted process would be): the payout completes exactly once, with the same hash."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from server.chain.workers import PaymentWorker
from server.container import Container
from storage.bus import LocalBus
from storage.models import ledger_entries
from tests.factories import register
from tests.integration.payments_support import (
    USDC,
    deposit,
    event_types,
    funded,
    payment_row,
    payment_settings,
    run_worker,
    runtime,
    withdraw,
)
from tests.integration.spend_helpers import assert_books_balance, wallet


@pytest.fixture
def settings(settings):
    return payment_settings(settings)


def restarted_worker(container: Container, chain) -> PaymentWorker:
    """What a new process builds at start: its own container over the same database, the same chain."""
    fresh = Container(container.settings, container.db, LocalBus(container.metrics), metrics=container.metrics)
    fresh.chain_runtime.chain = chain
    return PaymentWorker(fresh, chain)


async def drain(worker: PaymentWorker) -> None:
    for _ in range(20):
        if not await worker.tick_payments():
            return
    pytest.fail("the worker kept changing things")


async def withdrawal_entries(db, project_id: str) -> list[int]:
    async with db.engine.connect() as conn:
        rows = (await conn.execute(sa.select(ledger_entries.c.amount_micros).where(
            ledger_entries.c.project_id == project_id, ledger_entries.c.kind == "withdrawal"))).all()
    return [r.amount_micros for r in rows]


async def test_a_worker_stopped_after_signing_is_resumed_and_pays_exactly_once(client, db, container):
    alice, rt, to = await funded(client, 10 * USDC)
    status, created, _ = await withdraw(client, alice, to, 4 * USDC, key="crash-after-sign")
    assert status == 201
    nonce_before = await rt.chain.next_nonce(rt.chain.treasury_address)
    stored = await payment_row(db, created["id"])
    assert stored.status == "pending" and stored.tx_hash == created["tx_hash"] and stored.raw_tx
    assert not (await rt.chain.lookup(created["tx_hash"])).known  # the process "died" before broadcasting

    worker = restarted_worker(container, rt.chain)
    await drain(worker)
    await drain(restarted_worker(container, rt.chain))  # and yet another restart changes nothing

    row = await payment_row(db, created["id"])
    assert row.status == "confirmed" and row.tx_hash == created["tx_hash"]  # the same transaction
    assert await rt.chain.next_nonce(rt.chain.treasury_address) == nonce_before + 1  # exactly one sent
    assert await rt.devnet.balance_micros(to) == 4 * USDC
    assert await withdrawal_entries(db, alice.project_id) == [-4 * USDC]
    w = await wallet(client, alice)
    assert w["balance_micros"] == 6 * USDC and w["reserved_micros"] == 0
    types = await event_types(db, alice.project_id)
    assert types.count("payment.submitted") == 1 and types.count("payment.confirmed") == 1


async def test_a_worker_killed_after_broadcast_before_bookkeeping_resumes_exactly_once(client, db, container):
    alice, rt, to = await funded(client, 10 * USDC)
    status, created, _ = await withdraw(client, alice, to, 3 * USDC, key="crash-after-send")
    assert status == 201
    stored = await payment_row(db, created["id"])
    outcome, tx_hash = await rt.chain.broadcast(bytes(stored.raw_tx))  # sent, then the process died
    assert outcome == "sent" and tx_hash == created["tx_hash"]
    assert (await payment_row(db, created["id"])).status == "pending"

    await drain(restarted_worker(container, rt.chain))  # re-sends the same bytes: "nonce used" → hash found

    row = await payment_row(db, created["id"])
    assert row.status == "confirmed" and row.tx_hash == created["tx_hash"]
    assert await rt.devnet.balance_micros(to) == 3 * USDC
    assert await withdrawal_entries(db, alice.project_id) == [-3 * USDC]
    await assert_books_balance(db, alice.project_id)


async def test_two_workers_racing_on_the_same_payouts_finalise_each_once(client, db, container):
    alice, rt, to = await funded(client, 10 * USDC)
    for i in range(5):
        assert (await withdraw(client, alice, to, USDC, key=f"race-{i}"))[0] == 201
    a, b = restarted_worker(container, rt.chain), restarted_worker(container, rt.chain)
    for _ in range(5):
        await asyncio.gather(a.tick_payments(), b.tick_payments())
    await drain(a)

    assert await rt.devnet.balance_micros(to) == 5 * USDC
    assert sorted(await withdrawal_entries(db, alice.project_id)) == [-USDC] * 5
    types = await event_types(db, alice.project_id)
    assert types.count("payment.confirmed") == 5 and types.count("payment.submitted") == 5
    w = await wallet(client, alice)
    assert w["balance_micros"] == 5 * USDC and w["reserved_micros"] == 0


class TestBeforeConfirmation:
    @pytest.fixture
    def settings(self, settings):
        return payment_settings(settings, confirmations=2)

    async def test_a_worker_killed_while_waiting_for_confirmations_is_resumed(self, client, db, container):
        alice, rt, to = await funded(client, 10 * USDC)
        status, created, _ = await withdraw(client, alice, to, 2 * USDC, key="crash-before-confirm")
        assert status == 201
        first = restarted_worker(container, rt.chain)
        await drain(first)
        row = await payment_row(db, created["id"])
        assert row.status == "submitted"  # mined, 1 of 2 confirmations; then the process died

        rt.devnet.mine(1)
        await drain(restarted_worker(container, rt.chain))
        row = await payment_row(db, created["id"])
        assert row.status == "confirmed" and row.tx_hash == created["tx_hash"]
        got = await (await client.get(f"/api/v1/payments/{created['id']}", headers=alice.headers)).json()
        assert got["confirmations"] >= 2
        assert await rt.devnet.balance_micros(to) == 2 * USDC
        assert await withdrawal_entries(db, alice.project_id) == [-2 * USDC]


class TestBackgroundLoop:
    @pytest.fixture
    def settings(self, settings):
        return payment_settings(settings, chain_worker=True, chain_poll_seconds=0.05)

    async def test_the_running_worker_confirms_a_payout_without_help(self, client, db):
        alice, rt, to = await funded(client, 5 * USDC)
        status, created, _ = await withdraw(client, alice, to, USDC, key="background")
        assert status == 201

        async def confirmed() -> dict:
            while True:
                got = await (await client.get(f"/api/v1/payments/{created['id']}", headers=alice.headers)).json()
                if got["status"] in ("confirmed", "failed"):
                    return got
                await asyncio.sleep(0.02)

        got = await asyncio.wait_for(confirmed(), 30)
        assert got["status"] == "confirmed"
        assert await rt.devnet.balance_micros(to) == USDC


class TestDevnetRestart:
    async def test_a_restarted_devnet_fails_the_old_runs_unfinished_payouts(self, client, db):
        alice = await register(client)
        rt = await runtime(client)
        await deposit(client, alice, 10 * USDC)
        status, _, _ = await withdraw(client, alice, rt.devnet.new_account(), 2 * USDC, key="before")
        assert status == 201
        await run_worker(rt)
        status, stranded, _ = await withdraw(client, alice, rt.devnet.new_account(), 3 * USDC, key="stranded")
        assert stranded["nonce"] == 1 and (await wallet(client, alice))["reserved_micros"] == 3 * USDC

        old_treasury = rt.chain.treasury_address
        await rt.close()  # the process stops; its in-memory chain is gone
        rt = await runtime(client)  # a new run: a new, empty devnet (same chain id), a new treasury key
        assert rt.chain.treasury_address != old_treasury
        got = await (await client.get(f"/api/v1/payments/{stranded['id']}", headers=alice.headers)).json()
        assert got["status"] == "failed" and got["error"] == "the devnet was restarted"
        w = await wallet(client, alice)
        assert w["balance_micros"] == 8 * USDC and w["reserved_micros"] == 0

        await deposit(client, alice, USDC)
        to = rt.devnet.new_account()
        status, again, _ = await withdraw(client, alice, to, USDC, key="after")
        assert status == 201 and again["nonce"] == 0  # seeded from the new chain
        await run_worker(rt)
        assert await rt.devnet.balance_micros(to) == USDC
        await assert_books_balance(db, alice.project_id)

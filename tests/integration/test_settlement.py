"""On-chain settlement: the settled request costs of projects in ``onchain`` mode are paid in USDC from the
treasury to the revenue address, batched (by amount or by age), one transaction per batch, its hash on every
receipt in it; ``ledger`` projects stay off-chain. Real spend requests through POST /api/v1/requests."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from storage.models import settlement_batches, spend_requests
from tests.factories import register
from tests.integration.payments_support import USDC, payment_settings, run_worker, runtime, withdraw
from tests.integration.spend_helpers import COST, fund, funded_project, own_spend


async def set_settlement(client, user, mode: str) -> None:
    resp = await client.patch(f"/api/v1/projects/{user.project_id}", json={"settlement": mode}, headers=user.headers)
    assert resp.status == 200, await resp.text()


async def settled_requests(client, user, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        status, body = await own_spend(client, user)
        assert status == 200 and body["status"] == "settled", body
        ids.append(body["id"])
    return ids


async def rows(db, ids: list[str]):
    async with db.engine.connect() as conn:
        return (await conn.execute(sa.select(spend_requests).where(spend_requests.c.id.in_(ids)))).all()


class TestImmediateBatches:
    @pytest.fixture
    def settings(self, settings):
        return payment_settings(settings, settlement_batch_seconds=0, settlement_batch_micros=10**12)

    async def test_onchain_costs_are_paid_to_the_revenue_address_in_one_transaction(self, client, db):
        admin, alice = await funded_project(client, USDC)
        bob = await register(client)  # stays in ledger mode
        await fund(client, admin, bob.project_id, USDC)
        await set_settlement(client, alice, "onchain")
        rt = await runtime(client)
        revenue = rt.chain.revenue_address
        assert revenue and await rt.devnet.balance_micros(revenue) == 0
        onchain = await settled_requests(client, alice, 5)
        ledger = await settled_requests(client, bob, 2)

        batch_id = await rt.worker.tick_settlement()
        assert batch_id is not None
        assert await rt.worker.tick_settlement() is None  # nothing left to batch
        await run_worker(rt)

        settled = await rows(db, onchain)
        expected = sum(r.cost_micros for r in settled)
        assert expected == 5 * COST
        assert await rt.devnet.balance_micros(revenue) == expected  # exactly the settled costs
        async with db.engine.connect() as conn:
            batch = (await conn.execute(sa.select(settlement_batches))).one()
        assert batch.id == batch_id and batch.status == "confirmed"
        assert batch.total_micros == expected and batch.request_count == 5
        assert {(r.settlement_batch_id, r.tx_hash) for r in settled} == {(batch_id, batch.tx_hash)}
        receipt = await (await client.get(f"/api/v1/requests/{onchain[0]}", headers=alice.headers)).json()
        assert receipt["receipt"]["tx_hash"] == batch.tx_hash
        lookup = await rt.chain.lookup(batch.tx_hash)
        assert lookup.receipt is not None and lookup.receipt.status == 1
        assert [t.recipient for t in lookup.receipt.token_transfers(rt.chain.token_address)] == [revenue]
        assert {(r.settlement_batch_id, r.tx_hash) for r in await rows(db, ledger)} == {(None, None)}

        more = await settled_requests(client, alice, 2)  # the next batch takes only the new ones
        second = await rt.worker.tick_settlement()
        await run_worker(rt)
        assert second not in (None, batch_id)
        assert await rt.devnet.balance_micros(revenue) == expected + 2 * COST
        assert {r.settlement_batch_id for r in await rows(db, more)} == {second}

    async def test_a_failed_batch_is_paid_again_once_the_treasury_can_cover_it(self, client, db):
        admin, alice = await funded_project(client, USDC)
        await set_settlement(client, alice, "onchain")
        rt = await runtime(client)
        chain = rt.chain
        ids = await settled_requests(client, alice, 3)
        # A payout of the whole treasury is signed first; the batch after it (next nonce) will revert.
        treasury = await rt.devnet.balance_micros(chain.treasury_address)
        await fund(client, admin, alice.project_id, treasury)
        status, _, _ = await withdraw(client, alice, rt.devnet.new_account(), treasury, key="everything")
        assert status == 201
        failed = await rt.worker.tick_settlement()
        assert failed is not None
        await run_worker(rt)
        async with db.engine.connect() as conn:
            status = (await conn.execute(sa.select(settlement_batches.c.status)
                                         .where(settlement_batches.c.id == failed))).scalar_one()
        assert status == "failed"
        assert {(r.settlement_batch_id, r.tx_hash) for r in await rows(db, ids)} == {(None, None)}
        assert await rt.worker.tick_settlement() is None  # an empty treasury: it waits instead of reverting again

        await rt.devnet.mint(chain.treasury_address, 10 * USDC)
        retried = await rt.worker.tick_settlement()
        await run_worker(rt)
        assert retried not in (None, failed)
        assert await rt.devnet.balance_micros(chain.revenue_address) == 3 * COST
        assert {r.settlement_batch_id for r in await rows(db, ids)} == {retried}
        receipt = await (await client.get(f"/api/v1/requests/{ids[0]}", headers=alice.headers)).json()
        assert receipt["receipt"]["tx_hash"] == (await rows(db, ids))[0].tx_hash


class TestThresholds:
    @pytest.fixture
    def settings(self, settings):
        return payment_settings(settings, settlement_batch_seconds=3600, settlement_batch_micros=3 * COST)

    async def test_a_batch_waits_until_the_amount_is_reached(self, client, db):
        _, alice = await funded_project(client, USDC)
        await set_settlement(client, alice, "onchain")
        rt = await runtime(client)
        await settled_requests(client, alice, 2)
        assert await rt.worker.tick_settlement() is None  # 2 × COST, and younger than an hour
        ids = await settled_requests(client, alice, 1)
        batch_id = await rt.worker.tick_settlement()
        assert batch_id is not None
        await run_worker(rt)
        assert await rt.devnet.balance_micros(rt.chain.revenue_address) == 3 * COST
        assert (await rows(db, ids))[0].settlement_batch_id == batch_id

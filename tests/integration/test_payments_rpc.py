"""``SMARTSPACE_CHAIN=rpc``: the same payment flows through web3.py's AsyncHTTPProvider against a JSON-RPC node
on loopback (the in-process EVM behind it, answering like Arc: a second, system Transfer log per transfer)."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import pytest
import sqlalchemy as sa

from server.chain import open_chain
from server.chain.workers import CHAIN
from server.settings import SettingsError
from storage.models import payments
from tests.e2e.procs import free_port
from tests.factories import register
from tests.fakes.evm_node import FakeEvmNode
from tests.integration.payments_support import (
    USDC,
    claim,
    deposit_address,
    depositor,
    payment_settings,
    run_worker,
    runtime,
    withdraw,
)
from tests.integration.spend_helpers import assert_books_balance, wallet

TREASURY_KEY = "0x" + "7a" * 32


@pytest.fixture
async def node():
    node = await FakeEvmNode.start(treasury_key=TREASURY_KEY, arc=True)
    yield node
    await node.close()


def rpc_settings(settings, node: FakeEvmNode, **changes):
    """The app on ``chain="rpc"`` against the fake node, its background worker off."""
    return payment_settings(settings, chain="rpc", chain_rpc_url=node.url, chain_id=node.devnet.chain.chain_id,
                            usdc_address=node.devnet.chain.token_address, treasury_private_key=TREASURY_KEY,
                            **changes)


@pytest.fixture
def settings(settings, node):
    return rpc_settings(settings, node, revenue_address="0x" + "9e" * 20)


async def test_rpc_mode_deposits_count_arc_double_transfers_once_and_payouts_confirm(client, db, node):
    alice = await register(client)
    rt = await runtime(client, devnet=False)
    assert rt.chain.treasury_address == node.devnet.chain.treasury_address
    info = await deposit_address(client, alice)
    tx_hash = await node.devnet.pay(info["deposit_address"], 6 * USDC)
    receipt = (await rt.chain.lookup(tx_hash)).receipt
    assert receipt is not None and len(receipt.transfers) == 2  # the node's double log, through HTTP

    status, body = await claim(client, alice, tx_hash)
    assert status == 201 and body["amount_micros"] == 6 * USDC  # counted once
    assert (await claim(client, alice, tx_hash))[0] == 409
    assert (await wallet(client, alice))["balance_micros"] == 6 * USDC

    to = node.devnet.new_account()
    status, created, _ = await withdraw(client, alice, to, 2 * USDC, key="rpc-payout")
    assert status == 201
    await run_worker(rt)
    got = await (await client.get(f"/api/v1/payments/{created['id']}", headers=alice.headers)).json()
    assert got["status"] == "confirmed" and got["tx_hash"] == created["tx_hash"]
    assert await node.devnet.balance_micros(to) == 2 * USDC
    assert "eth_sendRawTransaction" in node.calls
    await assert_books_balance(db, alice.project_id)


async def test_rpc_mode_a_re_sent_transaction_is_recognised_by_its_hash(client, db, node):
    alice, rt, info = await depositor(client, devnet=False)
    assert (await claim(client, alice, await node.devnet.pay(info["deposit_address"], 3 * USDC)))[0] == 201
    status, created, _ = await withdraw(client, alice, node.devnet.new_account(), USDC, key="resend")
    assert status == 201
    await run_worker(rt)
    async with db.engine.connect() as conn:
        raw = (await conn.execute(sa.select(payments.c.raw_tx))).scalar_one()
    outcome, detail = await rt.chain.broadcast(bytes(raw))  # what a retrying provider would do
    assert outcome in ("known", "nonce_used"), detail
    assert (await rt.chain.lookup(created["tx_hash"])).known


async def test_devnet_routes_do_not_exist_in_rpc_mode(client, db, node):
    alice = await register(client)
    resp = await client.post("/api/v1/devnet/fund", json={"address": "0x" + "11" * 20, "amount_micros": 1},
                             headers=alice.headers)
    assert resp.status == 404


async def test_rpc_mode_refuses_a_node_on_another_chain_and_a_missing_key(settings, node):
    with pytest.raises(SettingsError, match="SMARTSPACE_CHAIN_ID"):
        await open_chain(msgspec.structs.replace(settings, chain_id=5042002))
    with pytest.raises(SettingsError, match="SMARTSPACE_TREASURY_PRIVATE_KEY"):
        await open_chain(msgspec.structs.replace(settings, treasury_private_key=""))
    with pytest.raises(SettingsError, match="SMARTSPACE_USDC_ADDRESS"):
        await open_chain(msgspec.structs.replace(settings, usdc_address=""))


class TestNodeDownAtStartUp:
    @pytest.fixture
    async def node(self):
        node = await FakeEvmNode.start(treasury_key=TREASURY_KEY, port=free_port(), serve=False)
        yield node
        await node.close()

    @pytest.fixture
    def settings(self, settings, node):
        return rpc_settings(settings, node, chain_poll_seconds=0.01)

    async def test_the_server_starts_answers_503_and_connects_once_the_node_is_up(self, client, db, node):
        alice = await register(client)
        resp = await client.get(f"/api/v1/projects/{alice.project_id}/deposit-address", headers=alice.headers)
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
        assert (await client.get(f"/api/v1/projects/{alice.project_id}/wallet", headers=alice.headers)).status == 200

        await node.serve(int(node.url.rsplit(":", 1)[1]))
        rt = client.app[CHAIN]

        for _ in range(3000):  # the background opener gets there (bounded, not timed)
            if rt.chain is not None:
                break
            await asyncio.sleep(0.01)
        info = await deposit_address(client, alice)
        assert info["treasury_address"] == node.devnet.chain.treasury_address


async def test_the_treasury_key_is_never_logged_or_returned(client, db, node, caplog, settings):
    caplog.set_level(logging.DEBUG)
    alice, rt, info = await depositor(client, devnet=False)
    bodies = [str(info)]
    status, body = await claim(client, alice, await node.devnet.pay(info["deposit_address"], 2 * USDC))
    assert status == 201
    bodies.append(str(body))
    status, created, _ = await withdraw(client, alice, node.devnet.new_account(), USDC, key="secret-check")
    assert status == 201
    bodies.append(str(created))
    await run_worker(rt)
    bodies.append(await (await client.get(f"/api/v1/projects/{alice.project_id}/payments",
                                          headers=alice.headers)).text())
    secret = TREASURY_KEY[2:]
    assert secret not in caplog.text and all(secret not in b for b in bodies)
    assert secret not in repr(settings) and secret not in repr(rt.chain)

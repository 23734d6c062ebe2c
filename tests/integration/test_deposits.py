"""Deposits: a real USDC transfer on the in-process EVM (the compiled token), verified from its receipt and
credited exactly once; replayed, foreign, reverted, wrong-token and wrong-recipient transfers are refused;
the shared treasury counts only from senders proven by their own key's signature."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from domain.chain import checksum_address
from domain.errors import InvalidRequest
from domain.payments import sender_challenge_message
from storage.migrate import upgrade
from storage.models import deposit_senders, projects, users
from tests.conftest import drop_database, make_database
from tests.factories import add_member, register
from tests.integration.payments_support import (
    USDC,
    claim,
    deposit,
    deposit_address,
    depositor,
    event_data,
    event_types,
    payment_settings,
    post_sender,
    register_sender,
    run_worker,
    runtime,
    sender_challenge,
)
from tests.integration.spend_helpers import assert_books_balance, wallet

MISTYPED = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cf"  # ...6cF is the valid checksum


@pytest.fixture
def settings(settings):
    return payment_settings(settings)


async def test_each_project_has_its_own_deposit_address_stored_in_its_wallet(client, db):
    alice, bob = await register(client), await register(client)
    a, b = await deposit_address(client, alice), await deposit_address(client, bob)
    assert a["deposit_address"] != b["deposit_address"]
    assert a["deposit_address"] == (await deposit_address(client, alice))["deposit_address"]
    assert a["decimals"] == 6 and a["token_address"].startswith("0x") and a["confirmations_required"] == 1
    assert (await wallet(client, alice))["deposit_address"] == a["deposit_address"]


async def test_a_deposit_is_credited_once(client, db):
    alice, rt, info = await depositor(client)
    tx_hash = await rt.devnet.pay(info["deposit_address"], 5 * USDC)

    status, body = await claim(client, alice, tx_hash)
    assert status == 201, body
    assert body["status"] == "confirmed" and body["amount_micros"] == 5 * USDC and body["log_index"] == 0
    assert body["tx_hash"] == tx_hash and body["confirmations"] >= 1
    assert (await wallet(client, alice))["balance_micros"] == 5 * USDC

    status, again = await claim(client, alice, tx_hash)  # replayed
    assert status == 409 and again["error"]["code"] == "conflict"
    assert again["error"]["details"]["deposit_id"] == body["id"]
    status, _ = await claim(client, alice, tx_hash.upper().replace("0X", ""))  # same hash, other spelling
    assert status == 409
    assert (await wallet(client, alice))["balance_micros"] == 5 * USDC
    await assert_books_balance(db, alice.project_id)

    types = await event_types(db, alice.project_id)
    assert types.count("deposit.credited") == 1
    credited = (await event_data(db, alice.project_id, "deposit.credited"))[0]
    assert credited["amount_micros"] == 5 * USDC and credited["tx_hash"] == tx_hash
    updates = await event_data(db, alice.project_id, "wallet.updated")
    assert updates[-1]["balance_micros"] == 5 * USDC

    listed = await (await client.get(f"/api/v1/projects/{alice.project_id}/deposits", headers=alice.headers)).json()
    assert [d["id"] for d in listed["items"]] == [body["id"]]
    one = await client.get(f"/api/v1/deposits/{body['id']}", headers=alice.headers)
    assert one.status == 200 and (await one.json())["status"] == "confirmed"


async def test_another_project_cannot_claim_a_transfer(client, db):
    alice, mallory = await register(client), await register(client)
    rt = await runtime(client)
    info = await deposit_address(client, alice)
    tx_hash = await rt.devnet.pay(info["deposit_address"], 2 * USDC)

    status, body = await claim(client, mallory, tx_hash)  # foreign: pays alice's address, not mallory's
    assert status == 422 and body["error"]["code"] == "deposit_rejected"
    assert body["error"]["details"]["reason"] == "wrong_recipient"

    status, credited = await claim(client, alice, tx_hash)
    assert status == 201
    status, body = await claim(client, mallory, tx_hash)  # and once claimed it is nobody else's
    assert status == 409 and "deposit_id" not in body["error"]["details"]
    assert (await wallet(client, mallory))["balance_micros"] == 0
    assert (await wallet(client, alice))["balance_micros"] == 2 * USDC
    resp = await client.get(f"/api/v1/deposits/{credited['id']}", headers=mallory.headers)
    assert resp.status == 404


async def test_a_reverted_transfer_is_refused(client, db):
    alice, rt, info = await depositor(client)
    payer = await rt.devnet.fund_new_account()  # holds no USDC: the transfer reverts, and is mined anyway
    tx_hash = await rt.devnet.pay(info["deposit_address"], 3 * USDC, payer=payer, mint=False, gas=100_000)
    lookup = await rt.chain.lookup(tx_hash)
    assert lookup.receipt is not None and lookup.receipt.status == 0

    status, body = await claim(client, alice, tx_hash)
    assert status == 422 and body["error"]["details"]["reason"] == "reverted"
    assert (await wallet(client, alice))["balance_micros"] == 0
    assert "deposit.credited" not in await event_types(db, alice.project_id)


async def test_a_transfer_of_another_token_is_refused(client, db):
    alice, rt, info = await depositor(client)
    fake = await rt.devnet.deploy_other_token()  # same code, same 6 decimals, different contract
    tx_hash = await rt.devnet.pay(info["deposit_address"], 4 * USDC, token=fake)

    status, body = await claim(client, alice, tx_hash)
    assert status == 422 and body["error"]["details"]["reason"] == "wrong_token"
    assert (await wallet(client, alice))["balance_micros"] == 0


async def test_a_transfer_to_another_address_is_refused(client, db):
    alice = await register(client)
    rt = await runtime(client)
    stranger = rt.devnet.new_account()
    tx_hash = await rt.devnet.pay(stranger, USDC)

    status, body = await claim(client, alice, tx_hash)
    assert status == 422 and body["error"]["details"]["reason"] == "wrong_recipient"
    # A plain native-value transfer has no token log at all.
    native = await rt.devnet.send_native((await deposit_address(client, alice))["deposit_address"], 10**18)
    assert (await claim(client, alice, native))[0] == 422
    assert (await wallet(client, alice))["balance_micros"] == 0


async def test_unknown_and_malformed_hashes_are_refused(client, db):
    alice = await register(client)
    await runtime(client)
    status, body = await claim(client, alice, "0x" + "ab" * 32)
    assert status == 422 and body["error"]["details"]["reason"] == "not_found"
    status, body = await claim(client, alice, "0x1234")
    assert status == 422 and body["error"]["code"] == "invalid_request"


async def test_a_tx_hash_with_whitespace_is_refused_not_repaired(client, db):
    alice, rt, info = await depositor(client)
    tx_hash = await rt.devnet.pay(info["deposit_address"], USDC)
    for bad in (tx_hash + "\n", " " + tx_hash, tx_hash + " ", "\t" + tx_hash[2:], tx_hash[:-1], tx_hash + "0"):
        status, body = await claim(client, alice, bad)
        assert status == 422 and body["error"]["code"] == "invalid_request", (bad, body)
        assert "tx_hash" in body["error"]["message"], body
    assert (await wallet(client, alice))["balance_micros"] == 0
    assert (await claim(client, alice, tx_hash.upper().replace("0X", "0x")))[0] == 201  # case is no typo in a hash


async def test_devnet_routes_refuse_what_the_token_would_revert_with_a_422(client, db):
    alice = await register(client)
    rt = await runtime(client)
    zero = "0x" + "0" * 40
    supply_before = await rt.devnet.token().functions.totalSupply().call()
    for path, body, field in (("fund", {"address": zero, "amount_micros": USDC}, "address"),
                              ("transfer", {"to_address": zero, "amount_micros": USDC}, "to_address"),
                              ("fund", {"address": MISTYPED, "amount_micros": USDC}, "address"),
                              ("transfer", {"to_address": MISTYPED, "amount_micros": USDC}, "to_address"),
                              ("transfer", {"to_address": rt.devnet.new_account(), "amount_micros": USDC,
                                            "from_address": MISTYPED}, "from_address")):
        resp = await client.post(f"/api/v1/devnet/{path}", json=body, headers=alice.headers)
        got = await resp.json()
        assert resp.status == 422 and got["error"]["code"] == "invalid_request", (path, body, got)
        assert got["error"]["details"] == {field: body[field]}, got
    assert await rt.devnet.token().functions.totalSupply().call() == supply_before  # nothing minted

    # Whatever else the contract refuses is a 422 naming its reason, not a 500: a transfer the payer cannot cover.
    with pytest.raises(InvalidRequest, match="exceeds balance") as exc:
        await rt.devnet.pay(rt.devnet.new_account(), USDC, payer=await rt.devnet.fund_new_account(), mint=False)
    assert exc.value.details == {"reason": "ERC20: transfer amount exceeds balance"}

    resp = await client.post("/api/v1/devnet/transfer", headers=alice.headers,
                             json={"to_address": (await deposit_address(client, alice))["deposit_address"],
                                   "amount_micros": 2 * USDC})
    assert resp.status == 201  # and the routes still work
    assert (await claim(client, alice, (await resp.json())["tx_hash"]))[0] == 201


async def test_deposits_to_the_treasury_count_only_from_registered_senders(client, db):
    alice, bob = await register(client), await register(client)
    rt = await runtime(client)
    info = await deposit_address(client, alice)
    sender = await rt.devnet.fund_new_account()
    status, body = await register_sender(client, alice, sender)
    assert status == 201, body
    assert body["address"] == sender and body["project_id"] == alice.project_id
    status, _ = await register_sender(client, bob, sender)
    assert status == 409  # one sender, one project
    assert (await deposit_address(client, alice))["registered_senders"] == [sender]
    status, body = await sender_challenge(client, alice, info["treasury_address"])
    assert status == 422  # the treasury paying itself is no deposit

    registered = await rt.devnet.pay(info["treasury_address"], 7 * USDC, payer=sender)
    assert (await claim(client, bob, registered))[0] == 422  # not bob's sender
    status, body = await claim(client, alice, registered)
    assert status == 201 and body["amount_micros"] == 7 * USDC and body["from_address"] == sender

    unregistered = await rt.devnet.pay(info["treasury_address"], USDC, payer=await rt.devnet.fund_new_account())
    status, body = await claim(client, alice, unregistered)
    assert status == 422 and body["error"]["details"]["reason"] == "wrong_recipient"
    assert (await wallet(client, alice))["balance_micros"] == 7 * USDC


async def test_a_sender_is_registered_only_with_a_signature_by_its_own_key(client, db):
    """The attack: alice's wallet pays the shared treasury (a public transfer); mallory registers that wallet
    as her project's sender and claims the transfer before alice can. Without alice's key she cannot."""
    alice, mallory = await register(client), await register(client)
    rt = await runtime(client)
    treasury = (await deposit_address(client, alice))["treasury_address"]
    wallet_of_alice, wallet_of_mallory = rt.devnet.new_account(), rt.devnet.new_account()
    await rt.devnet.send_native(wallet_of_alice, 10**19)
    transfer = await rt.devnet.pay(treasury, 3 * USDC, payer=wallet_of_alice)

    status, challenge = await sender_challenge(client, mallory, wallet_of_alice)
    assert status == 200 and challenge["address"] == wallet_of_alice
    own_key = rt.devnet.sign_message(wallet_of_mallory, challenge["message"])  # her key, the right message
    for_alice = (await sender_challenge(client, alice, wallet_of_alice))[1]["message"]
    replayed = rt.devnet.sign_message(wallet_of_alice, for_alice)  # alice's key, for alice's project
    other_chain = sender_challenge_message(address=wallet_of_alice, project_id=mallory.project_id,
                                           chain_id=rt.chain.chain_id + 1, treasury_address=treasury)
    wrong_chain = rt.devnet.sign_message(wallet_of_alice, other_chain)
    garbage = "0x" + "ab" * 65
    for signature in (own_key, replayed, wrong_chain, garbage, "0x" + "00" * 65):
        status, body = await post_sender(client, mallory, wallet_of_alice, signature)
        assert status == 422 and body["error"]["code"] == "invalid_signature", (signature, body)
    resp = await client.post(f"/api/v1/projects/{mallory.project_id}/deposit-senders",
                             json={"address": wallet_of_alice}, headers=mallory.headers)
    assert resp.status == 422  # no signature at all
    assert (await deposit_address(client, mallory))["registered_senders"] == []
    status, body = await claim(client, mallory, transfer)
    assert status == 422 and body["error"]["details"]["reason"] == "wrong_recipient"

    status, body = await post_sender(client, alice, wallet_of_alice, replayed)  # the owner's own proof
    assert status == 201, body
    status, body = await claim(client, alice, transfer)
    assert status == 201 and body["amount_micros"] == 3 * USDC
    assert (await wallet(client, alice))["balance_micros"] == 3 * USDC
    assert (await wallet(client, mallory))["balance_micros"] == 0


async def test_the_challenge_is_bound_to_project_address_and_chain_and_ignores_spelling(client, db):
    alice, bob = await register(client), await register(client)
    rt = await runtime(client)
    sender = rt.devnet.new_account()
    _, lower = await sender_challenge(client, alice, sender)
    _, checksummed = await sender_challenge(client, alice, checksum_address(sender))
    _, upper = await sender_challenge(client, alice, "0x" + sender[2:].upper())
    assert lower == checksummed == upper  # one address, one message, whatever the spelling
    assert lower["chain_id"] == rt.chain.chain_id and lower["project_id"] == alice.project_id
    for part in (alice.project_id, sender, str(rt.chain.chain_id), checksum_address(sender)):
        assert part in lower["message"]
    _, for_bob = await sender_challenge(client, bob, sender)
    assert for_bob["message"] != lower["message"]
    _, other = await sender_challenge(client, alice, rt.devnet.new_account())
    assert other["message"] != lower["message"]

    signature = rt.devnet.sign_message(sender, lower["message"])
    status, body = await post_sender(client, alice, checksum_address(sender), signature)  # any spelling
    assert status == 201 and body["address"] == sender


async def test_challenge_and_registration_refuse_bad_addresses_naming_the_field(client, db):
    alice = await register(client)
    rt = await runtime(client)
    sender = rt.devnet.new_account()
    bad_checksum = MISTYPED  # EIP-55's own example with its last letter's case flipped
    for address in (bad_checksum, sender + "\n", " " + sender, sender[:-1], sender + "0", "", "0x" + "0" * 40):
        status, body = await sender_challenge(client, alice, address)
        assert status == 422 and body["error"]["code"] == "invalid_request", (address, body)
        assert "address" in body["error"]["details"] or "address" in body["error"]["message"], body
    status, body = await post_sender(client, alice, bad_checksum, "0x" + "ab" * 65)
    assert status == 422 and body["error"]["code"] == "invalid_request"
    assert body["error"]["details"] == {"address": bad_checksum}
    _, challenge = await sender_challenge(client, alice, sender)
    signature = rt.devnet.sign_message(sender, challenge["message"])
    status, body = await post_sender(client, alice, sender, signature + "\n")
    assert status == 422 and body["error"]["code"] == "invalid_request"
    assert (await deposit_address(client, alice))["registered_senders"] == []


async def test_only_admins_ask_for_a_challenge_or_register(client, db):
    owner, member, eve = await register(client), await register(client), await register(client)
    await add_member(client, owner, member, "member")
    rt = await runtime(client)
    sender = rt.devnet.new_account()
    assert (await sender_challenge(client, member, sender, owner.project_id))[0] == 403
    assert (await sender_challenge(client, eve, sender, owner.project_id))[0] == 404
    _, challenge = await sender_challenge(client, owner, sender)
    signature = rt.devnet.sign_message(sender, challenge["message"])
    assert (await post_sender(client, member, sender, signature, owner.project_id))[0] == 403
    assert (await deposit_address(client, owner))["registered_senders"] == []


async def test_viewers_cannot_claim_and_strangers_cannot_see(client, db):
    alice, eve = await register(client), await register(client)
    await runtime(client)
    resp = await client.get(f"/api/v1/projects/{alice.project_id}/deposit-address", headers=eve.headers)
    assert resp.status == 404
    status, _ = await claim(client, eve, "0x" + "cd" * 32, project_id=alice.project_id)
    assert status == 404


class TestPendingDeposits:
    @pytest.fixture
    def settings(self, settings):
        return payment_settings(settings, confirmations=3)

    async def test_a_deposit_waits_for_confirmations_then_the_watcher_credits_it(self, client, db):
        alice, rt, info = await depositor(client)
        tx_hash = await rt.devnet.pay(info["deposit_address"], 6 * USDC)

        status, body = await claim(client, alice, tx_hash)
        assert status == 202 and body["status"] == "pending" and body["amount_micros"] == 6 * USDC
        assert (await wallet(client, alice))["balance_micros"] == 0
        assert (await claim(client, alice, tx_hash))[0] == 409  # pending claims count too

        await run_worker(rt)
        assert (await wallet(client, alice))["balance_micros"] == 0  # still 1 of 3 confirmations
        rt.devnet.mine(2)
        await run_worker(rt)
        got = await (await client.get(f"/api/v1/deposits/{body['id']}", headers=alice.headers)).json()
        assert got["status"] == "confirmed" and got["confirmations"] >= 3
        assert (await wallet(client, alice))["balance_micros"] == 6 * USDC
        await run_worker(rt)  # nothing more to do: credited once
        assert (await wallet(client, alice))["balance_micros"] == 6 * USDC
        assert (await event_types(db, alice.project_id)).count("deposit.credited") == 1
        await assert_books_balance(db, alice.project_id)


async def test_deposits_add_up_in_the_ledger(client, db):
    alice = await register(client)
    await deposit(client, alice, 9 * USDC)
    await deposit(client, alice, 1)
    assert (await wallet(client, alice))["balance_micros"] == 9 * USDC + 1
    resp = await client.get(f"/api/v1/projects/{alice.project_id}/wallet/ledger", headers=alice.headers)
    ledger = await resp.json()
    assert sorted(e["amount_micros"] for e in ledger["items"] if e["kind"] == "deposit") == [1, 9 * USDC]
    await assert_books_balance(db, alice.project_id)


async def test_a_deposit_claimed_while_in_the_pool_is_verified_and_credited_once_mined(client, db):
    alice, rt, info = await depositor(client)
    payer = await rt.devnet.fund_new_account()
    await rt.devnet.mint(payer, 8 * USDC)
    rt.devnet.auto_mine(False)
    tx_hash = await rt.devnet.pay(info["deposit_address"], 8 * USDC, payer=payer, mint=False, gas=100_000, wait=False)
    lookup = await rt.chain.lookup(tx_hash)
    assert lookup.known and lookup.receipt is None

    status, body = await claim(client, alice, tx_hash)
    assert status == 202 and body["status"] == "pending" and body["log_index"] == -1 and body["amount_micros"] == 0
    await run_worker(rt)  # still in the pool: nothing to credit
    assert (await wallet(client, alice))["balance_micros"] == 0

    rt.devnet.auto_mine(True)  # mines the pool
    await run_worker(rt)
    got = await (await client.get(f"/api/v1/deposits/{body['id']}", headers=alice.headers)).json()
    assert got["status"] == "confirmed" and got["log_index"] == 0 and got["amount_micros"] == 8 * USDC
    assert got["from_address"] == payer
    assert (await wallet(client, alice))["balance_micros"] == 8 * USDC
    assert (await event_types(db, alice.project_id)).count("deposit.credited") == 1
    await assert_books_balance(db, alice.project_id)


async def test_a_pooled_claim_that_turns_out_foreign_fails_without_credit(client, db):
    alice, bob = await register(client), await register(client)
    rt = await runtime(client)
    bobs = await deposit_address(client, bob)
    payer = await rt.devnet.fund_new_account()
    await rt.devnet.mint(payer, USDC)
    rt.devnet.auto_mine(False)
    tx_hash = await rt.devnet.pay(bobs["deposit_address"], USDC, payer=payer, mint=False, gas=100_000, wait=False)
    status, body = await claim(client, alice, tx_hash)  # alice claims bob's transfer before it is mined
    assert status == 202
    rt.devnet.auto_mine(True)
    await run_worker(rt)
    got = await (await client.get(f"/api/v1/deposits/{body['id']}", headers=alice.headers)).json()
    assert got["status"] == "failed" and got["error"] == "wrong_recipient"
    assert (await wallet(client, alice))["balance_micros"] == 0
    assert (await claim(client, bob, tx_hash))[0] == 201  # a failed claim does not block the rightful one
    assert (await wallet(client, bob))["balance_micros"] == USDC


async def test_concurrent_claims_of_one_transfer_credit_it_once(client, db):
    alice, rt, info = await depositor(client)
    tx_hash = await rt.devnet.pay(info["deposit_address"], 4 * USDC)
    results = await asyncio.gather(*[claim(client, alice, tx_hash) for _ in range(8)])
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [409] * 7
    assert (await wallet(client, alice))["balance_micros"] == 4 * USDC
    assert (await event_types(db, alice.project_id)).count("deposit.credited") == 1
    await assert_books_balance(db, alice.project_id)


async def test_senders_registered_before_proof_was_required_are_forgotten_by_the_migration(backend, tmp_path):
    database, schema = await make_database(backend, tmp_path, tables=False)
    try:
        await upgrade(database, "0003")
        now = datetime.now(UTC)
        async with database.engine.begin() as conn:
            await conn.execute(sa.insert(users).values(id="usr_1", email="a@b.test", name="a", password_hash="x",
                                                       created_at=now))
            await conn.execute(sa.insert(projects).values(id="prj_1", name="p", owner_id="usr_1", created_at=now,
                                                          updated_at=now))
            await conn.execute(sa.insert(deposit_senders).values(chain_id=1, address="0x" + "ab" * 20,
                                                                 project_id="prj_1", created_at=now))
        await upgrade(database, "0004")
        async with database.engine.connect() as conn:
            assert (await conn.execute(sa.select(sa.func.count()).select_from(deposit_senders))).scalar_one() == 0
            assert (await conn.execute(sa.select(projects.c.id))).scalars().all() == ["prj_1"]
    finally:
        await drop_database(database, schema)

"""Wallet: one per project, admin credits (platform admins, Idempotency-Key), the ledger invariant."""

from __future__ import annotations

from tests.factories import add_member, register
from tests.integration.spend_helpers import assert_books_balance, fund, platform_admin, wallet


async def test_new_project_has_an_empty_wallet(client, db):
    alice = await register(client)
    body = await wallet(client, alice)
    assert body["balance_micros"] == 0 and body["reserved_micros"] == 0 and body["available_micros"] == 0
    assert "deposit_address" in body
    await assert_books_balance(db, alice.project_id)


async def test_admin_credit_adds_a_ledger_entry_and_emits_wallet_updated(client, db):
    admin = await platform_admin(client)
    alice = await register(client)
    entry = await fund(client, admin, alice.project_id, 2_500_000)
    assert entry["amount_micros"] == 2_500_000 and entry["kind"] == "admin_credit"
    assert entry["balance_after_micros"] == 2_500_000 and entry["memo"] == "test top-up"
    await fund(client, admin, alice.project_id, 500_000)
    body = await wallet(client, alice)
    assert body["balance_micros"] == 3_000_000 and body["available_micros"] == 3_000_000
    ledger = await (await client.get(f"/api/v1/projects/{alice.project_id}/wallet/ledger",
                                     headers=alice.headers)).json()
    assert [e["amount_micros"] for e in ledger["items"]] == [500_000, 2_500_000]
    audit = await (await client.get(f"/api/v1/projects/{alice.project_id}/audit?type=wallet.updated",
                                    headers=alice.headers)).json()
    assert [e["data"]["balance_micros"] for e in audit["items"]] == [3_000_000, 2_500_000]
    assert audit["items"][0]["actor"] == f"user:{admin.id}"
    await assert_books_balance(db, alice.project_id)


async def test_only_platform_admins_credit(client, db):
    alice = await register(client)
    resp = await client.post(f"/api/v1/admin/projects/{alice.project_id}/credits",
                             json={"amount_micros": 1_000, "reason": "self-service"}, headers=alice.headers)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"
    assert (await wallet(client, alice))["balance_micros"] == 0


async def test_credit_validation(client, db):
    admin = await platform_admin(client)
    alice = await register(client)
    for bad in ({"amount_micros": 0, "reason": "x"}, {"amount_micros": -5, "reason": "x"},
                {"amount_micros": 1.5, "reason": "x"}, {"amount_micros": 10, "reason": ""}, {"amount_micros": 10}):
        resp = await client.post(f"/api/v1/admin/projects/{alice.project_id}/credits", json=bad,
                                 headers=admin.headers)
        assert resp.status in (400, 422), bad
        assert (await resp.json())["error"]["code"] == "invalid_request"
    resp = await client.post("/api/v1/admin/projects/prj_missing/credits", json={"amount_micros": 1, "reason": "x"},
                             headers=admin.headers)
    assert resp.status == 404
    assert (await wallet(client, alice))["balance_micros"] == 0
    await assert_books_balance(db, alice.project_id)


async def test_idempotent_credit_replays_and_refuses_a_different_body(client, db):
    admin = await platform_admin(client)
    alice = await register(client)
    first = await fund(client, admin, alice.project_id, 1_000_000, key="topup-1")
    headers = {**admin.headers, "Idempotency-Key": "topup-1"}
    again = await client.post(f"/api/v1/admin/projects/{alice.project_id}/credits",
                              json={"amount_micros": 1_000_000, "reason": "test top-up"}, headers=headers)
    assert again.status == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert await again.json() == first
    other = await client.post(f"/api/v1/admin/projects/{alice.project_id}/credits",
                              json={"amount_micros": 2_000_000, "reason": "test top-up"}, headers=headers)
    assert other.status == 409
    assert (await other.json())["error"]["code"] == "conflict"
    assert (await wallet(client, alice))["balance_micros"] == 1_000_000  # charged once
    await assert_books_balance(db, alice.project_id)


async def test_viewers_read_the_wallet_outsiders_do_not(client, db):
    alice = await register(client)
    bob = await register(client)
    eve = await register(client)
    await add_member(client, alice, bob, "viewer")
    resp = await client.get(f"/api/v1/projects/{alice.project_id}/wallet", headers=bob.headers)
    assert resp.status == 200
    resp = await client.get(f"/api/v1/projects/{alice.project_id}/wallet", headers=eve.headers)
    assert resp.status == 404

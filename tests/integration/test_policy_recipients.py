"""``allowed_recipients`` on withdrawals, through the real API on the in-process EVM: an empty or absent
list allows any address, a listed one is paid, an unlisted one is 403 ``policy_violation`` with nothing
held, signed or audited; spelling (lower, upper, EIP-55) never makes one address another; the system
policy applies to every project and the project's list narrows it."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa

from domain.chain import checksum_address
from storage.models import payments
from tests.factories import register
from tests.integration.payments_support import (
    USDC,
    deposit,
    event_types,
    payment_settings,
    run_worker,
    runtime,
    withdraw,
)
from tests.integration.spend_helpers import assert_books_balance, wallet

_keys = itertools.count()


@pytest.fixture
def settings(settings):
    return payment_settings(settings)


def upper(address: str) -> str:
    return "0x" + address[2:].upper()


async def put_policy(client, user, rules) -> None:
    resp = await client.put(f"/api/v1/projects/{user.project_id}/policy", json=rules, headers=user.headers)
    assert resp.status == 200, await resp.text()


async def put_system(client, admin, recipients: list[str] | None) -> None:
    rules = {} if recipients is None else {"allowed_recipients": recipients}
    resp = await client.put("/api/v1/admin/policy", json=rules, headers=admin.headers)
    assert resp.status == 200, await resp.text()


async def payment_count(db) -> int:
    async with db.engine.connect() as conn:
        return (await conn.execute(sa.select(sa.func.count()).select_from(payments))).scalar_one()


async def test_allowed_recipients_decision_table(client, db):
    admin = await register(client, email="admin@smartspace.test")
    alice = await register(client)
    rt = await runtime(client)
    await deposit(client, alice, 100 * USDC)
    a, b = rt.devnet.new_account(), rt.devnet.new_account()

    # (system list (None: never set), project rules, recipient as sent, expected: 201 or the refusing scope)
    table = [
        (None, {}, a, 201),  # nothing anywhere: any address
        ([], {"allowed_recipients": []}, b, 201),  # empty lists: any address
        ([], {"allowed_recipients": [a]}, a, 201),  # listed
        ([], {"allowed_recipients": [a]}, b, "project"),  # not listed
        ([], {"allowed_recipients": [a]}, checksum_address(a), 201),  # listed lower, sent EIP-55
        ([], {"allowed_recipients": [a]}, upper(a), 201),  # listed lower, sent upper-case hex
        ([], {"allowed_recipients": [checksum_address(a)]}, a, 201),  # listed EIP-55, sent lower
        ([], {"allowed_recipients": [upper(a)]}, checksum_address(a), 201),  # listed upper, sent EIP-55
        ([], {"allowed_recipients": [upper(a)]}, upper(b), "project"),
        ([checksum_address(b)], {}, a, "system"),  # the platform's list binds a project without one
        ([checksum_address(b)], {}, b, 201),
        ([a], {"allowed_recipients": [b]}, a, "project"),  # each list must name it
        ([a], {"allowed_recipients": [b]}, b, "system"),
        ([a, b], {"allowed_recipients": [upper(a)]}, a, 201),
        ([a, b], {"allowed_recipients": [upper(a)]}, b, "project"),
        ([], {"max_risk_score": 5}, b, 201),  # a policy without the field: any address
    ]
    held = 0
    for system, rules, to, expected in table:
        await put_system(client, admin, system)
        await put_policy(client, alice, rules)
        before_count, before_events = await payment_count(db), await event_types(db, alice.project_id)
        status, body, _ = await withdraw(client, alice, to, USDC, key=f"row-{next(_keys)}")
        row = (system, rules, to)
        if expected == 201:
            assert status == 201, (row, body)
            assert body["to_address"] == to.lower()
            held += USDC
        else:
            assert status == 403 and body["error"]["code"] == "policy_violation", (row, body)
            assert body["error"]["details"] == {"to_address": to, "rule": "allowed_recipients", "scope": expected}
            assert await payment_count(db) == before_count, row  # nothing signed or stored
            assert await event_types(db, alice.project_id) == before_events, row  # nothing audited
        w = await wallet(client, alice)
        assert w["reserved_micros"] == held and w["balance_micros"] == 100 * USDC, row  # refused: nothing held

    await run_worker(rt)
    paid = sum(1 for *_, expected in table if expected == 201)
    assert await rt.devnet.balance_micros(a) + await rt.devnet.balance_micros(b) == paid * USDC
    w = await wallet(client, alice)
    assert w["reserved_micros"] == 0 and w["balance_micros"] == (100 - paid) * USDC
    await assert_books_balance(db, alice.project_id)


async def test_an_idempotent_replay_of_a_paid_withdrawal_is_not_refused_by_a_later_policy(client, db):
    alice = await register(client)
    rt = await runtime(client)
    await deposit(client, alice, 10 * USDC)
    to = rt.devnet.new_account()
    status, first, _ = await withdraw(client, alice, to, USDC, key="before-the-list")
    assert status == 201
    await put_policy(client, alice, {"allowed_recipients": [rt.devnet.new_account()]})
    status, again, headers = await withdraw(client, alice, to, USDC, key="before-the-list")
    assert status == 201 and again["id"] == first["id"] and headers.get("Idempotent-Replayed") == "true"
    status, body, _ = await withdraw(client, alice, to, USDC, key="after-the-list")
    assert status == 403 and body["error"]["code"] == "policy_violation"
    assert (await wallet(client, alice))["reserved_micros"] == USDC


async def test_policies_refuse_recipients_that_are_not_addresses_naming_the_entry(client, db):
    admin = await register(client, email="admin@smartspace.test")
    alice = await register(client)
    good = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"
    bad_checksum = good[:-1] + "f"
    for bad in (bad_checksum, good + "\n", " " + good, good[:-1], "alice.eth"):
        resp = await client.put(f"/api/v1/projects/{alice.project_id}/policy",
                                json={"allowed_recipients": [good.lower(), bad]}, headers=alice.headers)
        body = await resp.json()
        assert resp.status == 422 and body["error"]["details"]["field"] == "allowed_recipients[1]", (bad, body)
        resp = await client.put("/api/v1/admin/policy", json={"allowed_recipients": [bad]}, headers=admin.headers)
        body = await resp.json()
        assert resp.status == 422 and body["error"]["details"]["field"] == "allowed_recipients[0]", (bad, body)
    resp = await client.put(f"/api/v1/projects/{alice.project_id}/policy",
                            json={"allowed_recipients": [good, good.lower()]}, headers=alice.headers)
    assert resp.status == 422  # one address twice, spelled two ways
    current = await (await client.get(f"/api/v1/projects/{alice.project_id}/policy", headers=alice.headers)).json()
    assert current["version"] == 0 and current["allowed_recipients"] == []

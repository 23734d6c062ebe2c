"""The platform fee (SMARTSPACE_PLATFORM_FEE_BPS): reserved in the worst case, shown on every receipt, the
wallet debited cost + fee and the platform's own ledger credited the fee — the books balance."""

from __future__ import annotations

import msgspec
import pytest
import sqlalchemy as sa

from domain.providers import Usage
from domain.spend.entities import Prepared, fee_micros
from server.settings import SettingsError, load_settings
from storage.models import ledger_entries, platform_ledger
from tests.factories import bearer, create_key
from tests.fakes.gateway import start_gateway
from tests.integration.spend_helpers import (
    COST,
    assert_books_balance,
    create_budget,
    fix_prices,
    funded_project,
    get_budget,
    platform_admin,
    spend,
    wallet,
)

BPS = 500  # 5%, the original system's fee
FEE = COST * BPS // 10_000  # COST is a multiple of 20: exact


@pytest.fixture
def settings(settings):
    return msgspec.structs.replace(settings, platform_fee_bps=BPS)


async def _platform(client, admin) -> dict:
    resp = await client.get("/api/v1/admin/platform/ledger", headers=admin.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_a_request_pays_cost_and_fee_and_the_platform_books_the_fee(client, db):
    admin, owner = await funded_project(client, 1_000_000)
    budget = await create_budget(client, owner, 100_000)
    key = await create_key(client, owner)
    status, body = await spend(client, bearer(key["key"]))
    assert status == 200, body
    receipt = body["receipt"]
    assert (receipt["cost_micros"], receipt["fee_micros"]) == (COST, FEE)
    assert receipt["estimated_cost_micros"] == body["decision"]["estimated_cost_micros"] == COST + FEE
    w = await wallet(client, owner)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000 - COST - FEE, 0)
    assert (await get_budget(client, owner, budget["id"]))["spent_micros"] == COST + FEE
    assert await _platform(client, admin) == {"balance_micros": FEE, "entries": 1, "by_kind": {"platform_fee": FEE}}
    await assert_books_balance(db, owner.project_id)
    async with db.engine.connect() as conn:
        debit = (await conn.execute(sa.select(ledger_entries.c.amount_micros).where(
            ledger_entries.c.project_id == owner.project_id, ledger_entries.c.kind == "spend"))).scalar_one()
        booked = (await conn.execute(sa.select(platform_ledger))).one()
    assert debit == -(COST + FEE)
    assert (booked.amount_micros, booked.ref, booked.project_id) == (FEE, body["id"], owner.project_id)
    # the REST read of the request shows the same receipt
    again = await (await client.get(f"/api/v1/requests/{body['id']}", headers=owner.headers)).json()
    assert again["receipt"]["fee_micros"] == FEE
    usage = await (await client.get(f"/api/v1/projects/{owner.project_id}/usage", headers=owner.headers)).json()
    assert (usage["totals"]["cost_micros"], usage["totals"]["fee_micros"]) == (COST, FEE)
    assert usage["totals"]["cost_micros"] + usage["totals"]["fee_micros"] == -usage["ledger"]["spend"]
    assert usage["totals"]["variance_micros"] == 0
    # only platform admins read the platform's ledger
    assert (await client.get("/api/v1/admin/platform/ledger", headers=owner.headers)).status == 403


async def test_the_worst_case_reserved_includes_the_fee(client, db):
    admin, owner = await funded_project(client, 1_000_000)
    await create_budget(client, owner, COST + FEE - 1)  # room for the cost, not for the fee on it
    key = await create_key(client, owner)
    status, body = await spend(client, bearer(key["key"]))
    assert status == 402 and body["error"]["code"] == "budget_exceeded"
    w = await wallet(client, owner)
    assert (w["balance_micros"], w["reserved_micros"]) == (1_000_000, 0)
    # a wallet with the cost but not the fee is refused too
    _, poor = await funded_project(client, COST, admin=admin)
    key = await create_key(client, poor)
    status, body = await spend(client, bearer(key["key"]))
    assert status == 402 and body["error"]["code"] == "insufficient_funds"
    await assert_books_balance(db, poor.project_id)


async def test_the_gateway_shows_the_fee_in_headers_and_in_the_stream(aiohttp_client, settings, db, metrics):
    gw = await start_gateway(aiohttp_client, settings, db, metrics)
    try:
        admin = await platform_admin(gw.client)
        await fix_prices(gw.client, admin)
        before = (await gw.wallet()).balance_micros
        raw = await gw.oai.chat.completions.with_raw_response.create(
            model="local/echo-1", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert (int(raw.headers["x-smartspace-cost-micros"]), int(raw.headers["x-smartspace-fee-micros"])) == (
            COST, FEE)
        stream = await gw.oai.chat.completions.create(
            model="local/echo-1", messages=[{"role": "user", "content": "hi"}], max_tokens=1, stream=True,
            stream_options={"include_usage": True})
        usage = [c.usage async for c in stream if c.usage is not None][-1]
        assert (usage.model_extra["cost_micros"], usage.model_extra["fee_micros"]) == (COST, FEE)
        assert (await gw.wallet()).balance_micros == before - 2 * (COST + FEE)
        assert await _platform(gw.client, admin) == {"balance_micros": 2 * FEE, "entries": 2,
                                                     "by_kind": {"platform_fee": 2 * FEE}}
        await assert_books_balance(db, gw.project_id)
    finally:
        await gw.close()


def test_the_fee_is_rounded_up_and_never_takes_the_total_past_the_reservation():
    assert fee_micros(0, 500) == 0 and fee_micros(1, 1) == 1 and fee_micros(10_000, 0) == 0
    assert fee_micros(19_999, 500) == 1000  # 999.95 → 1000
    prepared = Prepared(request_id="req_x", project_id="p", model="m/x", provider="m", upstream_model="x",
                        operation="chat", estimated_cost_micros=1050, reserved_micros=1050, input_tokens=1,
                        max_output_tokens=1, input_micros_per_mtok=10**9, output_micros_per_mtok=0,
                        budget_ids=[], actor="key:k", source="api", fee_bps=500)
    assert prepared.charge(Usage(1, 0)) == (1000, 50)
    cost, fee = prepared.charge(Usage(5, 0))  # 5000 + 250 would pass the 1050 reserved
    assert cost + fee == 1050 and fee == 50


def test_the_fee_setting_is_validated():
    assert load_settings({"SMARTSPACE_PLATFORM_FEE_BPS": "500"}, dotenv=None).platform_fee_bps == 500
    assert load_settings({}, dotenv=None).platform_fee_bps == 0
    for bad in ("-1", "10001", "five"):
        with pytest.raises(SettingsError) as err:
            load_settings({"SMARTSPACE_PLATFORM_FEE_BPS": bad}, dotenv=None)
        assert "PLATFORM_FEE_BPS" in str(err.value)

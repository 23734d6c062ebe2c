"""Budgets: CRUD and roles, UTC period resets (day / week / month), threshold alerts once per crossing."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from domain.base import utcnow
from domain.budgets import period_start
from storage.models import budgets
from tests.factories import add_member, bearer, create_agent, create_key, register
from tests.integration.spend_helpers import (
    COST,
    assert_books_balance,
    create_budget,
    events,
    funded_project,
    own_spend,
    spend,
)


async def test_crud_and_roles(client, db):
    alice = await register(client)
    viewer = await register(client)
    await add_member(client, alice, viewer, "viewer")
    base = f"/api/v1/projects/{alice.project_id}/budgets"
    created = await create_budget(client, alice, 5_000_000, "month")
    assert created["spent_micros"] == 0 and created["reserved_micros"] == 0
    assert created["available_micros"] == 5_000_000 and created["alert_thresholds"] == [50, 80, 100]
    assert created["period_start"].startswith(period_start("month", utcnow()).strftime("%Y-%m-%dT00:00:00"))
    listed = await (await client.get(base, headers=viewer.headers)).json()
    assert [b["id"] for b in listed["items"]] == [created["id"]]
    assert (await client.get(f"{base}/{created['id']}", headers=viewer.headers)).status == 200
    resp = await client.post(base, json={"name": "x", "limit_micros": 1, "period": "day"}, headers=viewer.headers)
    assert resp.status == 403
    resp = await client.patch(f"{base}/{created['id']}", json={"limit_micros": 7_000_000, "name": "monthly",
                                                               "alert_thresholds": [90]}, headers=alice.headers)
    assert resp.status == 200
    patched = await resp.json()
    assert (patched["limit_micros"], patched["name"], patched["alert_thresholds"]) == (7_000_000, "monthly", [90])
    updates = await events(client, alice, "budget.updated")
    assert [e["data"]["change"]["kind"] for e in updates] == ["created", "updated"]
    assert updates[-1]["data"]["budget"]["limit_micros"] == 7_000_000
    assert (await client.delete(f"{base}/{created['id']}", headers=viewer.headers)).status == 403
    assert (await client.delete(f"{base}/{created['id']}", headers=alice.headers)).status == 204
    assert (await client.get(f"{base}/{created['id']}", headers=alice.headers)).status == 404
    assert (await (await client.get(base, headers=alice.headers)).json())["items"] == []


async def test_validation(client, db):
    alice = await register(client)
    base = f"/api/v1/projects/{alice.project_id}/budgets"
    for bad in ({"name": "x", "limit_micros": 0, "period": "day"},
                {"name": "x", "limit_micros": 10, "period": "year"},
                {"name": "", "limit_micros": 10, "period": "day"},
                {"name": "x", "limit_micros": 10, "period": "day", "alert_thresholds": [150]},
                {"name": "x", "limit_micros": 1.5, "period": "day"}):
        resp = await client.post(base, json=bad, headers=alice.headers)
        assert resp.status == 422, bad
    resp = await client.post(base, json={"name": "x", "limit_micros": 10, "period": "day", "agent_id": "agt_nope"},
                             headers=alice.headers)
    assert resp.status == 404
    created = await create_budget(client, alice, 100, "day")
    resp = await client.patch(f"{base}/{created['id']}", json={}, headers=alice.headers)
    assert resp.status == 422


async def test_a_limit_below_spent_plus_reserved_is_refused(client, db):
    _, alice = await funded_project(client)
    budget = await create_budget(client, alice, 10 * COST, "week")
    assert (await own_spend(client, alice))[0] == 200
    resp = await client.patch(f"/api/v1/projects/{alice.project_id}/budgets/{budget['id']}",
                              json={"limit_micros": COST - 1}, headers=alice.headers)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "conflict"
    resp = await client.patch(f"/api/v1/projects/{alice.project_id}/budgets/{budget['id']}",
                              json={"limit_micros": COST}, headers=alice.headers)
    assert resp.status == 200 and (await resp.json())["available_micros"] == 0
    assert (await own_spend(client, alice))[1]["error"]["code"] == "budget_exceeded"
    await assert_books_balance(db, alice.project_id)


async def test_periods_reset_on_utc_calendar_boundaries(client, db):
    _, alice = await funded_project(client)
    now = utcnow()
    made = {p: await create_budget(client, alice, 3 * COST, p) for p in ("day", "week", "month", "total")}
    previous = {"day": period_start("day", now) - timedelta(days=1),
                "week": period_start("week", now) - timedelta(days=7),
                "month": (period_start("month", now) - timedelta(days=1)).replace(day=1),
                "total": made["total"]["period_start"]}
    # Every budget used up in its previous period (the total one now, so it stays used up).
    async with db.engine.begin() as conn:
        for period, b in made.items():
            values = {"spent_micros": 3 * COST, "alerted": [50, 80, 100]}
            if period != "total":
                values["period_start"] = previous[period]
            await conn.execute(sa.update(budgets).where(budgets.c.id == b["id"]).values(**values))
    base = f"/api/v1/projects/{alice.project_id}/budgets"
    for period in ("day", "week", "month"):
        shown = await (await client.get(f"{base}/{made[period]['id']}", headers=alice.headers)).json()
        assert shown["spent_micros"] == 0 and shown["available_micros"] == 3 * COST, period
        assert shown["period_start"].startswith(period_start(period, now).strftime("%Y-%m-%dT%H:%M:%S"))
    status, body = await own_spend(client, alice)
    assert status == 402 and body["error"]["code"] == "budget_exceeded"  # the total budget never resets
    await client.delete(f"{base}/{made['total']['id']}", headers=alice.headers)
    status, body = await own_spend(client, alice)
    assert status == 200, body
    async with db.engine.connect() as conn:
        rows = {r.period: r for r in await conn.execute(sa.select(budgets).where(
            budgets.c.project_id == alice.project_id, budgets.c.active.is_(True)))}
    for period in ("day", "week", "month"):
        row = rows[period]
        assert row.period_start == period_start(period, now), period
        assert (row.spent_micros, row.reserved_micros, row.alerted) == (COST, 0, []), period
    assert period_start("week", now).weekday() == 0  # weeks start on Monday
    resets = await events(client, alice, "budget.reset")
    assert sorted(e["data"]["period"] for e in resets) == ["day", "month", "week"]
    await assert_books_balance(db, alice.project_id)


async def test_thresholds_alert_once_per_crossing_per_period(client, db):
    _, alice = await funded_project(client)
    budget = await create_budget(client, alice, 4 * COST, "day", alert_thresholds=[50, 80, 100])
    crossings = []
    for _ in range(4):
        assert (await own_spend(client, alice))[0] == 200
        crossings.append([e["data"]["threshold"] for e in await events(client, alice, "budget.threshold")])
    assert crossings == [[], [50], [50], [50, 80, 100]]
    assert (await own_spend(client, alice))[1]["error"]["code"] == "budget_exceeded"
    alerts = await events(client, alice, "budget.threshold")
    assert [e["data"]["threshold"] for e in alerts] == [50, 80, 100]
    assert alerts[0]["data"]["spent_micros"] == 2 * COST and alerts[0]["data"]["budget_id"] == budget["id"]
    # Next period: the same thresholds alert again, once.
    async with db.engine.begin() as conn:
        await conn.execute(sa.update(budgets).where(budgets.c.id == budget["id"]).values(
            period_start=period_start("day", utcnow()) - timedelta(days=1)))
    for _ in range(3):
        assert (await own_spend(client, alice))[0] == 200
    alerts = await events(client, alice, "budget.threshold")
    assert [e["data"]["threshold"] for e in alerts] == [50, 80, 100, 50]
    await assert_books_balance(db, alice.project_id)


async def test_agent_budgets_apply_to_their_agent_only(client, db):
    _, alice = await funded_project(client)
    agent = await create_agent(client, alice)
    agent_key = await create_key(client, alice, agent_id=agent["id"])
    plain_key = await create_key(client, alice)
    agent_budget = await create_budget(client, alice, COST, "day", agent_id=agent["id"])
    project_budget = await create_budget(client, alice, 10 * COST, "day")
    status, body = await spend(client, bearer(agent_key["key"]))
    assert status == 200 and sorted(body["budget_ids"]) == sorted([agent_budget["id"], project_budget["id"]])
    assert body["agent_id"] == agent["id"]
    status, body = await spend(client, bearer(agent_key["key"]))
    assert status == 402 and body["error"]["code"] == "budget_exceeded"
    status, body = await spend(client, bearer(plain_key["key"]))
    assert status == 200 and body["budget_ids"] == [project_budget["id"]]
    listed = await (await client.get(f"/api/v1/projects/{alice.project_id}/budgets?agent_id={agent['id']}",
                                     headers=alice.headers)).json()
    assert [b["id"] for b in listed["items"]] == [agent_budget["id"]]
    await assert_books_balance(db, alice.project_id)

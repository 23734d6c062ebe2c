"""The hot paths for reserve and settle/fail — storage/hot.py (PostgreSQL) and storage/sqlite_hot.py
(SQLite) — against the generic path.

The same scenarios run twice on fresh databases, once with ``hot_path`` on and once off; the audit logs
must match event for event (types and data, ids and times aside), and so must the books: every
transition (reserve, held for approval, approve, reject, settle, fail — from ``executing`` and from
``approved`` —, expire by the sweeper) on both backends. Then, on PostgreSQL, the cases the hot path
must hand back to the generic path untouched: no room in a budget or the wallet, a budget whose period
ended, a request that is no longer executing; SQLite's own cases are in test_hot_path_sqlite.py.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa

from domain.base import Actor, utcnow
from domain.errors import ApprovalRequired, BudgetExceeded, Conflict, DomainError, InsufficientFunds
from domain.providers import Usage
from domain.spend import SpendCommand
from server.app import create_app
from server.container import Container
from server.metrics import Metrics
from storage import hot as hot_module
from storage import sqlite_hot as sqlite_hot_module
from storage.bus import LocalBus
from storage.hot import PgHotPath
from storage.models import budgets, spend_requests
from storage.sqlite_hot import SqliteHotPath
from tests.conftest import BACKENDS, PG_URL, drop_database, make_database
from tests.factories import bearer, create_agent, create_key
from tests.integration.spend_helpers import (
    COST,
    assert_books_balance,
    create_budget,
    fund,
    funded_project,
    set_policy,
    spend,
    wallet,
)

pg = pytest.mark.skipif(not PG_URL, reason="storage/hot.py is PostgreSQL's (SMARTSPACE_TEST_DATABASE_URL)")

_ID = re.compile(r"^(req|led|evt|bud|prj|key|agt|usr|pol)_[0-9a-f]+$")
_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


class _Normaliser:
    """Ids become their order of first appearance, timestamps a placeholder: two runs compare equal."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, str):
            kind, colon, rest = value.partition(":")
            if colon and kind in ("user", "key") and _ID.match(rest):  # an actor label
                return f"{kind}:{self(rest)}"
            if value.startswith("sk-"):  # a key's random prefix
                return "sk-…"
            if _ID.match(value):
                return self.ids.setdefault(value, f"{value[:3]}#{len(self.ids)}")
            if _TS.match(value):
                return "<ts>"
        return value


@pytest.fixture
async def app_for(aiohttp_client, settings, tmp_path):
    made: list = []

    async def build(hot: bool, backend: str = "postgresql"):
        where = tmp_path / f"db{len(made)}"  # SQLite: a file of its own per app
        where.mkdir()
        db, schema = await make_database(backend, where)
        made.append((db, schema))
        metrics = Metrics()
        container = Container(msgspec.structs.replace(settings, hot_path=hot), db, LocalBus(metrics),
                              metrics=metrics)
        return await aiohttp_client(create_app(settings, container=container)), container

    yield build
    for db, schema in made:
        await drop_database(db, schema)


async def _scenario(client) -> tuple[list[Any], dict[str, Any]]:
    """Settles (with a threshold crossed), a provider failure, a rejection; returns (audit, books)."""
    _, owner = await funded_project(client, 1_000_000)
    agent = await create_agent(client, owner, name="bot")
    key = await create_key(client, owner, agent_id=agent["id"])
    await create_budget(client, owner, 4 * COST, "total", alert_thresholds=[50, 100])
    await create_budget(client, owner, 100 * COST, "day", agent_id=agent["id"])
    headers = bearer(key["key"])
    outcomes = []
    for _ in range(2):
        outcomes.append(await spend(client, headers))
    # A catalog model whose provider this server has not configured: reserved, then failed and released.
    outcomes.append(await spend(client, headers, model="openai/gpt-4o-mini", max_tokens=5))
    outcomes.append(await spend(client, headers))
    outcomes.append(await spend(client, headers, max_tokens=500))  # no room left in the total budget
    audit = (await (await client.get(f"/api/v1/projects/{owner.project_id}/audit?limit=200",
                                     headers=owner.headers)).json())["items"]
    normalise = _Normaliser()
    books = {"statuses": [status for status, _ in outcomes],
             "codes": [body.get("status") or body.get("error", {}).get("code") for _, body in outcomes],
             "wallet": {k: v for k, v in (await wallet(client, owner)).items() if k.endswith("_micros")}}
    verify = await (await client.get(f"/api/v1/projects/{owner.project_id}/audit/verify",
                                     headers=owner.headers)).json()
    books["verify"] = verify["ok"]
    events = [normalise({"seq": e["seq"], "type": e["type"], "actor": e["actor"], "data": e["data"]})
              for e in reversed(audit)]
    return events, books


@pg
async def test_the_hot_path_writes_what_the_generic_path_writes(app_for):
    hot_client, hot_container = await app_for(True)
    cold_client, cold_container = await app_for(False)
    assert isinstance(hot_container.spending.hot, PgHotPath) and cold_container.spending.hot is None
    hot_events, hot_books = await _scenario(hot_client)
    cold_events, cold_books = await _scenario(cold_client)

    assert hot_books == cold_books
    assert hot_books["statuses"] == [200, 200, 404, 200, 402] and hot_books["verify"] is True
    assert [e["type"] for e in hot_events] == [e["type"] for e in cold_events]
    for hot, cold in zip(hot_events, cold_events, strict=True):
        assert hot == cold
    types = [e["type"] for e in hot_events]
    assert "budget.threshold" in types and "request.failed" in types and "request.settled" in types
    # Every spend went through the hot path: 4 reservations, 3 settlements + 1 failure (the brain refused
    # the last request before any reservation: it saw the budget had no room). The first reservation was
    # a transaction of its own; after it this process knew the rows, and each next operation was one
    # express statement.
    assert hot_container.spending.hot.outcomes == {"reserve": 4, "close": 4, "batches": 1, "express": 7}
    await assert_books_balance(hot_container.db, (await _project_of(hot_container)))


async def _every_transition(client, container: Container) -> tuple[list[Any], dict[str, Any]]:
    """Reserve and settle (a threshold crossed), fail from executing (partly charged), held for approval
    then approved and settled, held then rejected, held then approved and failed from ``approved``, held
    and expired by the sweeper, executing and expired by the sweeper, a rejection for no room. Returns
    (audit, books)."""
    spending = container.spending
    _, owner = await funded_project(client, 1_000_000)
    await create_budget(client, owner, 6 * COST, "total", alert_thresholds=[50, 100])
    await create_budget(client, owner, 100 * COST, "day")
    actor = Actor(kind="user", id=owner.id, user_id=owner.id)
    usage = Usage(input_tokens=8, output_tokens=1)
    codes: list[str] = []

    async def held(source: str) -> str:
        with pytest.raises(ApprovalRequired) as caught:
            await spending.prepare(actor, _command(owner, max_tokens=3), source=source)
        return caught.value.details["request_id"]

    async def expire(request_id: str) -> None:
        async with container.db.engine.begin() as conn:
            await conn.execute(sa.update(spend_requests).where(spend_requests.c.id == request_id)
                               .values(reservation_expires_at=utcnow() - timedelta(seconds=1)))
        assert await spending.sweep() == 1

    for _ in range(3):  # reserve, settle; the third crosses the 50 % threshold of the total budget
        await spending.settle(await spending.prepare(actor, _command(owner)), usage)
    failing = await spending.prepare(actor, _command(owner))
    await spending.fail(failing, UpstreamFailed("the provider failed"), Usage(input_tokens=4, output_tokens=0))
    await set_policy(client, owner, require_approval_above_micros=COST)
    approved = await held("gateway")  # approved, then its waiting caller claims and settles it
    codes.append((await spending.approve(actor, approved)).status)
    await spending.settle(await spending.wait_for_approval(approved, 5), usage)
    rejected = await held("api")
    codes.append((await spending.reject(actor, rejected, "no")).status)
    failed = await held("gateway")  # approved, then failed from approved (its caller went away)
    row = await spending.approve(actor, failed)
    codes.append(row.status)
    await spending.fail(spending._prepared(row), UpstreamFailed("the caller went away"))
    await expire(await held("gateway"))  # nobody answered: expired
    await set_policy(client, owner)  # nothing held any more
    await expire((await spending.prepare(actor, _command(owner))).request_id)  # abandoned: failed
    try:
        await spending.prepare(actor, _command(owner, max_tokens=100))  # no room left in the budget
    except DomainError as exc:
        codes.append(exc.code)
    audit = (await (await client.get(f"/api/v1/projects/{owner.project_id}/audit?limit=200",
                                     headers=owner.headers)).json())["items"]
    async with container.db.engine.connect() as conn:
        rows = (await conn.execute(sa.select(spend_requests.c.status, spend_requests.c.cost_micros,
                                             spend_requests.c.reserved_micros).order_by(spend_requests.c.created_at,
                                                                                       spend_requests.c.id))).all()
    verify = await (await client.get(f"/api/v1/projects/{owner.project_id}/audit/verify",
                                     headers=owner.headers)).json()
    books = {"codes": codes, "requests": [tuple(r) for r in rows], "verify": verify["ok"],
             "wallet": {k: v for k, v in (await wallet(client, owner)).items() if k.endswith("_micros")},
             "budgets": await _budget_figures(container)}
    await assert_books_balance(container.db, owner.project_id)
    normalise = _Normaliser()
    return [normalise({"seq": e["seq"], "type": e["type"], "actor": e["actor"], "data": e["data"]})
            for e in reversed(audit)], books


async def _budget_figures(container: Container) -> list[tuple]:
    async with container.db.engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(
            sa.select(budgets.c.period, budgets.c.spent_micros, budgets.c.reserved_micros, budgets.c.alerted)
            .order_by(budgets.c.period))]


class UpstreamFailed(DomainError):
    code = "upstream_error"
    status = 502


@pytest.mark.parametrize("backend", BACKENDS)
async def test_every_transition_writes_on_the_hot_path_what_the_generic_path_writes(app_for, backend):
    hot_client, hot_container = await app_for(True, backend)
    cold_client, cold_container = await app_for(False, backend)
    hot = hot_container.spending.hot
    assert isinstance(hot, PgHotPath if backend == "postgresql" else SqliteHotPath)
    assert cold_container.spending.hot is None
    hot_events, hot_books = await _every_transition(hot_client, hot_container)
    cold_events, cold_books = await _every_transition(cold_client, cold_container)

    assert hot_books == cold_books
    assert hot_books["verify"] is True and hot_books["codes"] == ["approved", "rejected", "approved",
                                                                      "budget_exceeded"]
    assert [status for status, _, _ in hot_books["requests"]] == [
        "settled", "settled", "settled", "failed", "settled", "rejected", "failed", "expired", "failed", "rejected"]
    assert [e["type"] for e in hot_events] == [e["type"] for e in cold_events]
    for hot_event, cold_event in zip(hot_events, cold_events, strict=True):
        assert hot_event == cold_event
    types = {e["type"] for e in hot_events}
    assert {"budget.threshold", "approval.requested", "approval.resolved", "request.failed",
            "request.settled"} <= types, types
    resolutions = [e["data"]["resolution"] for e in hot_events if e["type"] == "approval.resolved"]
    assert resolutions == ["approved", "rejected", "approved", "expired"]
    # The hot path did the reservations (5 executing + 4 held) and the closings of executing or approved
    # requests (4 settled, 2 failed); approve, reject and the sweeper are the generic path's on both runs.
    assert hot.outcomes["reserve"] == 9 and hot.outcomes["close"] == 6, hot.outcomes


async def _project_of(container: Container) -> str:
    async with container.db.engine.connect() as conn:
        return (await conn.execute(sa.select(spend_requests.c.project_id).limit(1))).scalar_one()


@pg
async def test_a_budget_whose_period_ended_is_rolled_by_the_generic_path(app_for):
    client, container = await app_for(True)
    _, owner = await funded_project(client, 1_000_000)
    day = await create_budget(client, owner, 3 * COST, "day")
    async with container.db.engine.begin() as conn:  # yesterday's spending, never rolled
        await conn.execute(sa.update(budgets).where(budgets.c.id == day["id"]).values(
            spent_micros=3 * COST, period_start=day_start() - timedelta(days=1)))
    status, body = await spend(client, owner.headers, project_id=owner.project_id)
    assert status == 200, body
    assert container.spending.hot.outcomes["declined"] == 1 and container.spending.hot.outcomes["close"] == 1
    resets = (await (await client.get(f"/api/v1/projects/{owner.project_id}/audit?type=budget.reset",
                                      headers=owner.headers)).json())["items"]
    assert len(resets) == 1
    async with container.db.engine.connect() as conn:
        row = (await conn.execute(sa.select(budgets).where(budgets.c.id == day["id"]))).one()
    assert (row.spent_micros, row.reserved_micros, row.period_start) == (COST, 0, day_start())
    await assert_books_balance(container.db, owner.project_id)


def day_start():
    return utcnow().replace(hour=0, minute=0, second=0, microsecond=0)


@pg
async def test_a_wallet_emptied_after_the_decision_is_refused_by_the_generic_path(app_for):
    """The brain saw room; another request took it before this one reserved. The hot path changes
    nothing and declines; the generic path answers insufficient_funds and records the rejection."""
    client, container = await app_for(True)
    _, owner = await funded_project(client, COST)
    actor = Actor(kind="user", id=owner.id, user_id=owner.id)
    brain = container.spending.brain
    rival = []

    class RivalFirst:
        async def decide(self, req, now):
            decision = await brain.decide(req, now)
            if not rival:  # between this decision and its reservation, a rival reserves the whole wallet
                container.spending.brain = brain
                rival.append(await container.spending.prepare(actor, _command(owner)))
            return decision

    container.spending.brain = RivalFirst()
    with pytest.raises(InsufficientFunds):
        await container.spending.prepare(actor, _command(owner))
    assert container.spending.hot.outcomes == {"reserve": 1, "declined": 1, "batches": 1}
    w = await wallet(client, owner)
    assert (w["balance_micros"], w["reserved_micros"]) == (COST, COST)  # only the rival's hold
    async with container.db.engine.connect() as conn:
        rows = (await conn.execute(sa.select(spend_requests.c.status, spend_requests.c.reserved_micros)
                                   .order_by(spend_requests.c.id))).all()
    assert sorted((r.status, r.reserved_micros) for r in rows) == [("executing", COST), ("rejected", 0)]
    await container.spending.settle(rival[0], Usage(input_tokens=8, output_tokens=1))
    assert (await wallet(client, owner))["balance_micros"] == 0
    await assert_books_balance(container.db, owner.project_id)


async def _settled_books(client, db, owner, balance: int) -> None:
    """Nothing left reserved, the expected balance, the hash chain intact, the ledger summing to the balance."""
    w = await wallet(client, owner)
    assert (w["balance_micros"], w["reserved_micros"]) == (balance, 0)
    verify = await (await client.get(f"/api/v1/projects/{owner.project_id}/audit/verify",
                                     headers=owner.headers)).json()
    assert verify["ok"] is True, verify
    await assert_books_balance(db, owner.project_id)


def _command(owner, project: bool = True, max_tokens: int = 1) -> SpendCommand:
    return SpendCommand(model="local/echo-1", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens,
                        project_id=owner.project_id if project else None)


@pg
async def test_settling_a_request_the_sweeper_expired_is_a_conflict_and_charges_nothing(app_for):
    client, container = await app_for(True)
    _, owner = await funded_project(client, 1_000_000)
    actor = Actor(kind="user", id=owner.id, user_id=owner.id)
    prepared = await container.spending.prepare(actor, _command(owner))
    async with container.db.engine.begin() as conn:
        await conn.execute(sa.update(spend_requests).where(spend_requests.c.id == prepared.request_id)
                           .values(reservation_expires_at=utcnow() - timedelta(seconds=1)))
    assert await container.spending.sweep() == 1
    with pytest.raises(Conflict):
        await container.spending.settle(prepared, Usage(input_tokens=8, output_tokens=1))
    assert container.spending.hot.outcomes["declined"] == 1
    await _settled_books(client, container.db, owner, 1_000_000)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_settlements_share_transactions_and_one_bad_request_spoils_nothing(app_for, backend):
    """20 settlements at once go through a few group-committed transactions; one of them is for a request
    the sweeper already expired: its batch rolls back, every other request still settles (alone), the
    expired one gets the generic path's Conflict, and the books and the hash chain hold."""
    client, container = await app_for(True, backend)
    _, owner = await funded_project(client, 1_000_000)
    actor = Actor(kind="user", id=owner.id, user_id=owner.id)
    prepared = [await container.spending.prepare(actor, _command(owner)) for _ in range(20)]
    async with container.db.engine.begin() as conn:
        await conn.execute(sa.update(spend_requests).where(spend_requests.c.id == prepared[7].request_id)
                           .values(reservation_expires_at=utcnow() - timedelta(seconds=1)))
    assert await container.spending.sweep() == 1
    hot = container.spending.hot
    hot.outcomes.clear()
    results = await asyncio.gather(*(container.spending.settle(p, Usage(input_tokens=8, output_tokens=1))
                                     for p in prepared), return_exceptions=True)
    assert [type(r).__name__ for r in results].count("Receipt") == 19
    assert isinstance(results[7], Conflict)
    # The batch with the expired request rolled back; its members then ran one by one.
    assert hot.outcomes["close"] == 19 and hot.outcomes["declined"] == 1
    assert hot.outcomes["split"] >= 1 and hot.outcomes["batches"] == 19  # then each alone
    await _settled_books(client, container.db, owner, 1_000_000 - 19 * COST)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_settlements_commit_together(app_for, backend):
    client, container = await app_for(True, backend)
    _, owner = await funded_project(client, 1_000_000)
    actor = Actor(kind="user", id=owner.id, user_id=owner.id)
    prepared = [await container.spending.prepare(actor, _command(owner)) for _ in range(30)]
    hot = container.spending.hot
    hot.outcomes.clear()
    receipts = await asyncio.gather(*(container.spending.settle(p, Usage(input_tokens=8, output_tokens=1))
                                      for p in prepared))
    assert sum(r.cost_micros for r in receipts) == 30 * COST
    assert hot.outcomes["close"] == 30 and hot.outcomes["batches"] <= 3, hot.outcomes
    events = (await (await client.get(f"/api/v1/projects/{owner.project_id}/audit?type=request.settled&limit=100",
                                      headers=owner.headers)).json())["items"]
    assert sorted(e["data"]["request_id"] for e in events) == sorted(p.request_id for p in prepared)
    await _settled_books(client, container.db, owner, 1_000_000 - 30 * COST)


@pg
async def test_rows_changed_elsewhere_make_the_express_lane_stand_aside(app_for):
    """The express lane builds on the rows as this process last wrote them. An admin's credit (the wallet)
    and a budget edit (its name and limit) in between: the statement changes nothing, the normal path
    runs, and the events show the rows as they really are."""
    client, container = await app_for(True)
    admin, owner = await funded_project(client, 1_000_000)
    budget = await create_budget(client, owner, 50 * COST, "total")
    hot = container.spending.hot
    assert (await spend(client, owner.headers, project_id=owner.project_id))[0] == 200
    assert (await spend(client, owner.headers, project_id=owner.project_id))[0] == 200
    assert hot.outcomes["express"] == 3 and hot.outcomes["stale"] == 0  # all but the very first
    await fund(client, admin, owner.project_id, 5)  # the wallet moves under the hot path's feet
    assert (await spend(client, owner.headers, project_id=owner.project_id))[0] == 200
    assert hot.outcomes["stale"] == 1 and hot.outcomes["express"] == 4  # the reservation fell back, the settle not
    resp = await client.patch(f"/api/v1/projects/{owner.project_id}/budgets/{budget['id']}", headers=owner.headers,
                              json={"name": "renamed", "limit_micros": 40 * COST})
    assert resp.status == 200, await resp.text()
    assert (await spend(client, owner.headers, project_id=owner.project_id))[0] == 200
    assert hot.outcomes["stale"] == 2
    updates = (await (await client.get(f"/api/v1/projects/{owner.project_id}/audit?type=budget.updated&limit=1",
                                       headers=owner.headers)).json())["items"]
    assert updates[0]["data"]["budget"]["name"] == "renamed"
    assert updates[0]["data"]["budget"]["limit_micros"] == 40 * COST
    assert updates[0]["data"]["budget"]["spent_micros"] == 4 * COST
    await _settled_books(client, container.db, owner, 1_000_005 - 4 * COST)


@pg
async def test_two_processes_taking_turns_on_one_project_never_build_on_stale_rows(app_for, settings):
    """Two hot paths (two server processes) on one database spend from one project in turn: each finds the
    rows moved by the other, its express statement undoes itself, the normal path runs. Every operation
    is accounted once and the log's chain holds."""
    client, first = await app_for(True)
    metrics = Metrics()
    second = Container(settings, first.db, LocalBus(metrics), metrics=metrics)  # another process's container
    _, owner = await funded_project(client, 1_000_000)
    await create_budget(client, owner, 100 * COST, "month")
    key = await create_key(client, owner)
    actors = [await first.authenticate(key["key"]), await second.authenticate(key["key"])]
    spendings = [first.spending, second.spending]
    for i in range(12):
        mine = spendings[i % 2]
        prepared = await mine.prepare(actors[i % 2], _command(owner, project=False))
        await spendings[(i // 2) % 2].settle(prepared, Usage(input_tokens=8, output_tokens=1))
    outcomes = first.spending.hot.outcomes + second.spending.hot.outcomes
    assert outcomes["reserve"] == 12 and outcomes["close"] == 12
    assert outcomes["stale"] >= 6 and outcomes["express"] >= 1, outcomes
    async with first.db.engine.connect() as conn:
        spent = (await conn.execute(sa.select(budgets.c.spent_micros, budgets.c.reserved_micros))).one()
    assert tuple(spent) == (12 * COST, 0)
    await _settled_books(client, first.db, owner, 1_000_000 - 12 * COST)


@pg
async def test_the_hot_path_counters_are_on_the_metrics_page(app_for):
    client, _ = await app_for(True)
    _, owner = await funded_project(client, 1_000_000)
    for _ in range(3):
        assert (await spend(client, owner.headers, project_id=owner.project_id))[0] == 200
    page = await (await client.get("/metrics")).text()
    assert 'smartspace_hot_path_total{outcome="express"} 5.0' in page  # all but the very first operation
    assert 'smartspace_hot_path_total{outcome="reserve"} 3.0' in page
    assert 'smartspace_hot_path_total{outcome="close"} 3.0' in page


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_unexpected_error_in_one_operation_stays_with_its_request(app_for, monkeypatch, backend):
    """A bug that strikes one operation of a batch (here: its event data cannot be encoded) fails that
    request alone; the batch is retried member by member, the others settle, and the hot path keeps
    serving afterwards."""
    client, container = await app_for(True, backend)
    _, owner = await funded_project(client, 1_000_000)
    actor = Actor(kind="user", id=owner.id, user_id=owner.id)
    prepared = [await container.spending.prepare(actor, _command(owner)) for _ in range(10)]
    hot = container.spending.hot
    module = hot_module if backend == "postgresql" else sqlite_hot_module
    real_link = module.link

    def exploding_link(pending, *args):
        if any(p.data.get("request_id") == prepared[3].request_id for p in pending):
            raise RuntimeError("boom")
        return real_link(pending, *args)

    monkeypatch.setattr(module, "link", exploding_link)
    hot.outcomes.clear()
    results = await asyncio.gather(*(container.spending.settle(p, Usage(input_tokens=8, output_tokens=1))
                                     for p in prepared), return_exceptions=True)
    assert isinstance(results[3], RuntimeError)
    assert [type(r).__name__ for r in results].count("Receipt") == 9
    assert hot.outcomes["split"] >= 1 and hot.outcomes["close"] == 9
    monkeypatch.setattr(module, "link", real_link)
    # The failed one is still executing (nothing was written for it): it settles now, and so does a new one.
    await container.spending.settle(prepared[3], Usage(input_tokens=8, output_tokens=1))
    assert (await spend(client, owner.headers, project_id=owner.project_id))[0] == 200
    await _settled_books(client, container.db, owner, 1_000_000 - 11 * COST)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_reservations_never_take_a_budget_over_its_limit(app_for, backend):
    """40 reservations at once against a budget with room for 10, while an admin credits the wallet through
    the generic path in between: exactly 10 are reserved, the rest refused with budget_exceeded, and the
    budget ends at its limit, never above."""
    client, container = await app_for(True, backend)
    admin, owner = await funded_project(client, 1_000_000)
    budget = await create_budget(client, owner, 10 * COST, "total")
    actor = Actor(kind="user", id=owner.id, user_id=owner.id)

    async def one():
        try:
            return await container.spending.prepare(actor, _command(owner))
        except BudgetExceeded as exc:
            return exc

    results = await asyncio.gather(*(one() for _ in range(40)), fund(client, admin, owner.project_id, 7),
                                   fund(client, admin, owner.project_id, 11))
    prepared = [r for r in results[:40] if not isinstance(r, BudgetExceeded)]
    assert len(prepared) == 10
    async with container.db.engine.connect() as conn:
        row = (await conn.execute(sa.select(budgets).where(budgets.c.id == budget["id"]))).one()
    assert (row.spent_micros, row.reserved_micros) == (0, 10 * COST)
    await asyncio.gather(*(container.spending.settle(p, Usage(input_tokens=8, output_tokens=1)) for p in prepared))
    await _settled_books(client, container.db, owner, 1_000_018 - 10 * COST)
    assert container.spending.hot.outcomes["reserve"] >= 1 and container.spending.hot.outcomes["close"] == 10

"""Insights end to end, on SQLite and PostgreSQL: the SQL read model over fixed activity, raising /
updating / resolving through the unit of work (one open insight per kind and subject, even with two
evaluators at once), dismissals, the REST routes, live ``insight.*`` events on ``/budgets`` from real
gateway traffic (a cost overrun, a rejection burst), and the signed alert webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from datetime import timedelta

import msgspec
import pytest
import sqlalchemy as sa
from aiohttp import web

from agentic.insights import evaluate
from domain.base import new_id, utcnow
from domain.budgets import BudgetCreate
from domain.catalog import SEED, cost_micros
from domain.insights import InsightRunner
from server.alerts import SIGNATURE, TIMESTAMP, WebhookAlerts
from server.container import Container
from server.settings import Settings
from storage.bus import LocalBus
from storage.catalog import seed_catalog
from storage.db import Database
from storage.insights import InsightRows, SqlInsightView
from storage.models import api_keys, events, insights, platform_ledger, spend_requests
from tests.factories import add_member, quick_user, register
from tests.fakes.gateway import start_gateway
from tests.fakes.upstream import Behavior
from tests.live import WAIT, LiveClient

PRICES = {m.id: m for m in SEED}


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), jwt_secret="test-secret-" + "x" * 32, access_log=False,
                    admin_emails=("admin@smartspace.test",), insight_debounce_seconds=0.05,
                    insight_schedule_seconds=3600)


def runner(container: Container, clock=utcnow, db: Database | None = None) -> InsightRunner:
    """A runner over the container's real unit of work and read-only view, with its own clock."""
    view = SqlInsightView(db or container.db, container.insight_thresholds)
    return InsightRunner(uow=container.uow, read=view.activity, evaluate=evaluate,
                         thresholds=container.insight_thresholds, due=view.due, update_seconds=0,
                         lock_first=not container.db.is_sqlite, clock=clock)


async def add_requests(db: Database, project_id: str, rows: list[dict]) -> None:
    """Spend requests as the spend path leaves them (settled unless told), written straight in SQL."""
    base = dict(project_id=project_id, agent_id=None, key_id=None, actor="system:test", source="gateway",
                operation="chat", model="openai/gpt-4o-mini", provider="openai", status="settled", decision=None,
                params={}, metadata={}, estimated_cost_micros=0, reserved_micros=0, cost_micros=0, input_tokens=10,
                output_tokens=10, risk_score=None, budget_ids=[], error=None, idempotency_key=None, response=None,
                reservation_expires_at=None, approval_expires_at=None, resolved_by=None, tx_hash=None,
                settlement_batch_id=None, settled_at=None)
    async with db.write() as conn:
        await conn.execute(sa.insert(spend_requests), [{**base, "id": new_id("req"), **row} for row in rows])


def spiky_history(now, *, spike: int = 40) -> list[dict]:
    """Ten days of one 1 000 µUSDC request an hour, then ``spike`` of them in the last hour."""
    rows = [{"created_at": now - timedelta(hours=h, minutes=30), "cost_micros": 1000} for h in range(1, 240)]
    rows += [{"created_at": now - timedelta(minutes=1 + (i % 55)), "cost_micros": 1000} for i in range(spike)]
    return rows


async def project_insights(db: Database, project_id: str) -> list[dict]:
    async with db.read() as conn:
        rows = await conn.execute(sa.select(insights).where(insights.c.project_id == project_id)
                                  .order_by(insights.c.id))
        return [dict(r._mapping) for r in rows]


async def event_types(db: Database, project_id: str) -> list[str]:
    async with db.read() as conn:
        rows = await conn.execute(sa.select(events.c.type).where(
            events.c.project_id == project_id, events.c.type.startswith("insight.")).order_by(events.c.seq))
        return [r[0] for r in rows]


# ---------------------------------------------------------------- the read model and the lifecycle
async def test_the_read_model_sums_fixed_activity_in_sql(container):
    await seed_catalog(container.db)
    user = await quick_user(container)
    now = utcnow()
    await add_requests(container.db, user.project_id, [
        *spiky_history(now),
        {"created_at": now - timedelta(minutes=3), "status": "rejected", "key_id": "key_x", "cost_micros": None,
         "error": {"code": "policy_violation", "message": "model blocked"}},
        {"created_at": now - timedelta(minutes=20), "model": "openai/gpt-4o", "cost_micros": 5000,
         "input_tokens": 300, "output_tokens": 70, "agent_id": "agt_a"},
    ])
    act = await container.insight_view.activity(user.project_id, now)
    by_model = {m.model: m for m in act.models}
    mini = by_model["openai/gpt-4o-mini"]
    assert (mini.base_requests, mini.hour_requests) == (239, 41)  # the rejected request counts as a request
    assert (mini.base_cost_micros, mini.hour_cost_micros) == (239_000, 40_000)
    assert mini.recent_requests == 23 + 41 and mini.before_recent_requests == 239 - 23
    gpt4o = by_model["openai/gpt-4o"]
    assert (gpt4o.week_input_tokens, gpt4o.week_output_tokens, gpt4o.week_cost_micros) == (300, 70, 5000)
    assert sum(act.burn[""]) == 40_000 and sum(act.burn["agt_a"]) == 5000  # charged requests only
    assert len(act.burn[""]) == 6
    [rejected] = act.rejections
    assert (rejected.key_id, rejected.count, rejected.top_reason, rejected.top_message) == \
        ("key_x", 1, "policy_violation", "model blocked")
    assert {m.provider for m in act.catalog} == {"openai"}


async def test_an_insight_is_raised_once_updated_and_resolved_when_its_condition_clears(container):
    user = await quick_user(container)
    now = utcnow()
    await add_requests(container.db, user.project_id, spiky_history(now))
    assert await runner(container, lambda: now).evaluate(user.project_id) is True
    raised = {r["kind"]: r for r in await project_insights(container.db, user.project_id)}
    assert {"request_spike", "cost_spike", "wallet_runway"} <= set(raised)
    spike = raised["request_spike"]
    assert spike["status"] == "open" and spike["evidence"]["window_requests"] == 40
    assert spike["evidence"]["baseline_per_hour"] == pytest.approx(239 / (239.5 - 1), rel=0.01)
    created = await event_types(container.db, user.project_id)
    assert created.count("insight.created") == len(raised)

    # the same activity again: nothing new
    assert await runner(container, lambda: now).evaluate(user.project_id) is True
    assert len(await project_insights(container.db, user.project_id)) == len(raised)
    assert await event_types(container.db, user.project_id) == created

    # more requests in the same hour: the spike's figures are updated in place
    await add_requests(container.db, user.project_id,
                       [{"created_at": now - timedelta(minutes=2), "cost_micros": 1000}] * 20)
    await runner(container, lambda: now).evaluate(user.project_id)
    rows = {r["kind"]: r for r in await project_insights(container.db, user.project_id)}
    assert rows["request_spike"]["id"] == spike["id"] and rows["request_spike"]["evidence"]["window_requests"] == 60
    assert "insight.updated" in await event_types(container.db, user.project_id)

    # two hours later the last hour is quiet: the spikes resolve (the wallet is still empty, but nothing burns)
    await runner(container, lambda: now + timedelta(hours=2)).evaluate(user.project_id)
    rows = {r["kind"]: r for r in await project_insights(container.db, user.project_id)}
    assert rows["request_spike"]["status"] == "resolved" and rows["request_spike"]["resolved_at"] is not None
    assert rows["wallet_runway"]["status"] == "resolved"
    assert (await event_types(container.db, user.project_id)).count("insight.resolved") == len(raised)


async def test_a_dismissed_insight_is_not_raised_again_until_it_clears_and_comes_back(client, container):
    user = await register(client)
    now = utcnow()
    await add_requests(container.db, user.project_id, spiky_history(now))
    await runner(container, lambda: now).evaluate(user.project_id)
    base = f"/api/v1/projects/{user.project_id}/insights"
    [spike] = (await (await client.get(base + "?kind=request_spike", headers=user.headers)).json())["items"]
    resp = await client.post(f"{base}/{spike['id']}/dismiss", json={"note": "load test"}, headers=user.headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "dismissed"

    await runner(container, lambda: now + timedelta(seconds=30)).evaluate(user.project_id)  # still spiking
    spikes = [r for r in await project_insights(container.db, user.project_id) if r["kind"] == "request_spike"]
    assert [(r["id"], r["status"]) for r in spikes] == [(spike["id"], "dismissed")]

    await runner(container, lambda: now + timedelta(hours=2)).evaluate(user.project_id)  # cleared
    await runner(container, lambda: now).evaluate(user.project_id)  # and back
    spikes = [r for r in await project_insights(container.db, user.project_id) if r["kind"] == "request_spike"]
    assert [r["status"] for r in spikes] == ["resolved", "open"]
    assert spikes[0]["id"] == spike["id"] and spikes[0]["note"] == "load test"


async def test_two_evaluators_at_once_raise_each_insight_once(container, db, backend):
    user = await quick_user(container)
    now = utcnow()
    await add_requests(container.db, user.project_id, spiky_history(now))
    if backend == "postgresql":
        schema = db._server_settings["search_path"]
        other_db = Database(str(db.url.render_as_string(hide_password=False)), schema=schema)
    else:
        other_db = Database(db.url.render_as_string(hide_password=False))
    other = Container(container.settings, other_db, LocalBus())
    try:
        for _ in range(5):
            results = await asyncio.gather(runner(container, lambda: now).evaluate(user.project_id),
                                           runner(other, lambda: now).evaluate(user.project_id))
            assert results.count(True) >= 1 and set(results) <= {True, False, None}
        rows = await project_insights(container.db, user.project_id)
        slots = [(r["kind"], r["subject_key"]) for r in rows if r["resolved_at"] is None]
        assert len(slots) == len(set(slots)) >= 3
        types = await event_types(container.db, user.project_id)
        assert types.count("insight.created") == len(rows)
    finally:
        await other_db.dispose()


async def test_a_steady_drain_forecasts_the_budget_and_the_wallet_and_idle_keys_are_found(container):
    """budget_forecast, wallet_runway and idle_key from rows in the real tables, through the runner."""
    user = await quick_user(container)
    now = utcnow()
    async with container.uow() as scope:
        budget = await scope.budgets.create(user.project_id, BudgetCreate(name="prod-daily", limit_micros=2_000_000,
                                                                          period="total"))
        await scope.wallets.credit(user.project_id, 3_000_000, kind="admin_credit", ref=None, memo="test")
    # 100 000 µUSDC in each of the last six 10-minute buckets (600 000 / h): the wallet lasts 5 h, the budget 3.3 h
    await add_requests(container.db, user.project_id, [
        {"created_at": now - timedelta(minutes=5 + 10 * b), "cost_micros": 100_000} for b in range(6)])
    async with container.db.write() as conn:
        await conn.execute(sa.insert(api_keys).values(
            id="key_old", project_id=user.project_id, name="forgotten", prefix="sk-old", key_hash="h" * 64,
            created_by=user.id, created_at=now - timedelta(days=60), last_used_at=now - timedelta(days=31)))
        await conn.execute(sa.insert(api_keys).values(
            id="key_new", project_id=user.project_id, name="busy", prefix="sk-new", key_hash="g" * 64,
            created_by=user.id, created_at=now - timedelta(days=60), last_used_at=now - timedelta(days=1)))
    await runner(container, lambda: now).evaluate(user.project_id)
    found = {r["kind"]: r for r in await project_insights(container.db, user.project_id)}
    assert set(found) == {"budget_forecast", "wallet_runway", "idle_key"}
    forecast = found["budget_forecast"]
    assert forecast["subject"] == {"budget_id": budget.id} and forecast["severity"] == "warning"
    assert forecast["evidence"]["burn_micros_per_hour"] == 600_000
    assert forecast["evidence"]["limit_micros"] == 2_000_000 and forecast["evidence"]["period_end"] is None
    assert found["wallet_runway"]["evidence"]["available_micros"] == 3_000_000
    assert found["wallet_runway"]["severity"] == "critical"
    assert found["idle_key"]["subject"] == {"key_id": "key_old"}


async def test_the_schedule_evaluates_projects_left_alone_and_a_covered_event_is_skipped(container):
    user = await quick_user(container)
    now = utcnow()
    await add_requests(container.db, user.project_id, spiky_history(now))
    clock = [now]
    r = runner(container, lambda: clock[0])
    assert await r.evaluate(user.project_id) is True
    assert await r.evaluate(user.project_id, heard=now - timedelta(seconds=5)) is None  # already covered
    assert await r.evaluate(user.project_id, heard=now) is True  # heard after that evaluation began
    assert await r.run_schedule_once() == 0  # evaluated a moment ago: not due
    clock[0] = now + timedelta(hours=2)  # nothing happened since; time alone clears the spikes
    assert await r.run_schedule_once() == 1
    rows = {r["kind"]: r for r in await project_insights(container.db, user.project_id)}
    assert rows["request_spike"]["status"] == "resolved"


async def test_the_evaluators_view_cannot_write(container):
    user = await quick_user(container)
    with pytest.raises(sa.exc.DBAPIError):
        async with container.db.read_only() as conn:
            await InsightRows(conn).mark_evaluated(user.project_id, utcnow())
    assert (await container.insight_view.activity(user.project_id, utcnow())).found is True  # reads work


async def test_the_slot_is_a_database_constraint_not_a_check(container):
    user = await quick_user(container)
    now = utcnow()
    row = dict(project_id=user.project_id, kind="wallet_runway", subject_key="", subject={}, severity="warning",
               title="t", message="m", evidence={}, status="open", created_at=now, updated_at=now)
    async with container.db.write() as conn:
        await conn.execute(sa.insert(insights).values(id=new_id("ins"), **row))
    with pytest.raises(sa.exc.IntegrityError):
        async with container.db.write() as conn:
            await conn.execute(sa.insert(insights).values(id=new_id("ins"), **row))
    async with container.db.write() as conn:  # a resolved one frees the slot
        await conn.execute(sa.update(insights).values(resolved_at=now, status="resolved"))
        await conn.execute(sa.insert(insights).values(id=new_id("ins"), **row))


# ---------------------------------------------------------------- REST
async def test_rest_lists_gets_acknowledges_and_dismisses_with_roles(client, container):
    owner, viewer, member, stranger = [await register(client) for _ in range(4)]
    await add_member(client, owner, viewer, "viewer")
    await add_member(client, owner, member, "member")
    now = utcnow()
    await add_requests(container.db, owner.project_id, spiky_history(now))
    await runner(container, lambda: now).evaluate(owner.project_id)
    base = f"/api/v1/projects/{owner.project_id}/insights"

    listed = await (await client.get(base, headers=viewer.headers)).json()
    ids = [i["id"] for i in listed["items"]]
    assert ids == sorted(ids, reverse=True) and len(ids) >= 3  # newest first
    [one] = [i for i in listed["items"] if i["kind"] == "request_spike"]
    assert set(one) >= {"id", "project_id", "kind", "severity", "title", "message", "evidence", "subject", "status",
                        "created_at", "updated_at", "resolved_at"}
    got = await client.get(f"{base}/{one['id']}", headers=viewer.headers)
    assert got.status == 200 and (await got.json())["id"] == one["id"]

    resp = await client.post(f"{base}/{one['id']}/acknowledge", headers=viewer.headers)
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    assert (await client.get(base, headers=stranger.headers)).status == 404
    assert (await client.get(f"{base}/{one['id']}", headers=stranger.headers)).status == 404

    resp = await client.post(f"{base}/{one['id']}/acknowledge", headers=member.headers)  # no body at all
    assert resp.status == 200, await resp.text()
    acked = await resp.json()
    assert acked["status"] == "acknowledged" and acked["acted_by"] == f"user:{member.id}"
    acknowledged = (await (await client.get(base + "?status=acknowledged", headers=viewer.headers)).json())["items"]
    assert [i["id"] for i in acknowledged] == [one["id"]]
    assert one["id"] not in [i["id"] for i in (await (await client.get(base, headers=viewer.headers)).json())["items"]]
    assert "insight.updated" in await event_types(container.db, owner.project_id)

    for bad in ("?status=closed", "?kind=nonsense", "?limit=0"):
        resp = await client.get(base + bad, headers=viewer.headers)
        assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_request"
    resp = await client.post(f"{base}/{one['id']}/dismiss", json={"note": "x" * 501}, headers=member.headers)
    assert resp.status == 422
    resp = await client.post(f"{base}/{one['id']}/dismiss", json={"nope": 1}, headers=member.headers)
    assert resp.status == 422
    assert (await client.get(f"{base}/ins_missing", headers=viewer.headers)).status == 404

    await runner(container, lambda: now + timedelta(hours=2)).evaluate(owner.project_id)  # everything resolves
    resp = await client.post(f"{base}/{one['id']}/dismiss", headers=member.headers)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "conflict"
    assert len((await (await client.get(base + "?status=all", headers=viewer.headers)).json())["items"]) == len(ids)


# ---------------------------------------------------------------- live, from real gateway traffic
@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics)
    yield env
    await env.container.insights.close()  # before the db fixture drops the schema (the app closes after it)
    await env.close()


@pytest.fixture
async def live(gw):
    lc = LiveClient(str(gw.client.make_url("/")), gw.owner.token)
    await lc.connect()
    ack = await lc.subscribe(gw.project_id)
    assert ack["ok"] is True
    yield lc
    await lc.disconnect()


def insight_event(lc: LiveClient, kind: str, type_: str = "insight.created") -> dict | None:
    for name, envelope in zip(lc.names, lc.received, strict=True):
        if name == type_ and envelope["data"]["kind"] == kind:
            return envelope
    return None


async def test_a_cost_overrun_is_booked_on_the_platform_ledger_and_pushed_live(gw, live):
    model = "openai/gpt-4o-mini"
    before = await gw.wallet()
    gw.fake.plan(Behavior(extra_output_tokens=200_000))  # far more than the 20 tokens reserved for
    resp = await gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {gw.key['key']}"},
                                json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 20})
    assert resp.status == 200, await resp.text()
    request_id = resp.headers["x-smartspace-request-id"]
    charged = int(resp.headers["x-smartspace-cost-micros"])
    reported = gw.fake.reported[-1]
    actual = cost_micros(PRICES[model], reported.input_tokens, reported.output_tokens)
    assert actual > charged > 0

    await live.until(lambda: insight_event(live, "cost_overrun") is not None, WAIT, "insight.created cost_overrun")
    insight = insight_event(live, "cost_overrun")["data"]
    assert insight["severity"] == "warning" and insight["subject"]["request_id"] == request_id
    assert insight["evidence"]["reserved_micros"] == charged
    assert insight["evidence"]["actual_micros"] == actual
    assert insight["evidence"]["uncharged_micros"] == actual - charged

    # the books: the project paid the reservation, the platform absorbed the rest, together the provider's bill
    after = await gw.wallet()
    assert before.balance_micros - after.balance_micros == charged and after.reserved_micros == 0
    async with gw.container.db.read() as conn:
        [entry] = (await conn.execute(sa.select(platform_ledger).where(platform_ledger.c.ref == request_id))).all()
    assert entry.kind == "overrun_absorbed" and entry.amount_micros == -(actual - charged)
    assert charged - entry.amount_micros == actual
    assert insight["evidence"]["platform_entry_id"] == entry.id

    listed = await (await gw.client.get(f"/api/v1/projects/{gw.project_id}/insights?kind=cost_overrun",
                                        headers=gw.owner.headers)).json()
    assert [i["id"] for i in listed["items"]] == [insight["id"]]
    verify = await (await gw.client.get(f"/api/v1/projects/{gw.project_id}/audit/verify",
                                        headers=gw.owner.headers)).json()
    assert verify["ok"] is True


async def test_an_agent_looping_on_a_refused_call_raises_a_rejection_burst_live(gw, live):
    await gw.put_policy(blocked_models=["openai/gpt-4o"])
    headers = {"Authorization": f"Bearer {gw.key['key']}"}
    for i in range(10):
        resp = await gw.client.post("/v1/chat/completions", headers=headers, json={
            "model": "openai/gpt-4o", "messages": [{"role": "user", "content": f"again {i}"}]})
        assert resp.status == 403
        if i == 8:  # nine refusals: not yet a burst (the evaluation after them saw only nine)
            await gw.container.insights.evaluate(gw.project_id)
            assert insight_event(live, "rejection_burst") is None
    await live.until(lambda: insight_event(live, "rejection_burst") is not None, WAIT,
                     "insight.created rejection_burst")
    insight = insight_event(live, "rejection_burst")["data"]
    assert insight["subject"] == {"key_id": gw.key["id"]}
    assert insight["evidence"] == {"rejections": 10, "window_seconds": 600, "top_reason": "policy_violation"}
    assert gw.fake.received == []
    # the runner's debounce folded the ten refusals into few evaluations, and none raised it twice
    assert [e["type"] for e in live.received].count("insight.created") == 1


# ---------------------------------------------------------------- outbound alerts
async def test_new_warning_insights_are_posted_signed_and_retried(aiohttp_client, container):
    received: list[tuple[dict, bytes]] = []
    arrived = asyncio.Event()
    answers = [500, 200]

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        status = answers.pop(0) if answers else 200
        if status == 200:
            arrived.set()
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await aiohttp_client(app)
    alerts = WebhookAlerts(str(receiver.make_url("/hook")), "s" * 32, backoff_seconds=0.01)
    container.deps.alerts = alerts
    await alerts.start()
    try:
        user = await quick_user(container)
        async with container.uow() as scope:
            info = await scope.insights.record_overrun(project_id=user.project_id, request_id="req_1", model="m",
                                                       agent_id=None, reserved_micros=10, actual_micros=25)
        await asyncio.wait_for(arrived.wait(), WAIT)
    finally:
        await alerts.close()
    assert len(received) == 2 and received[0][1] == received[1][1]  # the same alert, retried
    headers, body = received[-1]
    expected = hmac.new(b"s" * 32, headers[TIMESTAMP].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE] == f"sha256={expected}"
    payload = msgspec.json.decode(body)
    assert payload["type"] == "insight.created" and payload["insight"]["id"] == info.id
    assert payload["insight"]["evidence"]["uncharged_micros"] == 15


async def test_info_insights_are_not_alerted(container):
    sent = []

    class Sink:
        def send(self, insight) -> None:
            sent.append(insight)

    container.deps.alerts = Sink()
    await seed_catalog(container.db)
    user = await quick_user(container)
    rejected = {"created_at": utcnow() - timedelta(minutes=4), "status": "rejected", "key_id": "key_z",
                "error": {"code": "budget_exceeded", "message": "no room"}}
    await add_requests(container.db, user.project_id, [
        {"created_at": utcnow() - timedelta(minutes=5), "model": "openai/gpt-4o", "cost_micros": 10_000_000,
         "input_tokens": 2_000_000, "output_tokens": 500_000}, *[rejected] * 10])
    await runner(container).evaluate(user.project_id)
    kinds = {r["kind"]: r["severity"] for r in await project_insights(container.db, user.project_id)}
    assert kinds == {"cheaper_model": "info", "rejection_burst": "warning"}
    assert {i.kind for i in sent} == {k for k, sev in kinds.items() if sev != "info"}

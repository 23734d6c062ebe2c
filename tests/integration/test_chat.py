"""The chat assistant over REST, built-in mode: the common questions answered with the right figures after
real gateway traffic (the figures are asserted, not the wording — beyond the exact amounts appearing in the
text), conversations and their context, and what a stranger, a viewer or a bad request gets."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from agentic.tools import usd
from storage.models import insights
from tests.factories import UserHandle, add_member, bearer, create_agent, create_key, register
from tests.integration.spend_helpers import create_budget, fund, platform_admin, set_policy, wallet

FUNDS = 5_000_000


@dataclass
class Books:
    owner: UserHandle
    agents: dict[str, dict[str, Any]]  # name -> agent
    keys: dict[str, dict[str, Any]]  # agent name -> key
    costs: dict[str, list[int]] = field(default_factory=dict)  # agent name -> cost of each call

    @property
    def total(self) -> int:
        return sum(sum(c) for c in self.costs.values())


async def gateway_call(client, key: str, text: str, model: str = "local/echo-1", **extra: Any):
    resp = await client.post("/v1/chat/completions", headers=bearer(key), json={
        "model": model, "messages": [{"role": "user", "content": text}], **extra})
    return resp


async def ask(client, user: UserHandle, message: str, status: int = 200, **extra: Any) -> dict[str, Any]:
    resp = await client.post("/api/v1/chatbot/chat", json={"message": message, **extra}, headers=user.headers)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def traffic(client, owner: UserHandle) -> Books:
    """Two agents with a key each call the gateway: scraper 3 times, writer twice (each receipt recorded)."""
    books = Books(owner=owner, agents={}, keys={})
    for name, calls in (("scraper", 3), ("writer", 2)):
        books.agents[name] = await create_agent(client, owner, name=name)
        books.keys[name] = await create_key(client, owner, agent_id=books.agents[name]["id"], name=f"{name} key")
        books.costs[name] = []
        for i in range(calls):
            resp = await gateway_call(client, books.keys[name]["key"], f"{name} call number {i} " + "word " * (5 * i))
            assert resp.status == 200, await resp.text()
            books.costs[name].append(int(resp.headers["x-smartspace-cost-micros"]))
    return books


@pytest.fixture
async def books(client) -> Books:
    admin = await platform_admin(client)
    owner = await register(client)
    await fund(client, admin, owner.project_id, FUNDS)
    return await traffic(client, owner)


# ---------------------------------------------------------------- spend
async def test_spend_today_in_total_by_agent_and_by_key_matches_the_receipts(client, books):
    answer = await ask(client, books.owner, "How much did we spend today?")
    figures = answer["data"]["figures"]
    assert answer["data"]["intent"] == "spend" and answer["data"]["args"]["period"] == "today"
    assert figures["total_micros"] == books.total > 0 and figures["requests"] == 5
    assert usd(books.total) in answer["response"]
    assert answer["conversation_id"].startswith("cnv_") and answer["message_id"].startswith("msg_")

    by_agent = (await ask(client, books.owner, "What did each agent spend today?"))["data"]["figures"]
    assert {r["name"]: (r["cost_micros"], r["requests"]) for r in by_agent["rows"]} == {
        name: (sum(c), len(c)) for name, c in books.costs.items()}

    by_key = await ask(client, books.owner, "spend this week by key")
    assert {r["name"]: r["cost_micros"] for r in by_key["data"]["figures"]["rows"]} == {
        f"{name} key": sum(c) for name, c in books.costs.items()}
    assert all(usd(sum(c)) in by_key["response"] for c in books.costs.values())

    one = await ask(client, books.owner, "how much did the writer agent cost in the last 7 days?")
    assert one["data"]["figures"]["filter"] == {"agent": "writer"}
    assert one["data"]["figures"]["total_micros"] == sum(books.costs["writer"])


async def test_spend_by_model_and_for_a_named_model(client, books):
    answer = await ask(client, books.owner, "what did we spend this month by model?")
    rows = answer["data"]["figures"]["rows"]
    assert [(r["key"], r["cost_micros"], r["requests"]) for r in rows] == [("local/echo-1", books.total, 5)]
    named = await ask(client, books.owner, "how much did echo-1 cost today?")
    assert named["data"]["figures"]["filter"] == {"model": "local/echo-1"}
    assert named["data"]["figures"]["total_micros"] == books.total


async def test_periods_yesterday_and_in_a_month_are_utc_windows(client, container, books):
    assistant = container.chat.responder
    today = await ask(client, books.owner, "what did we spend yesterday?")
    assert today["data"]["figures"]["total_micros"] == 0 and today["data"]["figures"]["requests"] == 0
    assert usd(0) in today["response"]

    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assistant.clock = lambda: tomorrow
    try:
        answer = await ask(client, books.owner, "what did we spend yesterday?")
        period = answer["data"]["figures"]["period"]
        assert answer["data"]["figures"]["total_micros"] == books.total
        assert period["since"].startswith(datetime.now(UTC).date().isoformat())
        month = datetime.now(UTC).strftime("%B")
        later = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC) if datetime.now(UTC).month == 12 else \
            datetime.now(UTC).replace(month=datetime.now(UTC).month + 1, day=2)
        assistant.clock = lambda: later
        in_month = await ask(client, books.owner, f"what was spent in {month}?")
        assert in_month["data"]["args"]["period"] == month.lower()
        assert in_month["data"]["figures"]["total_micros"] == books.total
        other = "March" if month != "March" else "April"
        assert (await ask(client, books.owner, f"spend in {other}"))["data"]["figures"]["total_micros"] == 0
    finally:
        assistant.clock = lambda: datetime.now(UTC)


async def test_a_follow_up_reuses_the_previous_question_with_its_new_slots(client, books):
    first = await ask(client, books.owner, "How much did we spend today?")
    follow = await ask(client, books.owner, "and by agent?", conversation_id=first["conversation_id"])
    assert follow["data"]["intent"] == "spend" and follow["data"]["args"]["by"] == "agent"
    assert follow["conversation_id"] == first["conversation_id"]
    assert sum(r["cost_micros"] for r in follow["data"]["figures"]["rows"]) == books.total


# ---------------------------------------------------------------- budgets, wallet
async def test_budgets_with_what_is_left_and_the_forecast(client, books):
    budget = await create_budget(client, books.owner, 1_000_000, period="month", name="Research")
    extra = await gateway_call(client, books.keys["scraper"]["key"], "one more call for the budget")
    cost = int(extra.headers["x-smartspace-cost-micros"])
    answer = await ask(client, books.owner, "How much is left in the Research budget?")
    [line] = answer["data"]["figures"]["budgets"]
    assert line["id"] == budget["id"] and line["spent_micros"] == cost and line["reserved_micros"] == 0
    assert line["remaining_micros"] == 1_000_000 - cost
    assert line["forecast_spent_micros"] >= cost and line["period_end"] is not None
    assert usd(1_000_000 - cost) in answer["response"] and usd(cost) in answer["response"]


async def test_wallet_balance_and_runway(client, books):
    answer = await ask(client, books.owner, "What's our wallet balance and runway?")
    figures = answer["data"]["figures"]
    w = await wallet(client, books.owner)
    assert figures["balance_micros"] == w["balance_micros"] == FUNDS - books.total
    assert figures["available_micros"] == w["available_micros"]
    assert figures["spent_last_24h_micros"] == books.total and figures["runway_hours"] > 0
    assert figures["exhausts_at"] is not None
    assert usd(FUNDS - books.total) in answer["response"]


# ---------------------------------------------------------------- refusals and approvals
async def test_why_a_request_was_refused_and_which_wait_for_approval(client, books):
    await set_policy(client, books.owner, blocked_models=["local/echo-1"])
    refused = await gateway_call(client, books.keys["writer"]["key"], "this one is blocked")
    assert refused.status == 403
    request_id = refused.headers["x-smartspace-request-id"]
    answer = await ask(client, books.owner, f"Why was {request_id} refused?")
    req = answer["data"]["figures"]["request"]
    assert req["id"] == request_id and req["status"] == "rejected" and req["error"]["code"] == "policy_violation"
    assert request_id in answer["response"]
    latest = await ask(client, books.owner, "why was my last request rejected?")
    assert latest["data"]["figures"]["request"]["id"] == request_id

    await set_policy(client, books.owner, require_approval_above_micros=1)
    held = await gateway_call(client, books.keys["writer"]["key"], "this one waits for an admin", model="local/echo-1",
                              max_tokens=50)
    assert held.status == 403
    held_id = (await held.json())["error"]["details"]["request_id"]
    approvals = await ask(client, books.owner, "Which requests are waiting for approval?")
    figures = approvals["data"]["figures"]
    assert figures["count"] == 1 and figures["approvals"][0]["id"] == held_id
    assert figures["reserved_micros"] == figures["approvals"][0]["reserved_micros"] > 0
    why = await ask(client, books.owner, f"why is {held_id} held?")
    assert why["data"]["figures"]["request"]["status"] == "pending_approval"


async def test_a_request_of_another_project_is_not_found(client, books):
    stranger = await register(client)
    answer = await ask(client, stranger, "why was req_0000000000000000000000 refused?")
    assert answer["data"]["figures"]["error"]["code"] == "not_found"
    rows = await client.get(f"/api/v1/projects/{books.owner.project_id}/requests?limit=1", headers=books.owner.headers)
    theirs = (await rows.json())["items"][0]["id"]
    leaked = await ask(client, stranger, f"why was {theirs} refused?")
    assert leaked["data"]["figures"] == {"error": {"code": "not_found",
                                                   "message": f"request {theirs} not found in this project"}}


# ---------------------------------------------------------------- payments, insights, the rest
async def test_recent_payments_and_deposits(client):
    from tests.integration.payments_support import funded, run_worker, withdraw

    user, rt, to = await funded(client, 3_000_000)
    status, payout, _ = await withdraw(client, user, to, 1_250_000, key="chat-payout")
    assert status == 201, payout
    await run_worker(rt)
    answer = await ask(client, user, "show me recent payments and deposits")
    figures = answer["data"]["figures"]
    assert [(d["amount_micros"], d["status"]) for d in figures["deposits"]] == [(3_000_000, "confirmed")]
    assert [(p["id"], p["amount_micros"], p["status"]) for p in figures["payments"]] == [
        (payout["id"], 1_250_000, "confirmed")]
    assert usd(1_250_000) in answer["response"] and usd(3_000_000) in answer["response"]


async def test_insights_are_reported_honestly_when_there_are_none(client, books):
    answer = await ask(client, books.owner, "any open insights?")
    assert answer["data"]["intent"] == "insights"
    assert answer["data"]["figures"] == {"project_id": books.owner.project_id, "available": True, "insights": []}


async def test_open_insights_are_read_from_the_insights_table(client, db, books):
    """Open ones only, newest first (the insights evaluator's table, storage/models.py)."""
    now = datetime.now(UTC)
    base = {"project_id": books.owner.project_id, "subject": {}, "created_at": now, "updated_at": now}
    async with db.engine.begin() as conn:
        await conn.execute(sa.insert(insights), [
            {**base, "id": "ins_1", "kind": "wallet_runway", "subject_key": "", "severity": "warning",
             "title": "Wallet runs low", "message": "The wallet lasts under 72 h.",
             "evidence": {"available_micros": 42}, "status": "open"},
            {**base, "id": "ins_2", "kind": "idle_key", "subject_key": "key_id=key_1", "severity": "info",
             "title": "Idle key", "message": "A key was unused.", "evidence": {}, "status": "dismissed"}])
    answer = await ask(client, books.owner, "any open insights?")
    figures = answer["data"]["figures"]
    assert figures["available"] is True
    assert [(i["id"], i["evidence"]) for i in figures["insights"]] == [("ins_1", {"available_micros": 42})]
    assert "Wallet runs low" in answer["response"]


async def test_a_question_it_cannot_answer_says_so_and_lists_what_it_can(client, books):
    answer = await ask(client, books.owner, "Write me a poem about the sea")
    assert answer["data"]["intent"] is None and "figures" not in answer["data"]
    assert "can't answer" in answer["response"] and "budgets" in answer["response"]
    helped = await ask(client, books.owner, "help")
    assert helped["data"]["intent"] == "help" and "wallet" in helped["response"]


# ---------------------------------------------------------------- who may ask what
async def test_a_viewer_can_ask_and_gets_the_same_figures(client, books):
    viewer = await register(client)
    await add_member(client, books.owner, viewer, "viewer")
    answer = await ask(client, viewer, "how much did we spend today?", project_id=books.owner.project_id)
    assert answer["data"]["figures"]["total_micros"] == books.total


async def test_a_member_of_another_project_learns_nothing_about_it(client, books):
    stranger = await register(client)
    target = books.owner.project_id
    # Naming the project in the question: the same answer as for a project that does not exist.
    named = await ask(client, stranger, f"what did {target} spend today?")
    ghost = await ask(client, stranger, "what did prj_000000000000deadbeefcafe spend today?")
    assert named["data"]["figures"] == {"error": {"code": "not_found", "message": f"project {target} not found"}}
    assert named["response"].replace(target, "X") == ghost["response"].replace("prj_000000000000deadbeefcafe", "X")
    assert usd(books.total) not in named["response"]
    # Asking on the project itself: 404 like any project one is not a member of, and nothing is stored.
    refused = await ask(client, stranger, "what did we spend today?", status=404, project_id=target)
    assert refused["error"]["code"] == "not_found"
    # Another user's conversation is not found, and not listed.
    mine = await ask(client, books.owner, "how much did we spend today?")
    resp = await client.get(f"/api/v1/chatbot/conversations/{mine['conversation_id']}", headers=stranger.headers)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    await ask(client, stranger, "hello?", status=404, conversation_id=mine["conversation_id"])
    listed = await (await client.get("/api/v1/chatbot/conversations", headers=stranger.headers)).json()
    assert mine["conversation_id"] not in [c["id"] for c in listed["items"]]
    assert all(c["project_id"] != target for c in listed["items"])


# ---------------------------------------------------------------- conversations
async def test_conversations_are_listed_and_read_back_in_order(client, books):
    first = await ask(client, books.owner, "How much did we spend today?")
    second = await ask(client, books.owner, "and yesterday?", conversation_id=first["conversation_id"])
    other = await ask(client, books.owner, "wallet balance?")
    listed = await (await client.get("/api/v1/chatbot/conversations", headers=books.owner.headers)).json()
    assert [c["id"] for c in listed["items"]] == [other["conversation_id"], first["conversation_id"]]
    assert listed["items"][1]["title"] == "How much did we spend today?"
    resp = await client.get(f"/api/v1/chatbot/conversations/{first['conversation_id']}", headers=books.owner.headers)
    detail = await resp.json()
    assert [(m["role"], m["status"]) for m in detail["messages"]] == [
        ("user", "complete"), ("assistant", "complete"), ("user", "complete"), ("assistant", "complete")]
    assert [m["id"] for m in detail["messages"] if m["role"] == "assistant"] == [first["message_id"],
                                                                                 second["message_id"]]
    assert detail["messages"][1]["content"] == first["response"]
    assert detail["messages"][1]["data"]["figures"]["total_micros"] == books.total
    assert detail["project_id"] == books.owner.project_id


@pytest.mark.parametrize("body", [{}, {"message": ""}, {"message": "hi", "colour": "red"}, {"message": 42},
                                  {"message": "x" * 4001}, {"message": "a\u0000b"},
                                  {"message": "hi", "project_id": "prj_\u0000"},
                                  {"message": "hi", "conversation_id": "cnv_1' OR '1'='1"}])
async def test_a_bad_question_is_422_and_stores_nothing(client, body):
    user = await register(client)
    resp = await client.post("/api/v1/chatbot/chat", json=body, headers=user.headers)
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_request"
    listed = await (await client.get("/api/v1/chatbot/conversations", headers=user.headers)).json()
    assert listed["items"] == []


async def test_a_conversation_id_with_a_nul_is_refused_at_the_edge(client):
    user = await register(client)
    resp = await client.get("/api/v1/chatbot/conversations/cnv_%00x", headers=user.headers)
    assert resp.status == 422 and (await resp.json())["error"]["details"]["field"] == "conversation_id"


@pytest.mark.parametrize("conversation_id", ["x" * 41, "cnv_nope"])
async def test_a_conversation_id_that_names_nothing_is_404(client, conversation_id):
    user = await register(client)
    resp = await client.get(f"/api/v1/chatbot/conversations/{conversation_id}", headers=user.headers)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_an_api_key_or_no_token_cannot_chat(client, books):
    key = bearer(books.keys["writer"]["key"])
    resp = await client.post("/api/v1/chatbot/chat", json={"message": "hi"}, headers=key)
    assert resp.status == 403  # a valid key, refused: the assistant is for user tokens (README "API keys")
    resp = await client.post("/api/v1/chatbot/chat", json={"message": "hi"})
    assert resp.status == 401

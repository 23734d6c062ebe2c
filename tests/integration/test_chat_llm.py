"""The assistant in LLM mode (SMARTSPACE_ASSISTANT_MODEL) against the fake upstream on loopback: the model asks
for tools, gets their figures, answers; every model call is a priced, settled request of the asking project
(through the OpenAI-compatible and the Anthropic adapter); a budget that cannot pay refuses it clearly; and
an answer cancelled — or whose socket goes away — mid-call costs nothing more."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from agentic.tools import usd
from channels.hub import HUB
from tests.factories import register
from tests.fakes.gateway import GatewayEnv, start_gateway
from tests.fakes.upstream import Behavior
from tests.live import WAIT, LiveClient

PRICES = {"openai/gpt-4o-mini": (150_000, 600_000), "anthropic/claude-3-5-haiku": (800_000, 4_000_000)}


@pytest.fixture(params=list(PRICES))
async def llm(request, aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, msgspec.structs.replace(settings, assistant_model=request.param),
                              db, metrics)
    env.model = request.param  # type: ignore[attr-defined]
    yield env
    await env.close()


async def echo_traffic(env: GatewayEnv, calls: int = 2) -> int:
    """Agent calls through the gateway on the local model; their total cost from the receipts."""
    total = 0
    for i in range(calls):
        raw = await env.oai.chat.completions.with_raw_response.create(
            model="local/echo-1", messages=[{"role": "user", "content": f"agent call {i}"}])
        total += int(raw.headers["x-smartspace-cost-micros"])
    return total


async def ask(env: GatewayEnv, message: str, status: int = 200, **extra) -> dict:
    resp = await env.client.post("/api/v1/chatbot/chat", json={"message": message, **extra},
                                 headers=env.owner.headers)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def request_of(env: GatewayEnv, request_id: str) -> dict:
    resp = await env.client.get(f"/api/v1/requests/{request_id}", headers=env.owner.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def price(model: str, input_tokens: int, output_tokens: int) -> int:
    p_in, p_out = PRICES[model]
    return -(-(input_tokens * p_in + output_tokens * p_out) // 1_000_000)


async def test_the_model_calls_a_tool_then_answers_and_each_call_is_a_settled_request(llm: GatewayEnv):
    agents_total = await echo_traffic(llm)
    llm.fake.reset()
    llm.fake.plan(Behavior(tool_calls=[{"name": "spend", "arguments": {"period": "today", "by": "model"}}]),
                  Behavior(content="Today the project spent what the tool said."))
    answer = await ask(llm, "What did we spend today, by model?")

    assert answer["response"] == "Today the project spent what the tool said."
    data = answer["data"]
    assert data["mode"] == "llm" and data["model"] == llm.model
    first, second = data["model_requests"]
    reported = llm.fake.reported
    assert len(reported) == 2
    for call, usage in zip((first, second), reported, strict=True):
        row = await request_of(llm, call["request_id"])
        assert row["status"] == "settled" and row["model"] == llm.model and row["actor"] == "system:assistant"
        assert row["project_id"] == llm.project_id and row["metadata"]["asked_by"] == f"user:{llm.owner.id}"
        assert row["cost_micros"] == call["cost_micros"] == price(llm.model, usage.input_tokens, usage.output_tokens)
    assert data["cost_micros"] == first["cost_micros"] + second["cost_micros"]

    # The tool read the books as they were: the agents' calls and the assistant's own first call.
    [used] = data["figures"]
    assert used["tool"] == "spend" and used["args"] == {"period": "today", "by": "model"}
    rows = {r["key"]: r["cost_micros"] for r in used["result"]["rows"]}
    assert rows == {"local/echo-1": agents_total, llm.model: first["cost_micros"]}

    # The adapters carried the tools out and the figures back, exact to the micro-USDC.
    asked, followed = (r.body for r in llm.fake.received)
    total = usd(used["result"]["total_micros"])
    if llm.model.startswith("anthropic/"):
        assert {t["name"] for t in asked["tools"]} >= {"spend", "budgets", "wallet", "request", "insights"}
        assert all("input_schema" in t for t in asked["tools"])
        tool_use = followed["messages"][-2]["content"][-1]
        result = followed["messages"][-1]["content"][0]
        assert tool_use["type"] == "tool_use" and tool_use["name"] == "spend"
        assert result["type"] == "tool_result" and result["tool_use_id"] == tool_use["id"]
        assert f'"total_usd":"{total}"' in result["content"]
    else:
        assert {t["function"]["name"] for t in asked["tools"]} >= {"spend", "budgets", "wallet", "request"}
        assert followed["messages"][-2]["tool_calls"][0]["function"]["name"] == "spend"
        assert followed["messages"][-1]["role"] == "tool"
        assert f'"total_usd":"{total}"' in followed["messages"][-1]["content"]

    # Visible in the project's usage like any agent's call.
    usage = await (await llm.client.get(f"/api/v1/projects/{llm.project_id}/usage",
                                        headers=llm.owner.headers)).json()
    by_model = {r["key"]: r["cost_micros"] for r in usage["by_model"]}
    assert by_model[llm.model] == data["cost_micros"]


async def test_the_conversation_so_far_is_the_context_of_the_next_answer(llm: GatewayEnv):
    llm.fake.plan(Behavior(content="First answer."), Behavior(content="Second answer."))
    first = await ask(llm, "first question")
    await ask(llm, "second question", conversation_id=first["conversation_id"])
    sent = [(m["role"], m["content"]) for m in llm.fake.received[-1].body["messages"] if m["role"] != "system"]
    if llm.model.startswith("anthropic/"):
        sent = [(role, content[0]["text"]) for role, content in sent]
    assert sent == [("user", "first question"), ("assistant", "First answer."), ("user", "second question")]


async def test_a_budget_that_cannot_pay_refuses_the_model_call_clearly(llm: GatewayEnv):
    resp = await llm.client.post(f"/api/v1/projects/{llm.project_id}/budgets", headers=llm.owner.headers, json={
        "name": "tiny", "limit_micros": 5, "period": "total"})
    assert resp.status == 201
    llm.fake.reset()
    body = await ask(llm, "how much did we spend?", status=402)
    assert body["error"]["code"] == "budget_exceeded"
    assert "budget" in body["error"]["message"]
    assert llm.fake.received == []  # refused before any call upstream
    conversation = body["error"]["details"]["conversation_id"]
    detail = await (await llm.client.get(f"/api/v1/chatbot/conversations/{conversation}",
                                         headers=llm.owner.headers)).json()
    assert [(m["role"], m["status"]) for m in detail["messages"]] == [("user", "complete"), ("assistant", "failed")]
    assert detail["messages"][1]["data"]["error"]["code"] == "budget_exceeded"
    wallet = await llm.wallet()
    assert wallet.reserved_micros == 0


async def _stalled_answer(llm: GatewayEnv) -> tuple[LiveClient, dict]:
    """A socket asks; the model call hangs upstream (the fake stalls until stopped)."""
    llm.fake.reset()
    llm.fake.plan(Behavior(delay=WAIT * 4))
    lc = LiveClient(str(llm.client.make_url("/")), llm.owner.token, "/chat")
    await lc.connect()
    ack = await lc.call("message", {"text": "how much did we spend today?"})
    assert ack["ok"] is True, ack
    await llm.fake.until_received(1)
    return lc, ack


async def _nothing_charged(llm: GatewayEnv, message_id: str, conversation_id: str) -> None:
    listed = await (await llm.client.get(f"/api/v1/projects/{llm.project_id}/requests",
                                         headers=llm.owner.headers)).json()
    [call] = [r for r in listed["items"] if r["actor"] == "system:assistant"]
    assert call["status"] == "failed" and call["cost_micros"] == 0
    assert (await llm.wallet()).reserved_micros == 0
    detail = await (await llm.client.get(f"/api/v1/chatbot/conversations/{conversation_id}",
                                         headers=llm.owner.headers)).json()
    assert [(m["id"], m["status"]) for m in detail["messages"] if m["role"] == "assistant"] == [
        (message_id, "cancelled")]


async def test_cancel_stops_the_answer_and_its_model_call_costs_nothing(llm: GatewayEnv):
    lc, ack = await _stalled_answer(llm)
    try:
        cancelled = await lc.call("cancel", {"conversation_id": ack["conversation_id"]})
        assert cancelled == {"ok": True, "conversation_id": ack["conversation_id"], "cancelled": True}
        await _nothing_charged(llm, ack["message_id"], ack["conversation_id"])
        # Barrier: a later answer on the same socket arrives; nothing of the cancelled one ever did.
        llm.fake.plan(Behavior(content="Still here."))
        again = await lc.call("message", {"text": "still there?", "conversation_id": ack["conversation_id"]})
        await lc.until(lambda: "chat.message" in lc.names)
        assert [d["message_id"] for d in lc.received] == [again["message_id"]] * len(lc.received)
        assert lc.received[-1]["text"] == "Still here."
    finally:
        await lc.disconnect()


async def test_a_client_that_disconnects_mid_answer_costs_nothing_more(llm: GatewayEnv):
    lc, ack = await _stalled_answer(llm)
    chat = llm.client.app[HUB].sio.namespace_handlers["/chat"]
    [task] = list(chat.answers.values())
    await lc.disconnect()
    done, _ = await asyncio.wait({task}, timeout=WAIT)
    assert task in done and task.cancelled()
    await _nothing_charged(llm, ack["message_id"], ack["conversation_id"])


async def test_the_tools_answer_another_project_as_not_found_whether_it_exists_or_not(llm: GatewayEnv):
    other = await register(llm.client)  # a project the asker is not a member of
    llm.fake.plan(Behavior(tool_calls=[
        {"name": "wallet", "arguments": {"project_id": other.project_id}},
        {"name": "wallet", "arguments": {"project_id": "prj_000000000000deadbeefcafe"}}]),
        Behavior(content="Not found."))
    answer = await ask(llm, "what is in the other project's wallet?")
    theirs, ghost = (used["result"] for used in answer["data"]["figures"])
    assert theirs == {"error": {"code": "not_found", "message": f"project {other.project_id} not found"}}
    assert ghost == {"error": {"code": "not_found", "message": "project prj_000000000000deadbeefcafe not found"}}
    # What went back to the model after the question (tool calls and results) holds no wallet figure.
    after_question = msgspec.json.encode(llm.fake.received[-1].body["messages"]).decode().split("wallet?")[-1]
    assert "balance" not in after_question and "not found" in after_question


async def test_a_refused_model_call_ends_the_socket_answer_with_its_error(llm: GatewayEnv):
    resp = await llm.client.post(f"/api/v1/projects/{llm.project_id}/budgets", headers=llm.owner.headers, json={
        "name": "tiny", "limit_micros": 5, "period": "total"})
    assert resp.status == 201
    lc = LiveClient(str(llm.client.make_url("/")), llm.owner.token, "/chat")
    await lc.connect()
    try:
        ack = await lc.call("message", {"text": "how much is left?"})
        await lc.until(lambda: "chat.message" in lc.names)
        final = lc.received[lc.names.index("chat.message")]
        assert final["message_id"] == ack["message_id"] and final["error"]["code"] == "budget_exceeded"
        assert "budget" in final["text"]
    finally:
        await lc.disconnect()


async def test_an_idempotency_key_answers_once_and_spends_once(llm: GatewayEnv):
    llm.fake.plan(Behavior(content="Once."))
    headers = {**llm.owner.headers, "Idempotency-Key": "chat-1"}
    first = await llm.client.post("/api/v1/chatbot/chat", json={"message": "hello"}, headers=headers)
    again = await llm.client.post("/api/v1/chatbot/chat", json={"message": "hello"}, headers=headers)
    assert first.status == again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await first.json() == await again.json()
    assert len(llm.fake.received) == 1
    conversations = await (await llm.client.get("/api/v1/chatbot/conversations", headers=llm.owner.headers)).json()
    assert len(conversations["items"]) == 1


async def test_odd_tool_arguments_from_the_model_are_refused_as_results(llm: GatewayEnv):
    llm.fake.plan(Behavior(tool_calls=[
        {"name": "wallet", "arguments": {"project_id": "prj_\u0000"}},
        {"name": "request", "arguments": {"request_id": "req_' OR 1=1 --"}},
        {"name": "spend", "arguments": {"period": "next tuesday"}},
        {"name": "drop_tables", "arguments": {}}]), Behavior(content="Done."))
    answer = await ask(llm, "do odd things")
    assert [used["result"]["error"]["code"] for used in answer["data"]["figures"]] == [
        "not_found", "not_found", "invalid_request", "invalid_request"]
    assert answer["response"] == "Done."

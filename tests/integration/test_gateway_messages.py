"""``POST /v1/messages`` through the official ``anthropic`` SDK: JSON and streaming, priced and settled like
chat completions, errors in Anthropic's shape."""

from __future__ import annotations

import anthropic
import pytest

from tests.fakes.gateway import ANTHROPIC_KEY, start_gateway
from tests.fakes.upstream import Behavior

HI = [{"role": "user", "content": "hello anthropic clients"}]


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics)
    yield env
    await env.close()


def sdk(gw, api_key: str | None = None) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=str(gw.client.make_url("/")).rstrip("/"),
                                    api_key=api_key or gw.key["key"], max_retries=0)


def price(input_tokens: int, output_tokens: int, input_price: int, output_price: int) -> int:
    return -(-(input_tokens * input_price + output_tokens * output_price) // 1_000_000)


async def _request(gw, request_id: str) -> dict:
    resp = await gw.client.get(f"/api/v1/requests/{request_id}", headers=gw.owner.headers)
    assert resp.status == 200
    return await resp.json()


async def test_json_message_through_an_anthropic_upstream_is_priced_and_settled(gw):
    async with sdk(gw) as client:
        raw = await client.messages.with_raw_response.create(
            model="anthropic/claude-3-5-haiku", max_tokens=40, system="be terse", messages=HI)
        message = await raw.parse()
    sent = gw.fake.received[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == ANTHROPIC_KEY  # SmartSpace's own key
    assert sent.body["model"] == "claude-3-5-haiku-20241022" and sent.body["system"] == "be terse"
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text.startswith("Reply")
    reported = gw.fake.reported[-1]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (reported.input_tokens,
                                                                         reported.output_tokens)
    assert message.stop_reason == "end_turn"
    cost = int(raw.headers["x-smartspace-cost-micros"])
    assert cost == price(reported.input_tokens, reported.output_tokens, 800_000, 4_000_000)
    row = await _request(gw, raw.headers["x-smartspace-request-id"])
    assert row["status"] == "settled" and row["cost_micros"] == cost and row["model"] == "anthropic/claude-3-5-haiku"


async def test_any_catalog_model_serves_anthropic_clients_and_a_dated_id_resolves(gw):
    async with sdk(gw) as client:
        message = await client.messages.create(model="gpt-4o-mini", max_tokens=3, messages=HI)
        assert gw.fake.received[-1].path == "/v1/chat/completions"
        assert gw.fake.received[-1].body["max_tokens"] == 3
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
        # what Anthropic's own examples send: the dated id
        await client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=5, messages=HI)
        assert gw.fake.received[-1].body["model"] == "claude-sonnet-4-5-20250929"


async def test_streaming_message_with_usage_and_cost(gw):
    before = (await gw.wallet()).balance_micros
    async with sdk(gw) as client:
        async with client.messages.stream(model="anthropic/claude-3-5-haiku", max_tokens=64, messages=HI) as stream:
            events = [e async for e in stream]
            final = await stream.get_final_message()
            request_id = stream.response.headers["x-smartspace-request-id"]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert text.startswith("Reply") and len(text.split()) == gw.fake.reply_words
    reported = gw.fake.reported[-1]
    assert reported.stream and final.usage.output_tokens == reported.output_tokens
    assert final.usage.input_tokens == reported.input_tokens
    assert final.content[0].text == text
    row = await _request(gw, request_id)
    assert row["status"] == "settled"
    assert row["cost_micros"] == price(reported.input_tokens, reported.output_tokens, 800_000, 4_000_000)
    delta = next(e for e in events if e.type == "message_delta")
    assert delta.usage.model_extra["cost_micros"] == row["cost_micros"]
    assert delta.usage.model_extra["request_id"] == request_id
    assert (await gw.wallet()).balance_micros == before - row["cost_micros"]


async def test_tool_use_round_trip(gw):
    gw.fake.plan(Behavior(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]))
    tools = [{"name": "get_weather", "description": "the weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    async with sdk(gw) as client:
        message = await client.messages.create(model="openai/gpt-4o-mini", max_tokens=100, tools=tools,
                                               tool_choice={"type": "any"}, messages=HI)
        assert gw.fake.received[-1].body["tools"][0]["function"]["name"] == "get_weather"
        assert gw.fake.received[-1].body["tool_choice"] == "required"
        use = next(b for b in message.content if b.type == "tool_use")
        assert use.name == "get_weather" and use.input == {"city": "Paris"} and message.stop_reason == "tool_use"
        await client.messages.create(model="openai/gpt-4o-mini", max_tokens=100, tools=tools, messages=[
            *HI, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                    "input": use.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    sent = gw.fake.received[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == use.id and sent[2] == {"role": "tool", "tool_call_id": use.id,
                                                                    "content": "sunny"}


async def test_errors_are_in_anthropic_shape_and_map_to_the_sdk_exceptions(gw):
    async with sdk(gw, api_key="sk-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as err:
            await client.messages.create(model="local/echo-1", max_tokens=5, messages=HI)
    body = err.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "unknown" in body["error"]["message"] and "start with" not in body["error"]["message"]
    async with sdk(gw) as client:
        with pytest.raises(anthropic.NotFoundError) as err:
            await client.messages.create(model="anthropic/claude-9", max_tokens=5, messages=HI)
        assert err.value.body["error"]["type"] == "not_found_error"
        await gw.put_policy(blocked_providers=["anthropic"])
        with pytest.raises(anthropic.PermissionDeniedError) as err:
            await client.messages.create(model="anthropic/claude-3-5-haiku", max_tokens=500, messages=HI)
        assert err.value.body["error"]["code"] == "policy_violation"
    # raw HTTP: Bearer auth works too; a missing max_tokens is a 400 naming the field
    headers = {"Authorization": f"Bearer {gw.key['key']}"}
    resp = await gw.client.post("/v1/messages", headers=headers, json={"model": "local/echo-1", "messages": HI})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error" and "max_tokens" in error["message"]
    resp = await gw.client.post("/v1/messages", headers=headers, data=b"{not json")
    assert resp.status == 400 and (await resp.json())["type"] == "error"
    wallet = await gw.wallet()
    assert wallet.reserved_micros == 0


async def test_a_stream_cut_upstream_ends_with_an_anthropic_error_event_and_pays_what_was_streamed(gw):
    gw.fake.plan(Behavior(cut_after=3))
    resp = await gw.client.post("/v1/messages", headers={"x-api-key": gw.key["key"]}, json={
        "model": "openai/gpt-4o-mini", "max_tokens": 50, "stream": True, "messages": HI})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    text = (await resp.read()).decode()
    assert text.startswith("event: message_start\n") and "event: content_block_delta" in text
    assert "event: message_stop" not in text
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\n") and '"type":"api_error"' in last and '"code":"provider_error"' in last
    row = await _request(gw, resp.headers["x-smartspace-request-id"])
    assert row["status"] == "failed" and row["cost_micros"] > 0  # the streamed output is charged
    wallet = await gw.wallet()
    assert wallet.reserved_micros == 0

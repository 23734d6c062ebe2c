"""The gateway through the official ``openai`` client: chat (JSON and streaming), embeddings, models, receipts."""

from __future__ import annotations

import base64
import struct

import openai
import pytest

from tests.fakes.gateway import ANTHROPIC_KEY, OPENAI_KEY, start_gateway


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics)
    yield env
    await env.close()


async def test_chat_non_streaming_with_receipt_headers(gw):
    raw = await gw.oai.chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], max_tokens=50)
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("Reply")
    reported = gw.fake.reported[-1]
    assert completion.usage.prompt_tokens == reported.input_tokens
    assert completion.usage.completion_tokens == reported.output_tokens
    request_id = raw.headers["x-smartspace-request-id"]
    cost = int(raw.headers["x-smartspace-cost-micros"])
    # gpt-4o-mini: 0.15 / 0.60 USDC per Mtok, rounded up
    assert cost == -(-(reported.input_tokens * 150_000 + reported.output_tokens * 600_000) // 1_000_000)
    assert gw.fake.received[-1].headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert gw.fake.received[-1].body["model"] == "gpt-4o-mini"
    resp = await gw.client.get(f"/api/v1/requests/{request_id}", headers=gw.owner.headers)
    if resp.status == 200:  # the REST read of a request (spend-control routes)
        body = await resp.json()
        assert body["status"] == "settled" and body["cost_micros"] == cost and body["source"] == "gateway"


async def test_chat_streaming_forwards_chunks_and_reports_cost(gw):
    stream = await gw.oai.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "stream me please"}], stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text.startswith("Reply") and len(text.split()) == gw.fake.reply_words
    reported = gw.fake.reported[-1]
    assert reported.stream and usage.prompt_tokens == reported.input_tokens
    assert usage.model_extra["cost_micros"] > 0 and usage.model_extra["request_id"].startswith("req_")
    assert gw.fake.received[-1].body["stream_options"] == {"include_usage": True}


async def test_streaming_without_include_usage_still_ends_with_a_cost_comment(gw):
    resp = await gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {gw.key['key']}"}, json={
        "model": "local/echo-1", "messages": [{"role": "user", "content": "one two three"}], "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    request_id = resp.headers["x-smartspace-request-id"]
    text = (await resp.read()).decode()
    assert text.endswith("data: [DONE]\n\n")
    assert ": smartspace cost_micros=" in text and f"request_id={request_id}" in text
    assert '"usage"' not in text  # not asked for: no usage chunk (clients index choices[0])


async def test_anthropic_end_to_end_json_and_stream(gw):
    completion = await gw.oai.chat.completions.create(
        model="anthropic/claude-3-5-haiku", max_tokens=5,
        messages=[{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi anthropic"}])
    sent = gw.fake.received[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.body["system"] == "be terse" and sent.body["model"] == "claude-3-5-haiku-20241022"  # the dated id
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    stream = await gw.oai.chat.completions.create(
        model="anthropic/claude-3-5-haiku", messages=[{"role": "user", "content": "stream anthropic"}],
        stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Reply")
    assert chunks[-1].usage.completion_tokens == gw.fake.reported[-1].output_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_local_provider_end_to_end(gw):
    completion = await gw.oai.chat.completions.create(
        model="local/echo-1", messages=[{"role": "user", "content": "say this back"}])
    assert completion.choices[0].message.content.startswith("You said: say this back")
    assert gw.fake.received == []  # never left the process


async def test_embeddings_float_and_base64(gw):
    result = await gw.oai.embeddings.create(model="openai/text-embedding-3-small", input=["abc", "defg"],
                                            encoding_format="float")
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    assert result.usage.prompt_tokens == gw.fake.reported[-1].input_tokens
    # the SDK's default asks for base64 and decodes it
    default = await gw.oai.embeddings.create(model="local/embed-1", input="hello")
    assert len(default.data[0].embedding) == 16
    resp = await gw.client.post("/v1/embeddings", headers={"Authorization": f"Bearer {gw.key['key']}"},
                                json={"model": "local/embed-1", "input": "hello", "encoding_format": "base64"})
    body = await resp.json()
    vector = struct.unpack("<16f", base64.b64decode(body["data"][0]["embedding"]))
    assert vector == pytest.approx(default.data[0].embedding, rel=1e-6)
    assert int(resp.headers["x-smartspace-cost-micros"]) >= 1


async def test_models_list_shows_the_reachable_catalog(gw):
    page = await gw.oai.models.list()
    ids = {m.id for m in page.data}
    assert {"openai/gpt-4o-mini", "anthropic/claude-3-5-haiku", "local/echo-1"} <= ids
    assert all(m.object == "model" and m.owned_by == m.id.split("/")[0] for m in page.data)
    one = await gw.oai.models.retrieve("local/echo-1")
    assert one.id == "local/echo-1"
    with pytest.raises(openai.NotFoundError):
        await gw.oai.models.retrieve("nope/none")


async def test_auth_is_required_and_user_tokens_are_refused(gw):
    with pytest.raises(openai.AuthenticationError) as err:
        await gw.sdk(api_key="sk-not-a-real-key-000000000000").models.list()
    assert err.value.code == "unauthorized"
    with pytest.raises(openai.AuthenticationError):
        await gw.sdk(api_key=gw.owner.token).models.list()


async def test_bad_requests_are_400_with_openai_shape(gw):
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI answers an invalid request 400, never 422
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=[])
    assert err.value.code == "invalid_request" and err.value.type == "invalid_request_error"
    assert err.value.param == "messages"
    with pytest.raises(openai.NotFoundError) as err:
        await gw.oai.chat.completions.create(model="acme/unknown", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "not_found" and err.value.type == "not_found_error"
    resp = await gw.client.post("/v1/chat/completions", data=b"{not json",
                                headers={"Authorization": f"Bearer {gw.key['key']}"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request"


async def test_a_revoked_key_stops_working_at_once_despite_the_key_cache(gw):
    await gw.oai.models.list()  # cached now
    await gw.oai.models.list()
    resp = await gw.client.delete(f"/api/v1/projects/{gw.project_id}/keys/{gw.key['id']}", headers=gw.owner.headers)
    assert resp.status in (200, 204), await resp.text()
    with pytest.raises(openai.AuthenticationError):
        await gw.oai.models.list()
    with pytest.raises(openai.AuthenticationError):
        await gw.oai.chat.completions.create(model="local/echo-1", messages=[{"role": "user", "content": "x"}])

"""One execute path for every caller: REST ``/api/v1/requests``, the gateway (JSON and SSE) and the
in-process entry ``Spending.run`` behave alike — tool-call output counted when the provider reports no
usage, the same timeout policy, the same fallbacks.

The upstream here is a small real HTTP server on loopback that answers with a tool call and reports no
usage (the shared fake always reports usage and never calls tools), or stalls when told to."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web

from domain import tokens
from domain.catalog import MTOK
from domain.spend import SpendCommand
from server.app import create_app
from server.container import Container
from server.providers import Providers, Upstream
from storage.bus import LocalBus
from tests.factories import create_key, register
from tests.fakes.gateway import FUNDS, OPENAI_KEY, GatewayEnv
from tests.fakes.upstream import FakeUpstream

MODEL = "openai/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "What is the weather in Lisbon today?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ARGUMENTS = '{"city": "Lisbon", "unit": "celsius", "days": 1}'
LIMIT = 0.5  # the provider timeout of these tests, seconds


@dataclass
class ToolUpstream(FakeUpstream):
    """OpenAI's chat completions, answering every call with one ``get_weather`` tool call and no usage
    (JSON, or SSE in two argument pieces); ``stall`` makes the next calls wait before answering."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    stall: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.stall:
            self.stall -= 1
            await asyncio.sleep(LIMIT * 6)
        head = {"id": "chatcmpl-tool", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({**head, "object": "chat.completion", "choices": [{
                "index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": ARGUMENTS}}]}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        half = len(ARGUMENTS) // 2
        deltas = [{"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {
                      "name": "get_weather", "arguments": ARGUMENTS[:half]}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": ARGUMENTS[half:]}}]}]
        for delta in deltas:
            chunk = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def env(aiohttp_client, settings, db, metrics):
    upstream = await ToolUpstream().start()
    settings = msgspec.structs.replace(settings, provider_timeout_seconds=LIMIT)
    providers = Providers(settings, upstreams=[
        Upstream(provider="openai", kind="openai", base_url=upstream.base_url, api_key=OPENAI_KEY)])
    container = Container(settings, db, LocalBus(metrics), metrics=metrics, providers=providers)
    client = await aiohttp_client(create_app(settings, container=container))
    owner = await register(client)
    gw = GatewayEnv(client=client, container=container, fake=upstream, owner=owner,
                    key=await create_key(client, owner), oai=None)  # type: ignore[arg-type]
    gw.oai = gw.sdk()
    await gw.credit(FUNDS)
    gw.upstream = upstream  # type: ignore[attr-defined]
    yield gw
    await gw.close()  # stops the upstream too


async def rest(env: GatewayEnv, **extra: Any) -> tuple[int, dict]:
    resp = await env.client.post("/api/v1/requests", headers=env.owner.headers, json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 64, "project_id": env.project_id, **extra})
    return resp.status, await resp.json()


async def gateway(env: GatewayEnv, stream: bool = False) -> tuple[int, str | None, dict | str]:
    """POST /v1/chat/completions with the project key → (status, request id, JSON body or SSE text)."""
    resp = await env.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {env.key['key']}"},
                                 json={"model": MODEL, "messages": MESSAGES, "max_tokens": 64, "tools": TOOLS,
                                       "stream": stream})
    body = await resp.text()
    return resp.status, resp.headers.get("x-smartspace-request-id"), body if stream else msgspec.json.decode(body)


async def stored(env: GatewayEnv, request_id: str) -> dict:
    resp = await env.client.get(f"/api/v1/requests/{request_id}", headers=env.owner.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def expected_charge(row: dict) -> tuple[int, int]:
    """(output tokens, cost) when the tool call is counted: its name and arguments."""
    output = tokens.count_text("get_weather" + ARGUMENTS)
    prices = row["params"]
    cost = -(-(row["input_tokens"] * prices["input_micros_per_mtok"]
               + output * prices["output_micros_per_mtok"]) // MTOK)
    return output, cost


async def assert_nothing_reserved(env: GatewayEnv) -> None:
    wallet = await env.wallet()
    assert wallet.reserved_micros == 0


async def test_tool_call_output_is_counted_alike_on_rest_the_gateway_and_its_stream(env):
    assert tokens.count_text("get_weather" + ARGUMENTS) > 1  # the output is worth counting
    status, body = await rest(env, params={"tools": TOOLS})
    assert status == 200, body
    seen = [body]
    status, rid, answer = await gateway(env)
    assert status == 200 and answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == ARGUMENTS
    assert answer["usage"]["completion_tokens"] == tokens.count_text("get_weather" + ARGUMENTS)
    seen.append(await stored(env, rid))
    status, rid, text = await gateway(env, stream=True)
    assert status == 200 and "[DONE]" in text and '"tool_calls"' in text
    seen.append(await stored(env, rid))
    for row in seen:
        output, cost = expected_charge(row)
        assert row["status"] == "settled"
        assert (row["output_tokens"], row["cost_micros"]) == (output, cost)
        assert row["receipt"]["cost_micros"] == cost
    assert [b.get("tools") for b in env.upstream.bodies] == [TOOLS] * 3  # the tools reached the provider
    await assert_nothing_reserved(env)


async def test_in_process_run_returns_the_tool_calls_of_a_settled_request(env):
    owner = env.owner
    actor = env.container.user_actor(owner.id, owner.email)
    result = await env.container.spending.run(actor, SpendCommand(
        model=MODEL, messages=MESSAGES, max_tokens=64, params={"tools": TOOLS, "tool_choice": "auto"},
        project_id=env.project_id))
    assert result.status_code == 200
    row = result.request
    assert row.status == "settled" and row.source == "api"
    call = row.response["choices"][0]["message"]["tool_calls"][0]
    assert (call["function"]["name"], call["function"]["arguments"]) == ("get_weather", ARGUMENTS)
    assert env.upstream.bodies[-1]["tools"] == TOOLS and env.upstream.bodies[-1]["tool_choice"] == "auto"
    output, cost = expected_charge(msgspec.to_builtins(row))
    assert (row.output_tokens, row.cost_micros) == (output, cost)
    assert (await env.wallet()).balance_micros == FUNDS - cost


@pytest.mark.parametrize("via", ["rest", "gateway", "stream"])
async def test_one_timeout_policy_504_and_released(env, via):
    env.upstream.stall = 1
    if via == "rest":
        status, body = await rest(env)
        code, rid = body["error"]["code"], body["error"]["details"]["request_id"]
    else:
        status, rid, body = await gateway(env, stream=via == "stream")
        code = (body if isinstance(body, dict) else msgspec.json.decode(body))["error"]["code"]
    assert (status, code) == (504, "provider_timeout")
    row = await stored(env, rid)
    assert row["status"] == "failed" and row["error"]["code"] == "provider_timeout" and row["cost_micros"] == 0
    await assert_nothing_reserved(env)
    assert (await env.wallet()).balance_micros == FUNDS


@pytest.mark.parametrize("via", ["rest", "gateway"])
async def test_a_timeout_falls_back_to_the_policys_next_model_on_both(env, via):
    await env.put_policy(fallback_models=["local/echo-1"])
    env.upstream.stall = 1
    if via == "rest":
        status, body = await rest(env)
        assert status == 200, body
        row = body
    else:
        status, rid, body = await gateway(env)
        assert status == 200, body
        row = await stored(env, rid)
    assert row["model"] == "local/echo-1" and row["status"] == "settled"
    first = await stored(env, row["metadata"]["fallback_of"])
    assert first["model"] == MODEL and first["status"] == "failed" and first["error"]["code"] == "provider_timeout"
    assert row["metadata"]["fallback_reason"] == "provider_timeout"
    await assert_nothing_reserved(env)

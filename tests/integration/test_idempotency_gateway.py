"""Idempotency-Key on the OpenAI-compatible gateway, through the official ``openai`` SDK: the same key and body
are charged once (wallet, /usage and the fake upstream's hit count agree), streams replay the same content, a
changed body is 409 in OpenAI's error shape, and a running request keeps its key past the lease."""

from __future__ import annotations

import asyncio

import msgspec
import openai
import pytest
import sqlalchemy as sa

from storage.models import idempotency_keys
from tests.fakes.gateway import start_gateway
from tests.fakes.upstream import Behavior

MESSAGES = [{"role": "user", "content": "say something twice"}]


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics)
    yield env
    await env.close()


def keyed(key: str) -> dict:
    return {"extra_headers": {"Idempotency-Key": key}}


async def usage(gw) -> dict:
    resp = await gw.client.get(f"/api/v1/projects/{gw.project_id}/usage", headers=gw.owner.headers)
    assert resp.status == 200
    return await resp.json()


async def test_three_identical_chat_completions_with_one_key_are_charged_once(gw):
    before = (await gw.wallet()).balance_micros
    answers = []
    for _ in range(3):
        raw = await gw.oai.chat.completions.with_raw_response.create(
            model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=20, **keyed("chat-1"))
        answers.append((raw.parse(), raw.headers))
    (first, h1), (second, h2), (third, h3) = answers
    assert first.choices[0].message.content.startswith("Reply")
    assert second.model_dump() == first.model_dump() == third.model_dump()
    assert h1["x-smartspace-request-id"] == h2["x-smartspace-request-id"] == h3["x-smartspace-request-id"]
    cost = int(h1["x-smartspace-cost-micros"])
    assert cost > 0 and h3["x-smartspace-cost-micros"] == str(cost)
    assert "idempotent-replayed" not in h1 and h2["idempotent-replayed"] == h3["idempotent-replayed"] == "true"
    assert len(gw.fake.received) == 1  # the provider was called once
    assert (await gw.wallet()).balance_micros == before - cost
    report = await usage(gw)
    assert report["totals"]["requests"] == 1 and report["totals"]["cost_micros"] == cost


async def test_a_replayed_stream_gives_the_sdk_the_same_content(gw):
    before = (await gw.wallet()).balance_micros

    async def streamed() -> tuple[str, dict]:
        stream = await gw.oai.chat.completions.create(
            model="openai/gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
            **keyed("stream-1"))
        text, final = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                final = chunk.usage.model_dump()
        assert final is not None
        return text, final

    first_text, first_usage = await streamed()
    again_text, again_usage = await streamed()
    assert first_text.startswith("Reply") and again_text == first_text
    assert again_usage == first_usage and first_usage["cost_micros"] > 0
    assert len(gw.fake.received) == 1
    assert (await gw.wallet()).balance_micros == before - first_usage["cost_micros"]
    assert (await usage(gw))["totals"]["requests"] == 1


async def test_a_changed_body_with_the_same_key_is_409_in_openai_error_shape(gw):
    await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=20,
                                         **keyed("chat-2"))
    with pytest.raises(openai.ConflictError) as caught:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=21,
                                             **keyed("chat-2"))
    error = caught.value.body
    assert caught.value.status_code == 409 and error["code"] == "conflict" and error["type"] == "invalid_request_error"
    assert "different request" in error["message"]
    assert len(gw.fake.received) == 1
    assert (await usage(gw))["totals"]["requests"] == 1


async def test_embeddings_with_one_key_are_charged_once(gw):
    before = (await gw.wallet()).balance_micros
    first = await gw.oai.embeddings.with_raw_response.create(model="openai/text-embedding-3-small",
                                                             input=["one", "two"], **keyed("emb-1"))
    again = await gw.oai.embeddings.with_raw_response.create(model="openai/text-embedding-3-small",
                                                             input=["one", "two"], **keyed("emb-1"))
    assert again.parse().model_dump() == first.parse().model_dump()
    assert again.headers["idempotent-replayed"] == "true"
    cost = int(first.headers["x-smartspace-cost-micros"])
    assert len(gw.fake.received) == 1 and (await gw.wallet()).balance_micros == before - cost


async def test_an_upstream_failure_releases_the_key_and_the_retry_is_charged_once(gw):
    before = (await gw.wallet()).balance_micros
    gw.fake.plan(Behavior(status=500))
    with pytest.raises(openai.APIStatusError) as caught:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=20,
                                             **keyed("chat-3"))
    assert caught.value.status_code == 502
    raw = await gw.oai.chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=20, **keyed("chat-3"))
    assert "idempotent-replayed" not in raw.headers  # it ran anew
    cost = int(raw.headers["x-smartspace-cost-micros"])
    assert len(gw.fake.received) == 2 and (await gw.wallet()).balance_micros == before - cost


async def test_a_running_request_keeps_its_key_past_its_lease(aiohttp_client, settings, db, metrics):
    settings = msgspec.structs.replace(settings, idempotency_lease_seconds=0.3)
    gw = await start_gateway(aiohttp_client, settings, db, metrics)
    try:
        gw.fake.plan(Behavior(delay=3.0))  # the provider takes ten leases to answer
        first = asyncio.create_task(gw.oai.chat.completions.create(
            model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=20, **keyed("slow-1")))
        claimed = await _claim(db, lambda row: row is not None)
        renewed = await _claim(db, lambda row: row is not None and row.locked_until > claimed.locked_until)
        assert renewed.status == 0  # still running, its lease renewed: nobody may take the key over
        with pytest.raises(openai.ConflictError) as caught:
            await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=20,
                                                 **keyed("slow-1"))
        assert "in progress" in caught.value.body["message"]
        answer = await asyncio.wait_for(first, 30)
        again = await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=20,
                                                     **keyed("slow-1"))
        assert again.model_dump() == answer.model_dump()
        assert len(gw.fake.received) == 1
    finally:
        await gw.close()


async def _claim(db, ready):
    """Await the first state of the slow-1 claim row that satisfies ``ready`` (read every 20 ms)."""
    async def poll():
        while True:
            async with db.engine.connect() as conn:
                row = (await conn.execute(sa.select(idempotency_keys).where(idempotency_keys.c.key == "slow-1"))
                       ).first()
            if ready(row):
                return row
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), 20)

"""Gateway error mapping through the official client: 402, 403 (policy / approval), 429, 502, 504 — and the
money: every failure releases what it did not consume, and no provider key ever leaks."""

from __future__ import annotations

import asyncio
import logging

import openai
import pytest

from tests.fakes.gateway import ANTHROPIC_KEY, OPENAI_KEY, start_gateway
from tests.fakes.upstream import Behavior

USER = [{"role": "user", "content": "hello gateway"}]


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    # generous: a loaded machine must not turn a quick answer into a 504
    env = await start_gateway(aiohttp_client, settings, db, metrics, provider_timeout=2.0)
    yield env
    await env.close()


async def settled_state(gw):
    wallet = await gw.wallet()
    assert wallet.reserved_micros == 0  # nothing left reserved
    return wallet


async def test_insufficient_funds_is_402(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics, funds=0)
    try:
        with pytest.raises(openai.APIStatusError) as err:
            await env.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
        assert err.value.status_code == 402 and err.value.code == "insufficient_funds"
        assert err.value.response.headers["x-smartspace-request-id"].startswith("req_")
        assert env.fake.received == []  # never called upstream
    finally:
        await env.close()


async def test_budget_exceeded_is_402(gw):
    resp = await gw.client.post(f"/api/v1/projects/{gw.project_id}/budgets", headers=gw.owner.headers,
                                json={"name": "tiny", "limit_micros": 1, "period": "day"})
    assert resp.status == 201, await resp.text()
    with pytest.raises(openai.APIStatusError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
    assert err.value.status_code == 402 and err.value.code == "budget_exceeded"
    await settled_state(gw)


async def test_policy_violation_is_403(gw):
    await gw.put_policy(blocked_providers=["openai"])
    with pytest.raises(openai.PermissionDeniedError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
    assert err.value.code == "policy_violation"
    assert gw.fake.received == []


async def test_rate_limited_is_429_with_retry_after(gw):
    await gw.put_policy(rate_limits={"key": {"per_minute": 1}})
    await gw.oai.chat.completions.create(model="local/echo-1", messages=USER)
    with pytest.raises(openai.RateLimitError) as err:
        await gw.oai.chat.completions.create(model="local/echo-1", messages=USER)
    assert err.value.code == "rate_limited"
    assert int(err.value.response.headers["Retry-After"]) >= 1


async def test_approval_required_is_403_with_request_id_then_wait_and_approve(gw):
    await gw.put_policy(require_approval_above_micros=1)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER, max_tokens=20)
    assert err.value.code == "approval_required"
    assert err.value.body["details"]["request_id"].startswith("req_")

    # With X-SmartSpace-Wait the call waits; an admin approves meanwhile; the call proceeds.
    waiting = asyncio.create_task(gw.oai.chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", messages=USER, max_tokens=20, extra_headers={"X-SmartSpace-Wait": "20"}))
    request_id = None
    for _ in range(200):
        await asyncio.sleep(0.05)
        resp = await gw.client.get(f"/api/v1/projects/{gw.project_id}/requests?status=pending_approval",
                                   headers=gw.owner.headers)
        items = (await resp.json()).get("items", []) if resp.status == 200 else []
        fresh = [i for i in items if i["id"] != err.value.body["details"]["request_id"]]
        if fresh:
            request_id = fresh[0]["id"]
            break
    assert request_id is not None, "the waiting request never showed up as pending"
    resp = await gw.client.post(f"/api/v1/requests/{request_id}/approve", json={}, headers=gw.owner.headers)
    assert resp.status == 200, await resp.text()
    raw = await waiting
    assert raw.headers["x-smartspace-request-id"] == request_id
    assert raw.parse().choices[0].message.content.startswith("Reply")

    # Waiting runs out: 403 approval_required again.
    with pytest.raises(openai.PermissionDeniedError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER, max_tokens=20,
                                             extra_headers={"X-SmartSpace-Wait": "0.3"})
    assert err.value.code == "approval_required"


@pytest.mark.parametrize(("status", "answer", "code"), [(500, 502, "provider_error"), (429, 502, "provider_error"),
                                                        (401, 502, "provider_error"), (400, 400, "invalid_request")])
async def test_upstream_errors_map_and_release_everything(gw, status, answer, code):
    before = await gw.wallet()
    gw.fake.plan(Behavior(status=status, echo_key=True))
    with pytest.raises(openai.APIStatusError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
    assert err.value.status_code == answer and err.value.code == code
    assert OPENAI_KEY not in err.value.message and OPENAI_KEY not in err.value.response.text
    after = await settled_state(gw)
    assert after.balance_micros == before.balance_micros  # nothing consumed, nothing charged


async def test_upstream_timeout_is_504_and_releases(gw):
    gw.fake.plan(Behavior(delay=6.0))
    with pytest.raises(openai.APIStatusError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
    assert err.value.status_code == 504 and err.value.code == "provider_timeout"
    await settled_state(gw)


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku"])
async def test_cut_stream_charges_what_was_consumed_and_releases_the_rest(gw, model):
    before = await gw.wallet()
    gw.fake.plan(Behavior(cut_after=4))
    stream = await gw.oai.chat.completions.create(model=model, messages=USER, stream=True)
    got = ""
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            if chunk.choices:
                got += chunk.choices[0].delta.content or ""
    assert len(got.split()) == 4
    assert "provider_error" in str(err.value.body) or err.value.code == "provider_error"
    after = await settled_state(gw)
    charged = before.balance_micros - after.balance_micros
    assert charged > 0  # the input and four words were consumed: never priced at zero


async def test_stall_mid_stream_times_out_inside_the_stream(gw):
    gw.fake.plan(Behavior(delay=6.0, stall_after=2))
    stream = await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER, stream=True)
    with pytest.raises(openai.APIError) as err:
        async for _ in stream:
            pass
    assert "provider_timeout" in str(err.value.body)
    await settled_state(gw)


async def test_client_hanging_up_mid_stream_settles_and_releases(gw):
    before = await gw.wallet()
    gw.fake.reply_words = 400
    gw.fake.plan(Behavior(delay=0.5, stall_after=3))
    resp = await gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {gw.key['key']}"},
                                json={"model": "openai/gpt-4o-mini", "messages": USER, "stream": True})
    assert resp.status == 200
    await resp.content.readline()
    resp.close()  # hang up
    for _ in range(100):
        await asyncio.sleep(0.05)
        wallet = await gw.wallet()
        if wallet.reserved_micros == 0:
            break
    after = await settled_state(gw)
    assert after.balance_micros < before.balance_micros  # what was streamed before the hang-up is paid


async def test_fallback_model_on_upstream_429(gw):
    await gw.put_policy(fallback_models=["anthropic/claude-3-5-haiku"])
    gw.fake.plan(Behavior(status=429, retry_after=3))
    raw = await gw.oai.chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=USER)
    assert raw.parse().choices[0].message.content.startswith("Reply")
    assert [r.path for r in gw.fake.received] == ["/v1/chat/completions", "/v1/messages"]
    await settled_state(gw)
    # streaming falls back too, when the first upstream fails before the first chunk
    gw.fake.plan(Behavior(status=503))
    stream = await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("Reply") and gw.fake.received[-1].path == "/v1/messages"


async def test_no_provider_key_in_any_response_event_or_log(gw, caplog):
    caplog.set_level(logging.DEBUG)
    gw.fake.plan(Behavior(status=401, echo_key=True), Behavior(status=500, echo_key=True))
    for model in ("openai/gpt-4o-mini", "anthropic/claude-3-5-haiku"):
        with pytest.raises(openai.APIStatusError):
            await gw.oai.chat.completions.create(model=model, messages=USER)
    await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
    stream = await gw.oai.chat.completions.create(model="anthropic/claude-3-5-haiku", messages=USER, stream=True)
    async for _ in stream:
        pass
    # the keys did reach the upstream…
    assert any(r.headers.get("Authorization") == f"Bearer {OPENAI_KEY}" for r in gw.fake.received)
    assert any(r.headers.get("x-api-key") == ANTHROPIC_KEY for r in gw.fake.received)
    # …and nowhere else: not in the event log, the request records, or a log line
    resp = await gw.client.get(f"/api/v1/projects/{gw.project_id}/audit?limit=200", headers=gw.owner.headers)
    audit = await resp.text()
    assert resp.status == 200 and "request." in audit
    resp = await gw.client.get(f"/api/v1/projects/{gw.project_id}/requests?limit=200", headers=gw.owner.headers)
    requests_text = await resp.text()
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, "UPSTREAM-"):
        assert secret not in audit and secret not in requests_text and secret not in caplog.text


async def test_a_fallback_is_re_checked_and_a_refused_one_leaves_the_original_error(gw):
    await gw.put_policy(fallback_models=["anthropic/claude-3-5-haiku"], blocked_providers=["anthropic"])
    gw.fake.plan(Behavior(status=500))
    with pytest.raises(openai.APIStatusError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
    assert err.value.status_code == 502 and err.value.code == "provider_error"
    assert [r.path for r in gw.fake.received] == ["/v1/chat/completions"]  # the refused fallback never ran
    await settled_state(gw)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_catalog_model_whose_provider_is_not_configured_is_404_and_releases(gw, stream):
    import sqlalchemy as sa

    from domain.base import utcnow
    from storage.models import catalog_models

    async with gw.container.db.write() as conn:
        await conn.execute(sa.insert(catalog_models).values(
            id="mistral/mistral-small", provider="mistral", name="mistral-small", kind="chat",
            input_micros_per_mtok=200_000, output_micros_per_mtok=600_000, context_window=32_000,
            max_output_tokens=8_000, active=True, updated_at=utcnow()))
    before = await gw.wallet()
    with pytest.raises(openai.NotFoundError) as err:
        await gw.oai.chat.completions.create(model="mistral/mistral-small", messages=USER, max_tokens=50,
                                             stream=stream)
    assert err.value.code == "not_found"
    after = await settled_state(gw)
    assert after.balance_micros == before.balance_micros

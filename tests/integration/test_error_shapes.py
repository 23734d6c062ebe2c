"""Errors in each ecosystem's shape: OpenAI's exactly under /v1/ (the official SDK's exception classes, raw
HTTP), and REST validation messages that name the field and the rule in words."""

from __future__ import annotations

import openai
import pytest

from tests.factories import register
from tests.fakes.gateway import start_gateway
from tests.fakes.upstream import Behavior

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics)
    yield env
    await env.close()


async def test_openai_types_by_status_with_smartspace_codes_kept(gw):
    async with gw.sdk(api_key="sk-wrong") as wrong:
        with pytest.raises(openai.AuthenticationError) as err:
            await wrong.chat.completions.create(model="local/echo-1", messages=HI)
    assert err.value.type == "authentication_error" and err.value.code == "unauthorized"
    assert "unknown" in err.value.message and "start with" not in err.value.message

    with pytest.raises(openai.BadRequestError) as err:
        await gw.oai.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=0)
    assert (err.value.type, err.value.param, err.value.code) == ("invalid_request_error", "max_tokens",
                                                                 "invalid_request")
    with pytest.raises(openai.NotFoundError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-99", messages=HI)
    assert err.value.type == "not_found_error"

    await gw.put_policy(blocked_models=["local/echo-1"])
    with pytest.raises(openai.PermissionDeniedError) as err:
        await gw.oai.chat.completions.create(model="local/echo-1", messages=HI)
    assert err.value.type == "permission_error" and err.value.code == "policy_violation"

    gw.fake.plan(Behavior(status=500))
    with pytest.raises(openai.APIStatusError) as err:
        await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=HI)
    assert err.value.status_code == 502 and err.value.type == "api_error" and err.value.code == "provider_error"

    await gw.put_policy(rate_limits={"key": {"per_minute": 1}})
    await gw.oai.chat.completions.create(model="local/echo-1", messages=HI)
    with pytest.raises(openai.RateLimitError) as err:
        await gw.oai.chat.completions.create(model="local/echo-1", messages=HI)
    assert err.value.type == "rate_limit_error" and err.value.code == "rate_limited"
    assert int(err.value.response.headers["Retry-After"]) >= 1


async def test_raw_http_errors_under_v1_are_400_in_openai_shape(gw):
    headers = {"Authorization": f"Bearer {gw.key['key']}"}
    for body, param in [({"model": "local/echo-1"}, "messages"), ({"messages": HI}, "model"),
                        ({"model": "local/echo-1", "messages": HI, "n": 3}, "n")]:
        resp = await gw.client.post("/v1/chat/completions", json=body, headers=headers)
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert error["code"] == "invalid_request" and param in error["message"]
    resp = await gw.client.post("/v1/embeddings", data=b"[1, 2", headers=headers)
    assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
    resp = await gw.client.post("/v1/chat/completions", json={"model": "local/echo-1", "messages": HI})
    assert resp.status == 401 and (await resp.json())["error"]["type"] == "authentication_error"
    wallet = await gw.wallet()
    assert wallet.reserved_micros == 0  # nothing was reserved by any of them


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"name": "b", "limit_micros": "ten", "period": "day"}, "limit_micros", "must be an integer, not a string"),
    ({"name": "b", "limit_micros": 10, "period": "year"}, "period", "must be one of"),
    ({"name": "b", "limit_micros": 10}, "period", "is required"),
    ({"name": "", "limit_micros": 10, "period": "day"}, "name", "at least 1 character"),
    ({"name": "b", "limit_micros": 10, "period": "day", "colour": 1}, "colour", "is not a field"),
])
async def test_rest_validation_names_the_field_and_the_rule_in_words(client, body, field, words):
    user = await register(client)
    resp = await client.post(f"/api/v1/projects/{user.project_id}/budgets", json=body, headers=user.headers)
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_request" and error["details"]["field"] == field
    assert f"`{field}`" in error["message"] and words in error["message"]
    assert "$." not in error["message"] and "Expected" not in error["message"]
    listed = await (await client.get(f"/api/v1/projects/{user.project_id}/budgets", headers=user.headers)).json()
    assert listed["items"] == []


async def test_a_pattern_is_told_in_words_not_as_a_regex(client):
    resp = await client.post("/api/v1/auth/register", json={"email": "not-an-email", "password": "pw-123456789",
                                                            "name": "N"})
    assert resp.status == 422
    message = (await resp.json())["error"]["message"]
    assert message.startswith("`email` must be an email address") and "^" not in message and "regex" not in message
    user = await register(client)
    resp = await client.post(f"/api/v1/projects/{user.project_id}/deposits", json={"tx_hash": "0x12"},
                             headers=user.headers)
    assert resp.status == 422 and "64 hex digits" in (await resp.json())["error"]["message"]

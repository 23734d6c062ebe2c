"""Virtual keys through the official ``openai`` client: expiry, allowed models, the key's own budgets and rate
limits, the budget-remaining header, and what a key reads of its own doings."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import openai
import pytest
import socketio
import sqlalchemy as sa

from storage import models
from tests.factories import create_key
from tests.fakes.gateway import start_gateway
from tests.live import LiveClient

P = "/api/v1/projects/{}"
HI = [{"role": "user", "content": "hello there"}]
WAIT = 20.0  # well under the gateway's 30 s key cache: a cached key outliving its expiry fails this


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, settings, db, metrics)
    yield env
    await env.close()


async def new_key(gw, **terms) -> dict:
    return await create_key(gw.client, gw.owner, **terms)


async def budget(gw, limit: int, **scope) -> dict:
    resp = await gw.client.post(P.format(gw.project_id) + "/budgets", headers=gw.owner.headers,
                                json={"name": f"b-{limit}", "limit_micros": limit, "period": "day", **scope})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def get_budget(gw, budget_id: str) -> dict:
    return await (await gw.client.get(P.format(gw.project_id) + f"/budgets/{budget_id}",
                                      headers=gw.owner.headers)).json()


# ---------------------------------------------------------------- terms
async def test_a_keys_terms_are_stored_shown_and_listed(gw):
    expires = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
    key = await new_key(gw, expires_at=expires.isoformat(), allowed_models=["openai/gpt-4o-mini", "local/echo-1"],
                        scopes=["usage:read", "audit:read"], rate_limits={"per_minute": 5, "per_day": 100})
    assert datetime.fromisoformat(key["expires_at"]) == expires
    assert key["allowed_models"] == ["openai/gpt-4o-mini", "local/echo-1"]
    assert key["scopes"] == ["audit:read", "usage:read"]
    assert key["rate_limits"] == {"per_minute": 5, "per_hour": None, "per_day": 100}
    listed = await (await gw.client.get(P.format(gw.project_id) + "/keys", headers=gw.owner.headers)).json()
    [shown] = [k for k in listed["items"] if k["id"] == key["id"]]
    assert {f: shown[f] for f in ("allowed_models", "scopes", "rate_limits")} == {
        f: key[f] for f in ("allowed_models", "scopes", "rate_limits")}
    assert "key" not in shown


@pytest.mark.parametrize("terms, field", [
    ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ({"expires_at": "2999-01-01T00:00:00"}, "expires_at"),
    ({"allowed_models": ["gpt-4o-mini"]}, "allowed_models"),
    ({"scopes": ["admin"]}, "scopes"),
])
async def test_bad_terms_are_refused_and_create_nothing(gw, terms, field):
    before = await (await gw.client.get(P.format(gw.project_id) + "/keys", headers=gw.owner.headers)).json()
    resp = await gw.client.post(P.format(gw.project_id) + "/keys", json={"name": "k", **terms},
                                headers=gw.owner.headers)
    assert resp.status == 422, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_request" and error["details"]["field"] == field
    after = await (await gw.client.get(P.format(gw.project_id) + "/keys", headers=gw.owner.headers)).json()
    assert after == before


async def test_rate_limits_of_zero_are_refused(gw):
    resp = await gw.client.post(P.format(gw.project_id) + "/keys", json={"name": "k", "rate_limits": {"per_minute": 0}},
                                headers=gw.owner.headers)
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_request"


# ---------------------------------------------------------------- expiry
async def test_an_expired_key_is_refused_everywhere_and_the_key_cache_does_not_outlive_it(gw):
    expires = datetime.now(UTC) + timedelta(seconds=4)
    key = await new_key(gw, expires_at=expires.isoformat(), scopes=["project:read"])
    sdk = gw.sdk(api_key=key["key"])
    try:
        first = await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)
        assert first.choices[0].message.content  # the key works, and is in the gateway's key cache now
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    await sdk.models.list()
                except openai.AuthenticationError as exc:
                    assert exc.status_code == 401 and exc.code == "unauthorized"
                    break
                await asyncio.sleep(0.1)
        assert datetime.now(UTC) >= expires
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)
    finally:
        await sdk.close()
    resp = await gw.client.get(P.format(gw.project_id), headers={"X-API-Key": key["key"]})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    refused = LiveClient(str(gw.client.make_url("/")), key["key"])
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect()
    await refused.disconnect()


async def test_a_key_past_its_expiry_in_the_database_fails_at_once_on_rest(gw):
    key = await new_key(gw, expires_at=(datetime.now(UTC) + timedelta(days=1)).isoformat(), scopes=["project:read"])
    assert (await gw.client.get(P.format(gw.project_id), headers={"X-API-Key": key["key"]})).status == 200
    async with gw.container.db.write() as conn:
        await conn.execute(sa.update(models.api_keys).where(models.api_keys.c.id == key["id"]).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    resp = await gw.client.get(P.format(gw.project_id), headers={"X-API-Key": key["key"]})
    assert resp.status == 401


# ---------------------------------------------------------------- allowed models
async def test_a_model_outside_allowed_models_is_refused_before_anything_is_reserved(gw):
    key = await new_key(gw, allowed_models=["openai/gpt-4o-mini"])
    project_budget = await budget(gw, 5_000_000)
    wallet_before = await gw.wallet()
    sdk = gw.sdk(api_key=key["key"])
    try:
        with pytest.raises(openai.PermissionDeniedError) as err:
            await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)
        assert err.value.status_code == 403 and err.value.code == "policy_violation"
        assert "openai/gpt-4o-mini" in err.value.message and "local/echo-1" in err.value.message
        assert gw.fake.received == []  # no upstream was called
        after = await gw.wallet()
        assert (after.balance_micros, after.reserved_micros) == (wallet_before.balance_micros, 0)
        assert (await get_budget(gw, project_budget["id"]))["reserved_micros"] == 0
        allowed = await sdk.chat.completions.with_raw_response.create(
            model="openai/gpt-4o-mini", messages=HI, max_tokens=20)
        assert int(allowed.headers["x-smartspace-cost-micros"]) > 0
    finally:
        await sdk.close()


# ---------------------------------------------------------------- the key's budgets and the remaining header
async def test_answers_carry_what_the_tightest_applying_budget_has_left(gw):
    key = await new_key(gw)
    await budget(gw, 5_000_000)  # project-wide
    own = await budget(gw, 40_000, key_id=key["id"])
    other_key = await new_key(gw)
    await budget(gw, 30_000, key_id=other_key["id"])  # another key's: does not apply
    sdk = gw.sdk(api_key=key["key"])
    try:
        raw = await sdk.chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=HI,
                                                                  max_tokens=20)
        cost = int(raw.headers["x-smartspace-cost-micros"])
        assert int(raw.headers["x-smartspace-budget-remaining-micros"]) == 40_000 - cost
        stored = await get_budget(gw, own["id"])
        assert (stored["spent_micros"], stored["reserved_micros"], stored["key_id"]) == (cost, 0, key["id"])
        stream = await sdk.chat.completions.create(model="openai/gpt-4o-mini", messages=HI, max_tokens=20,
                                                   stream=True, stream_options={"include_usage": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        second = usage.model_extra["cost_micros"]
        assert usage.model_extra["budget_remaining_micros"] == 40_000 - cost - second
    finally:
        await sdk.close()
    # Without any budget the header is absent.
    for b in (await (await gw.client.get(P.format(gw.project_id) + "/budgets", headers=gw.owner.headers)).json())[
            "items"]:
        await gw.client.delete(P.format(gw.project_id) + f"/budgets/{b['id']}", headers=gw.owner.headers)
    raw = await gw.oai.chat.completions.with_raw_response.create(model="local/echo-1", messages=HI, max_tokens=20)
    assert "x-smartspace-budget-remaining-micros" not in raw.headers


async def test_a_key_budget_is_refused_for_a_foreign_or_revoked_key_and_with_an_agent(gw, container):
    key = await new_key(gw)
    base = P.format(gw.project_id) + "/budgets"
    body = {"name": "b", "limit_micros": 1000, "period": "day"}
    resp = await gw.client.post(base, json={**body, "key_id": "key_nope"}, headers=gw.owner.headers)
    assert resp.status == 404
    agent = await (await gw.client.post(P.format(gw.project_id) + "/agents", json={"name": "a"},
                                        headers=gw.owner.headers)).json()
    resp = await gw.client.post(base, json={**body, "key_id": key["id"], "agent_id": agent["id"]},
                                headers=gw.owner.headers)
    assert resp.status == 422
    await gw.client.delete(P.format(gw.project_id) + f"/keys/{key['id']}", headers=gw.owner.headers)
    resp = await gw.client.post(base, json={**body, "key_id": key["id"]}, headers=gw.owner.headers)
    assert resp.status == 422
    listed = await (await gw.client.get(base, headers=gw.owner.headers)).json()
    assert listed["items"] == []


async def test_concurrent_calls_never_take_a_key_budget_over_its_limit(gw):
    key, other = await new_key(gw), await new_key(gw)
    # local/echo-1 with max_tokens 1000 reserves ~200 µUSDC: the budget holds a handful at once.
    own = await budget(gw, 1_000, key_id=key["id"])
    mine, theirs = gw.sdk(api_key=key["key"]), gw.sdk(api_key=other["key"])

    async def call(sdk) -> int | str:
        try:
            raw = await sdk.chat.completions.with_raw_response.create(model="local/echo-1", messages=HI,
                                                                      max_tokens=1000)
        except openai.APIStatusError as exc:
            return exc.code
        return int(raw.headers["x-smartspace-cost-micros"])

    try:
        results = await asyncio.gather(*[call(mine) for _ in range(30)], *[call(theirs) for _ in range(10)])
    finally:
        await mine.close()
        await theirs.close()
    ours, others = results[:30], results[30:]
    assert all(isinstance(r, int) for r in others)  # the other key is not bound by this key's budget
    costs = [r for r in ours if isinstance(r, int)]
    assert costs and set(ours) - set(costs) <= {"budget_exceeded"}
    assert "budget_exceeded" in ours  # 30 × ~200 µUSDC worst case cannot all fit in 1 000
    stored = await get_budget(gw, own["id"])
    assert stored["reserved_micros"] == 0
    assert stored["spent_micros"] == sum(costs) <= stored["limit_micros"]
    wallet = await gw.wallet()
    assert wallet.reserved_micros == 0
    hot = gw.container.spending.hot
    if hot is not None:  # PostgreSQL: the hot path reserved against the key's budget, not the generic path only
        assert hot.outcomes["reserve"] > 0, hot.outcomes


async def test_keys_taking_turns_each_reserve_on_their_own_budgets_only(gw):
    """Sequential calls of two keys: on PostgreSQL the express lane remembers the budgets per (agent, key)."""
    a, b = await new_key(gw), await new_key(gw)
    project_wide = await budget(gw, 5_000_000)
    of_a = await budget(gw, 1_000_000, key_id=a["id"])
    sdks = {"a": gw.sdk(api_key=a["key"]), "b": gw.sdk(api_key=b["key"])}
    spent: dict[str, list[tuple[str, int]]] = {"a": [], "b": []}
    try:
        for who in "abab" * 3:
            raw = await sdks[who].chat.completions.with_raw_response.create(model="local/echo-1", messages=HI,
                                                                            max_tokens=20)
            spent[who].append((raw.headers["x-smartspace-request-id"], int(raw.headers["x-smartspace-cost-micros"])))
    finally:
        for sdk in sdks.values():
            await sdk.close()
    for who, expected in (("a", sorted([project_wide["id"], of_a["id"]])), ("b", [project_wide["id"]])):
        for request_id, _ in spent[who]:
            row = await (await gw.client.get(f"/api/v1/requests/{request_id}", headers=gw.owner.headers)).json()
            assert (row["key_id"], sorted(row["budget_ids"])) == ((a if who == "a" else b)["id"], expected)
    assert (await get_budget(gw, of_a["id"]))["spent_micros"] == sum(c for _, c in spent["a"])
    assert (await get_budget(gw, project_wide["id"]))["spent_micros"] == sum(
        c for _, c in spent["a"] + spent["b"])
    hot = gw.container.spending.hot
    if hot is not None:
        assert hot.outcomes["express"] > 0, hot.outcomes


# ---------------------------------------------------------------- the key's own rate limits
async def test_a_keys_own_rate_limit_holds_and_binds_that_key_only(gw):
    key = await new_key(gw, rate_limits={"per_minute": 2})
    sdk = gw.sdk(api_key=key["key"])
    try:
        for _ in range(2):
            await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)
        with pytest.raises(openai.RateLimitError) as err:
            await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)
        assert err.value.code == "rate_limited" and "the key's own limit" in err.value.message
        assert int(err.value.response.headers["Retry-After"]) > 0
    finally:
        await sdk.close()
    await gw.oai.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)  # another key: fine


async def test_the_lower_of_the_keys_own_limit_and_the_policys_per_key_limit_holds(gw):
    await gw.put_policy(rate_limits={"key": {"per_minute": 1}})
    key = await new_key(gw, rate_limits={"per_minute": 5})
    sdk = gw.sdk(api_key=key["key"])
    try:
        await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)
        with pytest.raises(openai.RateLimitError) as err:
            await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)
        assert "1 requests per minute" in err.value.message
    finally:
        await sdk.close()


# ---------------------------------------------------------------- a key's own requests and usage
async def test_a_key_reads_its_own_requests_and_usage_unless_granted_the_projects(gw):
    a, b = await new_key(gw), await new_key(gw, scopes=["requests:read", "usage:read"])
    ids = {}
    for name, key in (("a", a), ("b", b)):
        sdk = gw.sdk(api_key=key["key"])
        try:
            raw = await sdk.chat.completions.with_raw_response.create(model="local/echo-1", messages=HI,
                                                                      max_tokens=20)
            ids[name] = (raw.headers["x-smartspace-request-id"], int(raw.headers["x-smartspace-cost-micros"]))
        finally:
            await sdk.close()
    as_a, as_b = {"X-API-Key": a["key"]}, {"X-API-Key": b["key"]}
    base = P.format(gw.project_id)
    listed = await (await gw.client.get(base + "/requests", headers=as_a)).json()
    assert [r["id"] for r in listed["items"]] == [ids["a"][0]]
    assert (await gw.client.get(f"/api/v1/requests/{ids['a'][0]}", headers=as_a)).status == 200
    assert (await gw.client.get(f"/api/v1/requests/{ids['b'][0]}", headers=as_a)).status == 404
    usage = await (await gw.client.get(base + "/usage", headers=as_a)).json()
    assert usage["key_id"] == a["id"] and usage["totals"]["requests"] == 1
    assert usage["totals"]["cost_micros"] == ids["a"][1] and usage["ledger"] == {}
    # Granted the project's requests and usage: both keys' (and the owner sees the same).
    listed = await (await gw.client.get(base + "/requests", headers=as_b)).json()
    assert {r["id"] for r in listed["items"]} == {ids["a"][0], ids["b"][0]}
    assert (await gw.client.get(f"/api/v1/requests/{ids['a'][0]}", headers=as_b)).status == 200
    whole = await (await gw.client.get(base + "/usage", headers=as_b)).json()
    assert whole["key_id"] is None and whole["totals"]["cost_micros"] == ids["a"][1] + ids["b"][1]
    owners = await (await gw.client.get(base + "/usage", headers=gw.owner.headers)).json()
    assert owners["totals"] == whole["totals"]


# ---------------------------------------------------------------- changing a key's terms
async def test_changed_terms_take_effect_at_once_despite_the_key_cache(gw):
    key = await new_key(gw)
    url = P.format(gw.project_id) + f"/keys/{key['id']}"
    sdk = gw.sdk(api_key=key["key"])
    try:
        await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)  # cached now
        resp = await gw.client.get(P.format(gw.project_id) + "/audit", headers={"X-API-Key": key["key"]})
        assert resp.status == 403
        resp = await gw.client.patch(url, json={"allowed_models": ["openai/gpt-4o-mini"], "scopes": ["audit:read"],
                                                "name": "renamed"}, headers=gw.owner.headers)
        assert resp.status == 200, await resp.text()
        changed = await resp.json()
        assert (changed["name"], changed["allowed_models"], changed["scopes"]) == (
            "renamed", ["openai/gpt-4o-mini"], ["audit:read"])
        with pytest.raises(openai.PermissionDeniedError) as err:
            await sdk.chat.completions.create(model="local/echo-1", messages=HI, max_tokens=20)
        assert err.value.code == "policy_violation"
        audit = await gw.client.get(P.format(gw.project_id) + "/audit", params={"type": "key.updated"},
                                    headers={"X-API-Key": key["key"]})
        assert audit.status == 200
        [event] = (await audit.json())["items"]
        assert event["data"]["changes"] == ["allowed_models", "name", "scopes"]
        # An expiry set to a moment past: refused at once on the gateway (the update dropped the cached key).
        resp = await gw.client.patch(url, json={"expires_at": (datetime.now(UTC) + timedelta(seconds=2)).isoformat()},
                                     headers=gw.owner.headers)
        assert resp.status == 200
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    await sdk.models.list()
                except openai.AuthenticationError:
                    break
                await asyncio.sleep(0.1)
    finally:
        await sdk.close()


async def test_bad_or_empty_changes_and_revoked_keys_change_nothing(gw):
    key = await new_key(gw, scopes=["audit:read"])
    url = P.format(gw.project_id) + f"/keys/{key['id']}"
    for body, status in (({}, 422), ({"scopes": ["root"]}, 422), ({"expires_at": "2001-01-01T00:00:00Z"}, 422),
                         ({"key": "sk-mine"}, 422), ({"rate_limits": {"per_hour": 0}}, 422)):
        resp = await gw.client.patch(url, json=body, headers=gw.owner.headers)
        assert resp.status == status, (body, await resp.text())
    resp = await gw.client.patch(url, json={"name": "x"}, headers={"X-API-Key": key["key"]})
    assert resp.status == 403  # a key cannot change keys, whatever its scopes
    await gw.client.delete(url, headers=gw.owner.headers)
    resp = await gw.client.patch(url, json={"name": "x"}, headers=gw.owner.headers)
    assert resp.status == 409
    listed = await (await gw.client.get(P.format(gw.project_id) + "/keys", headers=gw.owner.headers)).json()
    [stored] = [k for k in listed["items"] if k["id"] == key["id"]]
    assert (stored["name"], stored["scopes"]) == (key["name"], ["audit:read"])
    resp = await gw.client.patch(P.format(gw.project_id) + "/keys/key_nope", json={"name": "x"},
                                 headers=gw.owner.headers)
    assert resp.status == 404

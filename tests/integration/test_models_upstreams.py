"""Catalog models added by admins and declared beside their upstream; several upstreams for one provider.

Real HTTP throughout: the app on a socket, the official ``openai`` client, fake upstreams on loopback.
"""

from __future__ import annotations

import openai
import pytest

from server.providers import Upstream
from server.settings import SettingsError
from tests.factories import register
from tests.fakes.gateway import start_gateway
from tests.fakes.upstream import Behavior, FakeUpstream

ADMIN = "admin@smartspace.test"
USER = [{"role": "user", "content": "hello models"}]


async def _platform_events(client, admin, type_: str) -> list[dict]:
    resp = await client.get(f"/api/v1/projects/platform/audit?type={type_}&limit=200", headers=admin.headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["items"]


@pytest.fixture
async def fakes():
    one, two = await FakeUpstream().start(), await FakeUpstream().start()
    yield one, two
    await one.stop()
    await two.stop()


async def test_admin_adds_edits_and_retires_a_model_and_each_change_is_audited(aiohttp_client, settings, db,
                                                                              metrics, fakes):
    one, _ = fakes
    gw = await start_gateway(aiohttp_client, settings, db, metrics, fake=one, upstreams=[
        Upstream(provider="ollama", kind="openai", base_url=one.base_url)])
    try:
        admin = await register(gw.client, email=ADMIN)
        body = {"id": "ollama/llama3.2", "kind": "chat", "input_micros_per_mtok": 10_000,
                "output_micros_per_mtok": 20_000, "aliases": ["llama3.2:latest"], "upstream_model": "llama3.2:3b"}
        # only platform admins
        assert (await gw.client.post("/api/v1/admin/models", json=body, headers=gw.owner.headers)).status == 403
        resp = await gw.client.post("/api/v1/admin/models", json=body, headers=admin.headers)
        assert resp.status == 201, await resp.text()
        created = await resp.json()
        assert created["provider"] == "ollama" and created["upstream_model"] == "llama3.2:3b"
        assert created["context_window"] == 128_000  # the default when not given
        # the same id again, or an alias that already names another model: 409, nothing changes
        assert (await gw.client.post("/api/v1/admin/models", json=body, headers=admin.headers)).status == 409
        clash = {**body, "id": "ollama/other", "aliases": ["llama3.2:latest"]}
        resp = await gw.client.post("/api/v1/admin/models", json=clash, headers=admin.headers)
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "conflict"

        # callable at once, by id and by alias; the upstream is asked for its own name
        ids = {m.id async for m in gw.oai.models.list()}
        assert "ollama/llama3.2" in ids and "openai/gpt-4o-mini" not in ids  # only reachable providers
        raw = await gw.oai.chat.completions.with_raw_response.create(model="llama3.2:latest", messages=USER)
        assert raw.parse().choices[0].message.content.startswith("Reply")
        assert one.received[-1].body["model"] == "llama3.2:3b"
        reported = one.reported[-1]
        assert int(raw.headers["x-smartspace-cost-micros"]) == -(
            -(reported.input_tokens * 10_000 + reported.output_tokens * 20_000) // 1_000_000)

        # edit: a new upstream name and aliases
        resp = await gw.client.patch("/api/v1/admin/models/ollama/llama3.2", headers=admin.headers,
                                     json={"upstream_model": "llama3.2:1b", "aliases": ["tiny-llama"]})
        assert resp.status == 200 and (await resp.json())["aliases"] == ["tiny-llama"]
        await gw.oai.chat.completions.create(model="ollama/tiny-llama", messages=USER)
        assert one.received[-1].body["model"] == "llama3.2:1b"
        with pytest.raises(openai.NotFoundError):  # the old alias is gone
            await gw.oai.chat.completions.create(model="llama3.2:latest", messages=USER)

        # retire: not callable, not listed, still readable by admins with include_inactive
        resp = await gw.client.delete("/api/v1/admin/models/ollama/llama3.2", headers=admin.headers)
        assert resp.status == 200 and (await resp.json())["active"] is False
        with pytest.raises(openai.NotFoundError):
            await gw.oai.chat.completions.create(model="ollama/llama3.2", messages=USER)
        assert "ollama/llama3.2" not in {m.id async for m in gw.oai.models.list()}
        listed = await (await gw.client.get("/api/v1/models?include_inactive=true&provider=ollama",
                                            headers=admin.headers)).json()
        assert [m["id"] for m in listed["items"]] == ["ollama/llama3.2"]
        assert (await gw.client.delete("/api/v1/admin/models/ollama/nope", headers=admin.headers)).status == 404

        audit = await _platform_events(gw.client, admin, "catalog.*")
        kinds = [(e["type"], e["data"]["model"]) for e in sorted(audit, key=lambda e: e["seq"])]
        assert kinds == [("catalog.created", "ollama/llama3.2"), ("catalog.updated", "ollama/llama3.2"),
                         ("catalog.retired", "ollama/llama3.2")]
        update = next(e for e in audit if e["type"] == "catalog.updated")["data"]["changes"]
        assert update["upstream_model"] == {"from": "llama3.2:3b", "to": "llama3.2:1b"}
        assert all(e["actor"].startswith("user:") for e in audit)
        verify = await (await gw.client.get("/api/v1/projects/platform/audit/verify", headers=admin.headers)).json()
        assert verify["ok"] is True
    finally:
        await gw.oai.close()


async def test_models_declared_beside_their_upstream_are_loaded_at_start_and_audited(aiohttp_client, settings,
                                                                                    db, metrics, fakes):
    one, _ = fakes

    def ollama(price: int) -> list[Upstream]:
        return [Upstream(provider="ollama", kind="openai", base_url=one.base_url, models=[
            {"id": "qwen2.5:7b", "input_micros_per_mtok": price, "output_micros_per_mtok": 2 * price},
            {"id": "ollama/nomic-embed-text", "kind": "embedding", "input_micros_per_mtok": 1_000,
             "output_micros_per_mtok": 0, "aliases": ["nomic"]}])]

    gw = await start_gateway(aiohttp_client, settings, db, metrics, fake=one, upstreams=ollama(50_000))
    try:
        ids = {m.id async for m in gw.oai.models.list()}
        assert {"ollama/qwen2.5:7b", "ollama/nomic-embed-text"} <= ids
        raw = await gw.oai.chat.completions.with_raw_response.create(model="qwen2.5:7b", messages=USER)
        reported = one.reported[-1]
        assert one.received[-1].body["model"] == "qwen2.5:7b"
        assert int(raw.headers["x-smartspace-cost-micros"]) == -(
            -(reported.input_tokens * 50_000 + reported.output_tokens * 100_000) // 1_000_000)
        vectors = await gw.oai.embeddings.create(model="nomic", input="embed me")
        assert vectors.data and one.received[-1].body["model"] == "nomic-embed-text"
        admin = await register(gw.client, email=ADMIN)  # its token stays valid across the restarts below
        created = await _platform_events(gw.client, admin, "catalog.created")
        assert sorted(e["data"]["model"] for e in created) == ["ollama/nomic-embed-text", "ollama/qwen2.5:7b"]
        assert all(e["data"]["source"] == "SMARTSPACE_UPSTREAMS" and e["actor"] == "system:smartspace"
                   for e in created)
    finally:
        await gw.oai.close()

    # a restart with the same configuration changes nothing; a new price is brought in line, audited
    gw = await start_gateway(aiohttp_client, settings, db, metrics, fake=one, upstreams=ollama(50_000), funds=0)
    await gw.oai.close()
    assert len(await _platform_events(gw.client, admin, "catalog.*")) == 2
    gw = await start_gateway(aiohttp_client, settings, db, metrics, fake=one, upstreams=ollama(70_000), funds=0)
    try:
        resp = await gw.client.get("/api/v1/models/ollama/qwen2.5:7b", headers=gw.owner.headers)
        assert (await resp.json())["input_micros_per_mtok"] == 70_000
        updated = await _platform_events(gw.client, admin, "catalog.updated")
        assert [e["data"]["changes"]["input_micros_per_mtok"] for e in updated] == [{"from": 50_000, "to": 70_000}]
    finally:
        await gw.oai.close()


async def test_requests_are_spread_and_a_429_moves_on_to_the_next_upstream(aiohttp_client, settings, db, metrics,
                                                                          fakes):
    one, two = fakes
    gw = await start_gateway(aiohttp_client, settings, db, metrics, fake=one, upstreams=[
        Upstream(provider="openai", kind="openai", base_url=one.base_url, api_key="sk-one-0123456789"),
        Upstream(provider="openai", kind="openai", base_url=two.base_url, api_key="sk-two-0123456789")])
    try:
        for _ in range(4):
            await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
        assert (len(one.received), len(two.received)) == (2, 2)  # in turn

        # the next in turn (one) is rate-limited: the call is answered by two, and one rests for Retry-After
        one.plan(Behavior(status=429, retry_after=60))
        raw = await gw.oai.chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=USER)
        assert raw.parse().choices[0].message.content.startswith("Reply")
        assert (len(one.received), len(two.received)) == (3, 3)
        request = await (await gw.client.get(f"/api/v1/requests/{raw.headers['x-smartspace-request-id']}",
                                             headers=gw.owner.headers)).json()
        assert request["status"] == "settled" and request["cost_micros"] > 0  # one request, charged once
        for _ in range(3):  # one is resting: everything goes to two
            await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
        assert (len(one.received), len(two.received)) == (3, 6)

        # a stream that fails with a 5xx before its first chunk moves on too (two fails, one is still resting
        # but is asked as the last resort)
        two.plan(Behavior(status=503))
        stream = await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.startswith("Reply") and len(one.received) == 4 and len(two.received) == 7

        # when every upstream fails, the client gets the provider error and nothing is charged
        before = (await gw.wallet()).balance_micros
        one.plan(Behavior(status=500))
        two.plan(Behavior(status=500))
        with pytest.raises(openai.APIStatusError) as failed:
            await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
        assert failed.value.status_code == 502
        wallet = await gw.wallet()
        assert wallet.balance_micros == before and wallet.reserved_micros == 0
    finally:
        await gw.oai.close()


async def test_a_client_error_is_not_retried_on_another_upstream(aiohttp_client, settings, db, metrics, fakes):
    one, two = fakes
    gw = await start_gateway(aiohttp_client, settings, db, metrics, fake=one, upstreams=[
        Upstream(provider="openai", kind="openai", base_url=one.base_url),
        Upstream(provider="openai", kind="openai", base_url=two.base_url)])
    try:
        one.plan(Behavior(status=400))
        with pytest.raises(openai.BadRequestError):
            await gw.oai.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
        assert (len(one.received), len(two.received)) == (1, 0)
    finally:
        await gw.oai.close()


@pytest.mark.parametrize("model_id", ["nope", "a" * 65 + "/m", "p/" + "m" * 161, "p/two words\nline"])
async def test_a_model_id_the_catalog_cannot_hold_is_refused_in_words(client, model_id):
    admin = await register(client, email=ADMIN)
    resp = await client.post("/api/v1/admin/models", headers=admin.headers, json={
        "id": model_id, "input_micros_per_mtok": 1, "output_micros_per_mtok": 1})
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["details"]["field"] == "id" and "provider/model" in error["message"] and "^" not in error["message"]


async def test_a_declared_model_whose_alias_names_another_model_stops_the_start_with_a_clear_message(
        aiohttp_client, settings, db, metrics, fakes):
    one, _ = fakes
    upstreams = [Upstream(provider="ollama", kind="openai", base_url=one.base_url, models=[
        {"id": "llama3.2", "input_micros_per_mtok": 0, "output_micros_per_mtok": 0,
         "aliases": ["openai/gpt-4o-mini"]}])]
    with pytest.raises(SettingsError) as err:
        await start_gateway(aiohttp_client, settings, db, metrics, fake=one, upstreams=upstreams, funds=0)
    assert "SMARTSPACE_UPSTREAMS" in str(err.value) and "openai/gpt-4o-mini" in str(err.value)

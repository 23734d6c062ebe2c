"""GET /api/v1/models and the platform admin's audited price edits."""

from __future__ import annotations

import sqlalchemy as sa

from domain.catalog import PLATFORM_PROJECT, SEED
from storage.catalog import seed_catalog
from storage.models import catalog_models, events
from tests.factories import create_key, register


async def test_models_are_listed_with_prices_in_micros(client):
    user = await register(client)
    resp = await client.get("/api/v1/models", headers=user.headers)
    assert resp.status == 200
    body = await resp.json()
    by_id = {m["id"]: m for m in body["items"]}
    assert body["total"] == len(body["items"]) >= len(SEED)
    mini = by_id["openai/gpt-4o-mini"]
    assert (mini["input_micros_per_mtok"], mini["output_micros_per_mtok"]) == (150_000, 600_000)
    assert by_id["openai/gpt-4"]["input_micros_per_mtok"] == 30_000_000
    assert by_id["anthropic/claude-3-opus"]["output_micros_per_mtok"] == 75_000_000
    assert by_id["local/echo-1"]["input_micros_per_mtok"] > 0
    assert mini["context_window"] == 128_000 and mini["max_output_tokens"] == 16_384


async def test_models_filter_by_provider_search_and_kind(client):
    user = await register(client)
    items = (await (await client.get("/api/v1/models?provider=anthropic", headers=user.headers)).json())["items"]
    assert items and {m["provider"] for m in items} == {"anthropic"}
    items = (await (await client.get("/api/v1/models?search=MINI", headers=user.headers)).json())["items"]
    assert items and all("mini" in m["id"] for m in items)
    items = (await (await client.get("/api/v1/models?kind=embedding", headers=user.headers)).json())["items"]
    assert {m["id"] for m in items} >= {"openai/text-embedding-3-small", "local/embed-1"}
    assert all(m["kind"] == "embedding" for m in items)
    items = (await (await client.get("/api/v1/models?search=100%25", headers=user.headers)).json())["items"]
    assert items == []


async def test_models_need_authentication_and_accept_api_keys(client):
    assert (await client.get("/api/v1/models")).status == 401
    user = await register(client)
    key = await create_key(client, user)
    resp = await client.get("/api/v1/models", headers={"X-API-Key": key["key"]})
    assert resp.status == 200


async def test_a_single_model_and_an_unknown_one(client):
    user = await register(client)
    resp = await client.get("/api/v1/models/openai/gpt-4o", headers=user.headers)
    assert resp.status == 200 and (await resp.json())["output_micros_per_mtok"] == 10_000_000
    resp = await client.get("/api/v1/models/openai/gpt-9", headers=user.headers)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_platform_admin_edits_a_price_and_the_edit_is_audited(client, container):
    admin = await register(client, email="admin@smartspace.test")
    resp = await client.patch("/api/v1/admin/models/openai/gpt-4o-mini", headers=admin.headers,
                              json={"input_micros_per_mtok": 160_000})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["input_micros_per_mtok"] == 160_000
    async with container.db.read() as conn:
        rows = (await conn.execute(sa.select(events.c.type, events.c.data, events.c.actor)
                                   .where(events.c.project_id == PLATFORM_PROJECT))).all()
    assert [r.type for r in rows] == ["catalog.updated"]
    assert rows[0].data["changes"]["input_micros_per_mtok"] == {"from": 150_000, "to": 160_000}
    assert rows[0].actor == f"user:{admin.id}"
    # the seed runs again at every start-up: it must not undo the admin's edit
    assert await seed_catalog(container.db) == 0
    async with container.db.read() as conn:
        price = (await conn.execute(sa.select(catalog_models.c.input_micros_per_mtok)
                                    .where(catalog_models.c.id == "openai/gpt-4o-mini"))).scalar_one()
    assert price == 160_000


async def test_deactivated_models_disappear_from_the_list(client):
    admin = await register(client, email="admin@smartspace.test")
    resp = await client.patch("/api/v1/admin/models/openai/gpt-4", headers=admin.headers, json={"active": False})
    assert resp.status == 200
    ids = {m["id"] for m in (await (await client.get("/api/v1/models", headers=admin.headers)).json())["items"]}
    assert "openai/gpt-4" not in ids
    resp = await client.get("/api/v1/models?include_inactive=true", headers=admin.headers)
    assert "openai/gpt-4" in {m["id"] for m in (await resp.json())["items"]}
    assert (await client.get("/api/v1/models/openai/gpt-4", headers=admin.headers)).status == 404


async def test_non_admins_cannot_edit_prices(client):
    user = await register(client)
    resp = await client.patch("/api/v1/admin/models/openai/gpt-4o", headers=user.headers,
                              json={"input_micros_per_mtok": 1})
    assert resp.status == 403
    key = await create_key(client, user)
    resp = await client.patch("/api/v1/admin/models/openai/gpt-4o", headers={"X-API-Key": key["key"]},
                              json={"input_micros_per_mtok": 1})
    assert resp.status == 403


async def test_bad_price_edits_are_refused(client):
    admin = await register(client, email="admin@smartspace.test")
    for body in ({"input_micros_per_mtok": -1}, {"input_micros_per_mtok": 1.5}, {"price": 3}, {}):
        resp = await client.patch("/api/v1/admin/models/openai/gpt-4o", headers=admin.headers, json=body)
        assert resp.status in (400, 422), body
        assert (await resp.json())["error"]["code"] == "invalid_request"
    resp = await client.patch("/api/v1/admin/models/openai/nope", headers=admin.headers,
                              json={"input_micros_per_mtok": 1})
    assert resp.status == 404


async def test_seeding_is_idempotent(db):
    first = await seed_catalog(db)
    assert first == len(SEED)
    assert await seed_catalog(db) == 0

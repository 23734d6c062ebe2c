"""CORS (SMARTSPACE_CORS_ORIGINS): a browser's preflight, then the real call, as a browser sends them — over a
real socket with aiohttp, on the REST API and the OpenAI-compatible gateway."""

from __future__ import annotations

import msgspec
import pytest

from tests.fakes.gateway import start_gateway

APP = "https://app.example.com"
DEV = "http://localhost:5173"
EVIL = "https://evil.example.net"


def preflight(origin: str, method: str, headers: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers}


@pytest.fixture
async def gw(aiohttp_client, settings, db, metrics):
    env = await start_gateway(aiohttp_client, msgspec.structs.replace(settings, cors_origins=(APP, DEV)), db, metrics)
    yield env
    await env.close()


async def test_a_configured_origin_passes_the_gateway_preflight_and_reads_the_receipt_headers(gw):
    resp = await gw.client.options("/v1/chat/completions", headers=preflight(
        APP, "POST", "authorization, content-type, idempotency-key"))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key"} <= allowed
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in resp.headers

    call = await gw.client.post("/v1/chat/completions", headers={
        "Origin": APP, "Authorization": f"Bearer {gw.key['key']}", "Content-Type": "application/json"},
        json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert call.status == 200, await call.text()
    assert call.headers["Access-Control-Allow-Origin"] == APP
    exposed = {h.strip().lower() for h in call.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-smartspace-request-id", "x-smartspace-cost-micros"} <= exposed
    assert int(call.headers["x-smartspace-cost-micros"]) > 0


async def test_the_rest_api_answers_a_second_origin_and_its_errors_are_readable(gw):
    path = f"/api/v1/projects/{gw.project_id}/budgets"
    resp = await gw.client.options(path, headers=preflight(DEV, "POST", "Authorization,Content-Type"))
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == DEV
    ok = await gw.client.get(f"/api/v1/projects/{gw.project_id}/wallet", headers={"Origin": DEV, **gw.owner.headers})
    assert ok.status == 200 and ok.headers["Access-Control-Allow-Origin"] == DEV
    denied = await gw.client.get(f"/api/v1/projects/{gw.project_id}/wallet", headers={"Origin": DEV})
    assert denied.status == 401  # a script can read why
    assert denied.headers["Access-Control-Allow-Origin"] == DEV
    assert (await denied.json())["error"]["code"] == "unauthorized"


async def test_an_unlisted_origin_is_refused_and_changes_nothing(gw):
    before = len(gw.fake.received)
    resp = await gw.client.options("/v1/chat/completions", headers=preflight(EVIL, "POST", "authorization"))
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    # The browser would stop here; a same-request without a preflight gets no CORS grant either.
    call = await gw.client.get("/v1/models", headers={"Origin": EVIL, "Authorization": f"Bearer {gw.key['key']}"})
    assert "Access-Control-Allow-Origin" not in call.headers
    assert len(gw.fake.received) == before


async def test_a_header_outside_the_list_is_refused_in_preflight(gw):
    resp = await gw.client.options("/v1/chat/completions", headers=preflight(APP, "POST", "authorization, x-evil"))
    assert resp.status == 403


async def test_no_origins_configured_means_no_cors_at_all(client):
    resp = await client.options("/api/v1/auth/token", headers=preflight(APP, "POST", "content-type"))
    assert "Access-Control-Allow-Origin" not in resp.headers
    health = await client.get("/health", headers={"Origin": APP})
    assert health.status == 200 and "Access-Control-Allow-Origin" not in health.headers

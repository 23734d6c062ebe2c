"""What an API key may reach over REST: the decision table of scopes over every route of the route table.

Every key may call the gateway and read its own requests and usage; each scope widens one area to the
whole project; a route no scope names (writes, members' admin, the chat assistant…) needs a user token."""

from __future__ import annotations

import re
from typing import Any

import pytest

from domain.identity import KEY_SCOPES, OWN
from server.http import RouteSpec, routes
from tests.factories import create_key, quick_user

P = "/api/v1/projects/{project_id}"

# The decision table: each route a key can reach and the scope it needs (OWN: every key). Any other route
# with auth is for user tokens only.
EXPECTED: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/projects"): "project:read",
    ("GET", P): "project:read",
    ("GET", P + "/members"): "project:read",
    ("GET", P + "/agents"): "project:read",
    ("GET", P + "/keys"): "project:read",
    ("GET", P + "/audit"): "audit:read",
    ("GET", P + "/audit/verify"): "audit:read",
    ("GET", P + "/budgets"): "budgets:read",
    ("GET", P + "/budgets/{budget_id}"): "budgets:read",
    ("GET", P + "/wallet"): "wallet:read",
    ("GET", P + "/wallet/ledger"): "wallet:read",
    ("GET", P + "/policy"): "policy:read",
    ("GET", P + "/policy/versions"): "policy:read",
    ("GET", P + "/deposit-address"): "payments:read",
    ("GET", P + "/deposits"): "payments:read",
    ("GET", "/api/v1/deposits/{deposit_id}"): "payments:read",
    ("GET", P + "/payments"): "payments:read",
    ("GET", "/api/v1/payments/{payment_id}"): "payments:read",
    ("POST", "/api/v1/requests"): OWN,
    ("GET", "/api/v1/requests/{request_id}"): OWN,
    ("GET", P + "/requests"): OWN,
    ("GET", P + "/usage"): OWN,
    ("GET", "/api/v1/models"): OWN,
    ("GET", "/api/v1/models/{provider}/{model:.+}"): OWN,
}


def authed_routes() -> list[RouteSpec]:
    return [s for s in routes.specs if s.auth]


def url_for(spec: RouteSpec, project_id: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: project_id if m[1] == "project_id" else f"{m[1]}_missing",
                  spec.path)


async def gate_refused(client, spec: RouteSpec, url: str, key: dict[str, Any]) -> bool:
    """Whether the scope gate refused the key (a 403 naming the key), as opposed to anything the route did."""
    resp = await client.request(spec.method, url, headers={"X-API-Key": key["key"]})
    if resp.status != 403:
        return False
    error = (await resp.json())["error"]
    assert error["code"] == "forbidden"
    return error["details"].get("key_id") == key["id"] and "scopes" in error["details"]


def test_the_route_table_declares_exactly_the_decision_table(client):  # client: the app (and its routes) exist
    declared = {(s.method, s.path): s.key_scope for s in authed_routes() if s.key_scope is not None}
    assert declared == EXPECTED
    assert set(EXPECTED.values()) <= {*KEY_SCOPES, OWN}
    # Every scope opens a route, but these: the gateway is every key's, and requests:read / usage:read widen
    # the key's own requests and usage to the project's (tests/integration/test_keys.py).
    assert set(KEY_SCOPES) - {"gateway", "requests:read", "usage:read"} <= set(EXPECTED.values())


async def test_a_key_without_scopes_reaches_the_gateway_and_its_own_reads_only(client, container):
    owner = await quick_user(container)
    bare = await create_key(client, owner)
    assert bare["scopes"] == []
    for spec in authed_routes():
        refused = await gate_refused(client, spec, url_for(spec, owner.project_id), bare)
        assert refused == (spec.key_scope != OWN), (spec.method, spec.path)


async def test_each_scope_opens_its_routes_and_nothing_else(client, container):
    owner = await quick_user(container)
    for scope in KEY_SCOPES:
        only = await create_key(client, owner, scopes=[scope])
        all_but = await create_key(client, owner, scopes=sorted(set(KEY_SCOPES) - {scope}))
        for spec in authed_routes():
            if spec.key_scope != scope:
                continue
            url = url_for(spec, owner.project_id)
            assert not await gate_refused(client, spec, url, only), (scope, spec.path)
            assert await gate_refused(client, spec, url, all_but), (scope, spec.path)


async def test_no_scope_opens_a_route_for_user_tokens(client, container):
    owner = await quick_user(container)
    everything = await create_key(client, owner, scopes=list(KEY_SCOPES))
    for spec in authed_routes():
        refused = await gate_refused(client, spec, url_for(spec, owner.project_id), everything)
        assert refused == (spec.key_scope is None), (spec.method, spec.path)


async def test_a_scoped_key_still_sees_its_own_project_only(client, container):
    owner, stranger = await quick_user(container), await quick_user(container)
    key = await create_key(client, owner, scopes=list(KEY_SCOPES))
    for path in ("/audit", "/wallet", "/budgets", "/policy", "/payments", ""):
        resp = await client.get(P.format(project_id=stranger.project_id) + path, headers={"X-API-Key": key["key"]})
        assert resp.status == 404, path
        mine = await client.get(P.format(project_id=owner.project_id) + path, headers={"X-API-Key": key["key"]})
        assert mine.status == 200, (path, await mine.text())


async def test_the_openapi_document_names_each_routes_key_scope(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    audit = doc["paths"]["/api/v1/projects/{project_id}/audit"]["get"]
    assert audit["x-smartspace-key-scope"] == "audit:read" and "403" in audit["responses"]
    assert doc["paths"]["/api/v1/projects/{project_id}/usage"]["get"]["x-smartspace-key-scope"] == OWN
    assert doc["paths"]["/api/v1/projects/{project_id}/budgets"]["post"]["x-smartspace-key-scope"] is None


@pytest.mark.parametrize("scopes", [["audit:write"], ["gateway", "audit:writes"], ["*"]])
async def test_unknown_scopes_are_refused_by_name(client, container, scopes):
    owner = await quick_user(container)
    resp = await client.post(P.format(project_id=owner.project_id) + "/keys", json={"name": "k", "scopes": scopes},
                             headers=owner.headers)
    assert resp.status == 422, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_request" and error["details"]["field"] == "scopes"
    assert "audit:read" in error["message"]  # the valid scopes are listed
